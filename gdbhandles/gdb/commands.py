"""`handle …` commands and `set/show handle …` settings in gdb.

The layer is thin: parse the arguments, ask the engine, render with render.py. Every
failure reaches the user as one line (`gdb.GdbError`), never a Python traceback.

Note: gdb has a built-in `handle` command (signal handling); this prefix replaces it.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass
from typing import Callable

import gdb

from gdbhandles import render
from gdbhandles.errors import HandleError
from gdbhandles.gdb import prefix, settings
from gdbhandles.gdb.session import Session
from gdbhandles.records import ReadStats
from gdbhandles.version import version_text

MASK64 = (1 << 64) - 1
PROGRESS_EVERY = 0.5        # seconds between progress lines

session = Session()


class _Done(Exception):
    """argparse finished early on purpose (`--help`)."""


class Parser(argparse.ArgumentParser):
    """argparse that talks through gdb: help to gdb's output, errors as one GdbError line."""

    def __init__(self, name: str, summary: str, example: str):
        super().__init__(prog=f"{prefix.NAME} {name}", description=summary, epilog=f"Example: {example}",
                         add_help=True, allow_abbrev=False)

    def _print_message(self, message, file=None):
        if message:
            gdb.write(message)

    def exit(self, status=0, message=None):
        if message:
            raise gdb.GdbError(message.strip())
        raise _Done()

    def error(self, message):
        usage = " ".join(self.format_usage().split())
        raise gdb.GdbError(f"{self.prog}: {message} ({usage})")


def integer(text: str) -> int:
    """Decimal, 0x-hex, or any gdb expression (`$rcx`, `$rsp+8`), as a 64-bit unsigned value."""
    if re.fullmatch(r"-?(0[xX][0-9a-fA-F]+|[0-9]+)", text):
        return int(text, 16 if "x" in text.lower() else 10) & MASK64
    try:
        return int(gdb.parse_and_eval(text)) & MASK64
    except gdb.error as exc:
        raise argparse.ArgumentTypeError(f"not a number or expression: {text} ({exc})") from None


def process(text: str) -> int | str:
    """A pid (number or expression) or a process image name."""
    if re.fullmatch(r"[\w.\- ]+", text) and not re.fullmatch(r"-?(0[xX][0-9a-fA-F]+|[0-9]+)", text):
        return text
    return integer(text)


@dataclass
class Subcommand:
    name: str
    summary: str
    example: str
    arguments: Callable[[Parser], None]
    run: Callable[[argparse.Namespace], None]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, summary: str, example: str, arguments=lambda parser: None):
    """Declare `handle NAME`; extensions (qmpcommands.py) use the same decorator."""
    def declare(run):
        SUBCOMMANDS[name] = Subcommand(name, summary, example, arguments, run)
        return run
    return declare


class _GdbSubcommand(gdb.Command):
    def __init__(self, spec: Subcommand):
        self.spec = spec
        self.__doc__ = f"{spec.summary}\nUsage: see `handle {spec.name} --help`.\nExample: {spec.example}"
        super().__init__(f"{prefix.NAME} {spec.name}", gdb.COMMAND_DATA)

    def invoke(self, argument: str, from_tty: bool) -> None:
        self.dont_repeat()
        parser = Parser(self.spec.name, self.spec.summary, self.spec.example)
        self.spec.arguments(parser)
        try:
            args = parser.parse_args(gdb.string_to_argv(argument))
            self.spec.run(args)
        except _Done:
            return
        except HandleError as exc:
            raise gdb.GdbError(str(exc)) from None
        except (gdb.GdbError, KeyboardInterrupt):
            raise
        except gdb.error as exc:
            raise gdb.GdbError(f"handle {self.spec.name}: {exc}") from None
        except Exception as exc:   # a bug of ours: still one line, with what to report
            raise gdb.GdbError(f"handle {self.spec.name}: internal error {type(exc).__name__}: {exc}") from None


class _HandlePrefix(gdb.Command):
    """Windows handle tables of a QEMU guest (attach with `target remote 127.0.0.1:PORT`).

Subcommands: lookup, walk, ps, info; pause, resume, vmstatus (QMP) (`handle SUBCOMMAND --help`).
Settings: `set handle profile FILE`, `set handle qmp SOCKET`, `set handle auto-pause on|off`,
`set handle progress on|off`.
Note: replaces gdb's signal `handle` command while gdbhandles is loaded (GDBHANDLES_PREFIX=word
before loading keeps it; see the README)."""

    def __init__(self):
        super().__init__(prefix.NAME, gdb.COMMAND_DATA, prefix=True)

    def invoke(self, argument: str, from_tty: bool) -> None:
        signal_line = prefix.signal_line_error(argument)
        if signal_line:
            raise gdb.GdbError(signal_line)
        if argument.strip():
            word = argument.split()[0]
            raise gdb.GdbError(f"{prefix.NAME}: unknown subcommand {word!r}; one of: "
                               f"{', '.join(sorted(SUBCOMMANDS))}")
        gdb.execute(f"help {prefix.NAME}")


# --- output helpers -------------------------------------------------------------------------

class Progress:
    """Throttled progress lines on gdb's error stream; the last one is overwritten."""

    def __init__(self):
        self.enabled = bool(settings.value("progress"))
        self.last = time.monotonic()

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= PROGRESS_EVERY:
            self.last = now
            gdb.write(f"{message}\n", gdb.STDERR)
            gdb.flush()


def emit(text: str) -> None:
    gdb.write(text if text.endswith("\n") else text + "\n")


def warn(warning) -> None:
    """A bad entry or unreadable page met by a walk, which goes on."""
    handle = f" handle {warning.handle:#x}" if warning.handle is not None else ""
    gdb.write(f"warning: {warning.process}({warning.pid}){handle}: {warning.message}\n", gdb.STDERR)


def stats_since(windows, before: ReadStats) -> ReadStats:
    now = windows.info().stats
    return ReadStats(**{key: getattr(now, key) - getattr(before, key) for key in vars(now)})


# --- the subcommands ------------------------------------------------------------------------

def _lookup_arguments(parser: Parser) -> None:
    parser.add_argument("process", type=process, help="pid (decimal, 0x-hex, expression) or image name")
    parser.add_argument("handle", type=integer,
                        help="handle value; -1/-2 for the current process/thread of the selected vCPU; "
                             "kernel handles as 0x80000004 or 0xffffffff80000004")
    parser.add_argument("--json", action="store_true", help="one JSON list, the truth.json record shape")


@subcommand("lookup", "Show what one handle of a process refers to.", "handle lookup lsass.exe 0x1c",
            _lookup_arguments)
def lookup(args: argparse.Namespace) -> None:
    with session.open() as windows:
        record = windows.lookup(args.process, args.handle)
    emit(render.lookup_json([record]) if args.json else render.lookup_text(record))


def _walk_arguments(parser: Parser) -> None:
    parser.add_argument("target", nargs="?", default="all",
                        help="pid, image name, or all (default; System's table holds the kernel handles)")
    parser.add_argument("--type", help="only objects of this type (e.g. File, Key, Event)")
    parser.add_argument("--name", help="only objects whose name contains this text")
    parser.add_argument("--json", action="store_true", help="one JSON list, the truth.json record shape")


@subcommand("walk", "List the handles of one process or of all.", "handle walk explorer.exe --type File",
            _walk_arguments)
def walk(args: argparse.Namespace) -> None:
    target = None if args.target == "all" else process(args.target)
    started = time.monotonic()
    with session.open() as windows:
        before = windows.info().stats
        records = list(windows.walk(target, type=args.type, name=args.name, progress=Progress(), warn=warn))
        stats = stats_since(windows, before)
    emit(render.handles_json(records) if args.json else render.handles_table(records))
    summary = render.walk_summary(records, time.monotonic() - started, stats)
    gdb.write(summary + "\n", gdb.STDERR if args.json else gdb.STDOUT)


def _json_only(parser: Parser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON list")


@subcommand("ps", "List the processes: pid, name, EPROCESS, handle count, table level.", "handle ps",
            _json_only)
def ps(args: argparse.Namespace) -> None:
    with session.open() as windows:
        records = windows.processes()
    emit(render.processes_json(records) if args.json else render.processes_table(records))


@subcommand("info", "Show what was detected: build, PDB GUID, kernel base, DTB, profile, globals, reads.",
            "handle info", _json_only)
def info(args: argparse.Namespace) -> None:
    with session.open() as windows:
        record = windows.info()
    emit(render.info_json(record) if args.json else render.info_text(record))
    if not args.json:
        emit(session.memory_text())


@subcommand("version", "Show the gdbhandles version and where its layout data comes from.", "handle version")
def version(args: argparse.Namespace) -> None:
    emit(version_text())


# --- registration ---------------------------------------------------------------------------

def register() -> None:
    """Create the `handle` prefix, every declared subcommand, and the settings."""
    _HandlePrefix()
    for spec in SUBCOMMANDS.values():
        _GdbSubcommand(spec)
    settings.register()
