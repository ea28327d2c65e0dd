"""Every command declared once, for both front ends: gdb's `handle NAME` and the shell's `gdbhandles NAME`.

A `Command` says what the user sees (name, summary, arguments, help, example, whether it
prints JSON and can write to a file); each front end builds its argparse parser, gdb help
text and completion from it, and adds only what differs where the user is: how a value is
read (gdb also evaluates expressions), where memory comes from, and the advice an error
gets. The engine commands' bodies (`query`) are written here too, so both front ends show
the same output; each returns an `Output` that the front end delivers (`deliver`).

Longer than 300 lines on purpose: every command of both front ends is declared here, as data,
so that one file answers "which commands exist, with which arguments".
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import gc
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from gdbhandles import queries, render, render_queries
from gdbhandles.errors import HandleError
from gdbhandles.windows.memory import MASK64

__all__ = ["Kind", "Argument", "Command", "Frame", "Output", "COMMANDS", "declare", "number", "process",
           "add_arguments", "help_text", "deliver", "write_atomically"]

NUMBER = re.compile(r"-?(0[xX][0-9a-fA-F]+|[0-9]+)")
WRITE_CHUNK = 1 << 20              # characters encoded and written at a time (--output of a huge walk)


class Kind(enum.Enum):
    """How an argument's text is read (and completed)."""
    TEXT = "text"
    PROCESS = "process"      # pid or image name
    TARGET = "target"        # pid, image name or all
    VALUE = "value"          # a number; in gdb also an expression ($rcx)
    NUMBER = "number"        # a number only (addresses given on the shell or as settings)
    TYPE = "type"            # an object type name of the guest
    SECONDS = "seconds"
    FLAG = "flag"


@dataclass(frozen=True)
class Argument:
    name: str                # "process" (positional) or "--type" (option)
    help: str
    kind: Kind = Kind.TEXT
    optional: bool = False   # a positional that may be left out
    many: bool = False       # a positional that takes one or more words
    required: bool = False   # an option that must be given
    default: object = None
    metavar: str | None = None

    @property
    def positional(self) -> bool:
        return not self.name.startswith("-")

    @property
    def shown(self) -> str:
        return self.metavar or (self.name.upper() if self.positional else self.name.lstrip("-").upper())


JSON = Argument("--json", "print the records as JSON and nothing else (fields: docs/architecture.md)", Kind.FLAG)
OUTPUT = Argument("--output", "write the output to FILE instead (atomically: a temporary file, then renamed)",
                  metavar="FILE")


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    example: str
    arguments: tuple[Argument, ...] = ()
    json: bool = False                   # has --json
    output: bool = False                 # has --output FILE
    guest: bool = True                   # reads a guest (the shell adds --dump and discovery overrides)
    front_ends: frozenset[str] = frozenset({"gdb", "cli"})
    query: Callable | None = None        # (windows, args, frame) -> Output, for the engine commands

    def every_argument(self) -> tuple[Argument, ...]:
        return self.arguments + ((JSON,) if self.json else ()) + ((OUTPUT,) if self.output else ())


COMMANDS: dict[str, Command] = {}


def declare(command: Command) -> Command:
    COMMANDS[command.name] = command
    return command


# --- reading arguments: the same rules in both front ends -----------------------------------------

def number(text: str) -> int:
    """Decimal or 0x-hex (never octal: 010 is ten), 0 to 2**64-1: nothing wraps (2**64+4 is not 4)."""
    if not NUMBER.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"not a number: {text}")
    text = text.strip()
    value = int(text, 16 if "x" in text.lower() else 10)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: negative numbers are not allowed here")
    if value > MASK64:
        raise argparse.ArgumentTypeError(f"{text}: larger than 64 bits")
    return value


PSEUDO_HANDLES = {"-1": MASK64, "-2": MASK64 - 1}     # NtCurrentProcess(), NtCurrentThread()


def handle_value(text: str) -> int:
    """A handle value: a number, or -1/-2 (the current process/thread pseudo-handles)."""
    return PSEUDO_HANDLES.get(text.strip()) or number(text)


def process(text: str) -> int | str:
    """A pid (decimal or 0x-hex) or an image name (or a unique prefix of one)."""
    return number(text) if NUMBER.fullmatch(text.strip()) else text


def target(text: str) -> int | str | None:
    """`all` (None), a pid or an image name."""
    return None if text.lower() == "all" else process(text)


READERS: dict[Kind, Callable] = {Kind.PROCESS: process, Kind.TARGET: target, Kind.VALUE: handle_value,
                                 Kind.NUMBER: number,
                                 Kind.SECONDS: float}


def add_arguments(command: Command, parser: argparse.ArgumentParser,
                  readers: dict[Kind, Callable] | None = None) -> None:
    """The command's arguments on an argparse parser; `readers` overrides how a kind is read."""
    chosen = {**READERS, **(readers or {})}
    for arg in command.every_argument():
        if arg.kind is Kind.FLAG:
            parser.add_argument(arg.name, action="store_true", help=arg.help)
            continue
        extra = {"nargs": "*" if arg.many else "?"} if arg.positional and arg.optional else \
            {"nargs": "+"} if arg.many else {}
        if not arg.positional:
            extra["metavar"] = arg.shown
            extra["required"] = arg.required
        elif arg.metavar:
            extra["metavar"] = arg.metavar
        default = chosen[arg.kind](arg.default) if isinstance(arg.default, str) and arg.kind in chosen \
            else arg.default
        parser.add_argument(arg.name, type=chosen.get(arg.kind), default=default, help=arg.help, **extra)


def usage(command: Command, prefix: str) -> str:
    words = [prefix + command.name]
    for arg in command.every_argument():
        word = arg.shown if arg.positional else arg.name + ("" if arg.kind is Kind.FLAG else f" {arg.shown}")
        word += " ..." if arg.many else ""
        words.append(f"[{word}]" if arg.optional or not (arg.positional or arg.required) else word)
    return " ".join(words)


def help_text(command: Command, prefix: str) -> str:
    """Summary, usage, every argument and an example (`prefix` + command): gdb's `help handle NAME`."""
    lines = [command.summary, "", f"Usage: {usage(command, prefix)}"]
    every = command.every_argument()
    if every:
        lines.append("")
        width = max(len(a.shown if a.positional else usage_word(a)) for a in every)
        for arg in every:
            shown = arg.shown if arg.positional else usage_word(arg)
            lines.append(f"  {shown:<{width}}  {arg.help}")
    lines += ["", f"Example: {prefix}{command.example}"]
    return "\n".join(lines)


def usage_word(arg: Argument) -> str:
    return arg.name if arg.kind is Kind.FLAG else f"{arg.name} {arg.shown}"


# --- running and delivering -----------------------------------------------------------------------

@dataclass
class Frame:
    """What a front end lends a command: progress and warnings sinks, the terminal, its styles."""
    progress: render.Progress
    warn: Callable
    width: int | None = None             # terminal columns; None: unlimited
    paint: Callable[[str, str], str] = render.plain


@dataclass
class Output:
    """What a command gives; `text` and `json` may be callables, rendered only when delivered
    (a walk of 280,000 handles would otherwise build both, hundreds of MiB in gdb)."""
    text: str | Callable[[], str]        # what a person reads (escaped, styled)
    json: str | Callable[[], str | Iterable[str]] | None = None
    summary: str | None = None           # after the output; goes to stderr when the output is JSON
    records: list = field(default_factory=list)
    note: str | None = None              # before the output (which process was chosen); stderr with JSON


@contextlib.contextmanager
def collector_paused():
    """Python's cycle collector off while one command runs. A walk makes a million short-lived
    tuples and records, none in a cycle (reference counts free them), and every collection they
    trigger traverses the host's whole heap: in gdb a fast-path walk of `huge` took 3.7 s with
    it, 2.9 s without. It runs again as before once the command is done."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def write_atomically(path: str, text: str | Iterable[str]) -> int:
    """`path` holds either its old content or all of `text` (a string or its pieces), never a
    part (temporary file + rename). Returns the characters written."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    written = 0
    try:
        with os.fdopen(fd, "w") as handle:
            for piece in _pieces(text):                 # encoded a piece at a time
                handle.write(piece)
                written += len(piece)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return written


def _pieces(text: str | Iterable[str]) -> Iterable[str]:
    if isinstance(text, str):
        return (text[start:start + WRITE_CHUNK] for start in range(0, len(text), WRITE_CHUNK))
    return text


def deliver(output: Output, args: argparse.Namespace, out: Callable[[str], None],
            err: Callable[[str], None]) -> None:
    """JSON (only JSON) or the text to `out` or to --output FILE; the summary where it pollutes
    nothing. A body given as pieces (a huge walk's JSON) ends in one newline already, and goes to
    a file piece by piece."""
    as_json = getattr(args, "json", False) and output.json is not None
    body = output.json if as_json else output.text
    body = body() if callable(body) else body
    if isinstance(body, str):
        body = body.rstrip("\n") + "\n"
    if output.note:                  # before the output, where it pollutes nothing
        (err if as_json or getattr(args, "output", None) else out)(output.note + "\n")
    destination = getattr(args, "output", None)
    if destination:
        try:
            written = write_atomically(destination, body)
        except OSError as exc:
            raise HandleError(f"cannot write {destination}: {exc.strerror}") from None
        err(f"{destination}: {written} bytes written\n")
    else:
        out(body if isinstance(body, str) else "".join(body))
    if output.summary:
        (err if as_json or destination else out)(output.summary + "\n")


# --- the engine commands ----------------------------------------------------------------------------

class _Current:
    """The default of a target left out: the current process of the selected vCPU."""

    def __repr__(self) -> str:
        return "the current process"


CURRENT = _Current()


def _current(windows) -> tuple[int, str]:
    """The selected vCPU's current process (pid) and the line saying which it is."""
    found, note = queries.current_process(windows)
    return found.pid, note


def _lookup(windows, args, frame: Frame) -> Output:
    target, note = _current(windows) if args.process is None else (args.process, None)
    record = windows.lookup(target, args.handle)
    return Output(render.lookup_text(record, frame.paint), render.lookup_json([record]), records=[record],
                  note=note)


def _walk(windows, args, frame: Frame) -> Output:
    """A dump has no vCPU, so there the default target is every process."""
    note = None
    target = args.target
    if target is CURRENT:
        target, note = _current(windows) if windows.registers else (None, None)
    if args.free:
        if args.type or args.name:
            raise HandleError("walk --free lists entries that hold no object, so --type and --name do not apply")
        records = list(queries.free_entries(windows, target, warn=frame.warn))
        return Output(render_queries.free_table(records, frame.width, frame.paint), render_queries.free_json(records),
                      render_queries.free_summary(records), records, note)
    started = time.monotonic()
    before = windows.stats()
    records = list(windows.walk(target, type=args.type, name=args.name, progress=frame.progress,
                                warn=frame.warn))
    stats = render.stats_since(windows.stats(), before)
    summary = render.walk_summary(records, time.monotonic() - started, stats)
    return Output(lambda: render.handles_table(records, frame.width, frame.paint),
                  lambda: render.handles_json_pieces(records), summary, records, note)


def _ps(windows, args, frame: Frame) -> Output:
    records = windows.processes()
    for warning in windows.warnings:
        frame.warn(warning)
    return Output(render.processes_table(records, frame.width, frame.paint), render.processes_json(records),
                  records=records)


def _info(windows, args, frame: Frame) -> Output:
    record = windows.info()
    return Output(render.info_text(record, frame.paint), render.info_json(record), records=[record])


HANDLE_HELP = ("handle value; -1/-2: the current process/thread of the selected vCPU; kernel handles as "
               "0x80000004 or 0xffffffff80000004")

declare(Command("lookup", "Show what one handle of a process (default: the current one) refers to.",
                "lookup lsass.exe 0x1c; in gdb also: handle lookup $rcx, handle lookup 4 *(long*)($rsp+0x28)",
                (Argument("process", "pid (decimal or 0x-hex) or image name; without it, the current process "
                                     "of the selected vCPU (gdb)", Kind.PROCESS, optional=True),
                 Argument("handle", HANDLE_HELP, Kind.VALUE)),
                json=True, output=True, query=_lookup))
declare(Command("walk", "List the handles of one process, of all, or (default, in gdb) of the current one.",
                "walk explorer.exe --type File; walk all; walk 672 --free",
                (Argument("target", "pid, image name, or all (System's table holds the kernel handles); default: "
                                    "the current process of the selected vCPU in gdb, all of a dump",
                          Kind.TARGET, optional=True, default=CURRENT),
                 Argument("--type", "only objects of this type (File, Key, Event, ...)", Kind.TYPE),
                 Argument("--name", "only objects whose name contains this text"),
                 Argument("--free", "list the entries without an object instead (free and never allocated), with "
                                    "their place in the kernel's free list (0 = handed out next)", Kind.FLAG)),
                json=True, output=True, query=_walk))
declare(Command("ps", "List the processes: pid, name, EPROCESS, handle table, level, handle count.", "ps",
                json=True, output=True, query=_ps))
declare(Command("info", "Show what was detected: build, PDB GUID, kernel base, DTB, layout, globals, reads.",
                "info", json=True, output=True, query=_info))

# --- who holds an object, the CID table (queries.py) ---------------------------------------------------

def _find(windows, args, frame: Frame) -> Output:
    if (args.object is None) == (args.name is None):
        raise HandleError("find takes an object address or --name TEXT (one of the two)")
    started = time.monotonic()
    records = list(windows.walk(None, type=args.type, name=args.name, object=args.object,
                                progress=frame.progress, warn=frame.warn))
    summary = render_queries.find_summary(records, args.object, args.name, time.monotonic() - started)
    return Output(lambda: render.handles_table(records, frame.width, frame.paint),
                  lambda: render.handles_json_pieces(records), summary, records)


def _cid(windows, args, frame: Frame) -> Output:
    if (args.id is None) == (not args.all):
        raise HandleError("cid takes an id or --all (one of the two)")
    before = len(windows.warnings)
    records = queries.cid_all(windows) if args.all else [queries.cid(windows, args.id)]
    for warning in windows.warnings[before:]:
        frame.warn(warning)
    if args.all:
        return Output(render_queries.cid_table(records, frame.width, frame.paint), render_queries.cid_json(records),
                      f"{len(records)} ids in PspCidTable", records)
    return Output(render_queries.cid_text(records[0]), render_queries.cid_json(records), records=records)


declare(Command("find", "List every (process, handle) that refers to one object, or to objects by name, across "
                "all processes and the kernel table.", "find 0xffffe5a230002630; find --name pagefile --type File",
                (Argument("object", "object body address (as walk and lookup show it)", Kind.VALUE, optional=True),
                 Argument("--name", "instead: objects whose name contains this text (any case)"),
                 Argument("--type", "only objects of this type (File, Key, Process, ...)", Kind.TYPE)),
                json=True, output=True, query=_find))
declare(Command("cid", "Resolve a process or thread id through PspCidTable (the kernel's id table), or list it.",
                "cid 672; cid --all",
                (Argument("id", "process or thread id (decimal or 0x-hex)", Kind.VALUE, optional=True),
                 Argument("--all", "list the whole table instead", Kind.FLAG)),
                json=True, output=True, query=_cid))

# --- gdb only: QEMU's run state through QMP (gdb/qmp_commands.py) --------------------------------------

GDB, CLI = frozenset({"gdb"}), frozenset({"cli"})
declare(Command("pause", "Pause the VM through QMP (gdb then reports a SIGINT stop).", "pause",
                guest=False, front_ends=GDB))
declare(Command("resume", "Resume the VM: through gdb when it is attached, else through QMP.", "resume",
                guest=False, front_ends=GDB))
declare(Command("vmstatus", "Show QEMU's run state (QMP query-status) and gdb's view of it.", "vmstatus",
                guest=False, front_ends=GDB))
declare(Command("mark", "Remember the handles of some processes (default all) at this stop, for `diff`.",
                "mark before; mark leaky leaky.exe 788 --save leaky.json",
                (Argument("name", "a name for the mark (taking it again replaces it)"),
                 Argument("targets", "pids or image names (default: every process)", Kind.PROCESS, optional=True,
                          many=True, metavar="PROCESS"),
                 Argument("--save", "also write the mark to FILE (JSON)", metavar="FILE")),
                front_ends=GDB))
declare(Command("diff", "Show the handles opened (+), closed (-) and changed (~) since a mark, by process.",
                "diff before; diff --file leaky.json --json",
                (Argument("name", "a mark taken earlier in this gdb session", optional=True),
                 Argument("--file", "instead: a mark saved with `mark NAME --save FILE`", metavar="FILE")),
                json=True, output=True, front_ends=GDB))
declare(Command("version", "Show the gdbhandles version and where its layout data comes from.", "version",
                guest=False, front_ends=GDB))

# --- shell only: scripted runs against QEMU (automation/runner.py, regress.py) ---------------------------

declare(Command("gdbinit", 'Print the path of the gdbinit.py to load in gdb: gdb -x "$(gdbhandles gdbinit)".',
                "gdbinit", guest=False, front_ends=CLI))

VM = (Argument("--qemu", "QEMU's arguments for the machine (quoted; gdbhandles adds -gdb tcp:127.0.0.1:PORT, "
                         "a private QMP socket and -loadvm)", metavar="ARGS"),
      Argument("--snapshot", "start from this snapshot of the qcow2 disk (QEMU stays paused there)",
               metavar="NAME"),
      Argument("--gdb", "attach to a running QEMU's gdbstub instead of --qemu", metavar="HOST:PORT"),
      Argument("--qmp", "with --gdb: that QEMU's QMP socket", metavar="SOCKET"))
declare(Command("run", "Boot QEMU (or attach), run handle commands in gdb, print their JSON.",
                'run --qemu "$MACHINE" --snapshot base -- "walk all" "ps"',
                VM + (Argument("commands", 'handle commands after --, e.g. -- "walk all" "ps" (JSON is printed)',
                               many=True, metavar="CMD"),), guest=False, front_ends=CLI))
declare(Command("snapshot", "Save a snapshot of a running VM into its qcow2 disk (QMP).",
                'snapshot --qmp /tmp/qmp.sock --name base',
                (Argument("--qemu", "boot this machine, let it run --wait seconds, then save", metavar="ARGS"),
                 Argument("--qmp", "instead: the QMP socket of a running QEMU", metavar="SOCKET"),
                 Argument("--name", "snapshot name", required=True),
                 Argument("--wait", "seconds to let a booted machine run (default 2)", Kind.SECONDS,
                          default=2.0),
                 Argument("--disk", "qcow2 block node for the snapshot (default: the first)", metavar="NODE")),
                guest=False, front_ends=CLI))
declare(Command("regress", "Walk all handles of a snapshot and compare with a golden file (exit 0 same, "
                "1 differs, 2 error).", 'regress --qemu "$MACHINE" --snapshot base --expect golden.json',
                VM + (Argument("--expect", "golden JSON (handle walk all --json)", required=True,
                               metavar="GOLDEN"),
                      Argument("--update", "write the golden file from this run", Kind.FLAG)),
                guest=False, front_ends=CLI))
