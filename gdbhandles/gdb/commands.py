"""`handle …` in gdb, built from the declarations of commandspec.py.

The layer is thin: parse the arguments (values may be gdb expressions), ask the engine through
the session, deliver the output. gdb's own help shows each command's usage, options and
example; Tab completes options, process names, pids and type names. Every failure reaches the
user as one line (`gdb.GdbError`) with advice that works in gdb, never a Python traceback.

Note: gdb has a built-in `handle` command (signal handling); this prefix replaces it.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

import gdb

from gdbhandles import commandspec, render
from gdbhandles.commandspec import Command, Frame, Kind
from gdbhandles.expressions import UnsafeExpression, check_read_only
from gdbhandles.errors import Advice, HandleError
from gdbhandles.gdb import prefix, settings
from gdbhandles.gdb.session import Session
from gdbhandles.version import version_text

__all__ = ["session", "body", "emit", "register"]

session = Session()

ADVICE = {Advice.LIST_PROCESSES: f"`{prefix.NAME} ps` lists them",
          Advice.LOCATE_KERNEL: "give them yourself: set handle dtb ADDRESS, set handle kernel-base ADDRESS",
          Advice.SUPPLY_PROFILE: "supply a volatility3 ISF: set handle profile FILE",
          Advice.STOP_TARGET: "stop it first (Ctrl-C or `interrupt`), or let gdbhandles pause it: "
                              "set handle qmp SOCKET, set handle auto-pause on"}
ANSI = {"header": "\x1b[1m", "type": "\x1b[36m", "error": "\x1b[31m"}
BODIES: dict[str, Callable[[argparse.Namespace], None]] = {}


def body(name: str):
    """The gdb-only body of a declared command without an engine query (qmp_commands.py)."""
    def bind(run):
        BODIES[name] = run
        return run
    return bind


class _Done(Exception):
    """argparse finished early on purpose (`--help`)."""


class Parser(argparse.ArgumentParser):
    """argparse that talks through gdb: help to gdb's output, errors as one GdbError line."""

    def __init__(self, command: Command):
        super().__init__(prog=f"{prefix.NAME} {command.name}", description=command.summary,
                         epilog=f"Example: {prefix.NAME} {command.example}", add_help=True, allow_abbrev=False)

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


def _is_type(name: str) -> bool:
    try:
        gdb.lookup_type(name)
    except gdb.error:
        return False
    return True


def value(text: str) -> int:
    """A handle value as commandspec reads it, or else a gdb expression that only reads (`$rcx`,
    `*(long*)($rsp+0x28)`): expressions.py refuses assignments, ++/--, calls before gdb sees them."""
    if commandspec.NUMBER.fullmatch(text.strip()):
        return commandspec.handle_value(text)       # out of range is an error, not an expression
    try:
        check_read_only(text, _is_type)
    except UnsafeExpression as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc}") from None
    try:
        result = int(gdb.parse_and_eval(text))
    except gdb.error as exc:
        raise argparse.ArgumentTypeError(f"not a number or expression: {text} ({exc})") from None
    if not -(1 << 63) <= result <= commandspec.MASK64:
        raise argparse.ArgumentTypeError(f"{text} = {result}: not a 64-bit value")
    return result & commandspec.MASK64      # a register read as signed (a kernel handle) keeps its bits


READERS = {Kind.VALUE: value}


# --- where the output goes and how it looks ---------------------------------------------------------

def emit(text: str) -> None:
    gdb.write(text if text.endswith("\n") else text + "\n")


def styled() -> bool:
    """gdb's `set style enabled`, and a terminal to show it on."""
    try:
        return bool(gdb.parameter("style enabled")) and os.isatty(1)
    except (gdb.error, RuntimeError):
        return False


def paint(role: str, text: str) -> str:
    return f"{ANSI[role]}{text}\x1b[0m" if role in ANSI and styled() else text


def width() -> int | None:
    """gdb's `width` (None: unlimited)."""
    columns = gdb.parameter("width")
    return columns if isinstance(columns, int) and 0 < columns < 100000 else None


def _gdb_stderr(text: str) -> None:
    gdb.write(text, gdb.STDERR)


def _terminal(text: str) -> None:
    os.write(2, text.encode("utf-8", "replace"))


def side_streams(args: argparse.Namespace) -> tuple[Callable | None, Callable]:
    """(where progress and the summary go, where warnings go). gdb's `pipe` (and to_string)
    redirect gdb's error stream together with its output, so while JSON is the output, the
    side lines go straight to the terminal (fd 2) or, progress and summary, nowhere; warnings
    then stay on gdb's error stream (MI's log, apart from the JSON)."""
    if getattr(args, "json", False) and not getattr(args, "output", None):
        on_terminal = os.isatty(2)
        return (_terminal if on_terminal else None), (_terminal if on_terminal else _gdb_stderr)
    return _gdb_stderr, _gdb_stderr


def frame(args: argparse.Namespace) -> Frame:
    side, warnings = side_streams(args)
    progress = render.Progress(side if settings.value("progress") else None)
    return Frame(progress, lambda warning: warnings(render.warning_line(warning) + "\n"), width(), paint)


def error_text(exc: HandleError) -> str:
    advice = ADVICE.get(exc.advice) if exc.advice else None
    return paint("error", render.error_line(f"{exc}; {advice}" if advice else str(exc)))


# --- the commands ----------------------------------------------------------------------------------

def run(command: Command, args: argparse.Namespace) -> None:
    if command.query is None:
        BODIES[command.name](args)
        return
    with commandspec.collector_paused():
        with session.open() as windows:
            output = command.query(windows, args, frame(args))
        if command.name == "info" and not args.json:
            output.text += "\n" + session.memory_text()
        side, _ = side_streams(args)
        commandspec.deliver(output, args, gdb.write, side or (lambda text: None))


class _GdbSubcommand(gdb.Command):
    def __init__(self, command: Command):
        self.command = command
        self.__doc__ = commandspec.help_text(command, f"{prefix.NAME} ")
        super().__init__(f"{prefix.NAME} {command.name}", gdb.COMMAND_DATA)

    def invoke(self, argument: str, from_tty: bool) -> None:
        self.dont_repeat()
        parser = Parser(self.command)
        commandspec.add_arguments(self.command, parser, READERS)
        try:
            run(self.command, parser.parse_args(gdb.string_to_argv(argument)))
        except _Done:
            return
        except HandleError as exc:
            raise gdb.GdbError(error_text(exc)) from None
        except (gdb.GdbError, KeyboardInterrupt):
            raise
        except gdb.error as exc:
            raise gdb.GdbError(f"{prefix.NAME} {self.command.name}: {exc}") from None
        except Exception as exc:   # a bug of ours: still one line, with what to report
            raise gdb.GdbError(f"{prefix.NAME} {self.command.name}: internal error {type(exc).__name__}: "
                               f"{exc}") from None

    def complete(self, text: str, word: str):
        from gdbhandles.gdb import completion
        return completion.candidates(self.command, session, text, word)


class _HandlePrefix(gdb.Command):
    def __init__(self):
        names = [c.name for c in commandspec.COMMANDS.values() if "gdb" in c.front_ends]
        self.__doc__ = (
            "Windows handle tables of a QEMU guest (attach with `target remote 127.0.0.1:PORT`).\n\n"
            f"Subcommands: {', '.join(names)} (`help {prefix.NAME} SUBCOMMAND` for each).\n"
            "Settings: `set handle profile FILE`, `set handle dtb ADDRESS`, `set handle kernel-base ADDRESS`,\n"
            "`set handle qmp SOCKET`, `set handle auto-pause on|off`, `set handle progress on|off`.\n"
            "Long walks: `set pagination off`.\n"
            "Note: replaces gdb's signal `handle` command while gdbhandles is loaded (GDBHANDLES_PREFIX=word\n"
            "before loading keeps it; see the README).")
        super().__init__(prefix.NAME, gdb.COMMAND_DATA, prefix=True)

    def invoke(self, argument: str, from_tty: bool) -> None:
        signal_line = prefix.signal_line_error(argument)
        if signal_line:
            raise gdb.GdbError(signal_line)
        if argument.strip():
            word = argument.split()[0]
            names = sorted(c.name for c in commandspec.COMMANDS.values() if "gdb" in c.front_ends)
            raise gdb.GdbError(f"{prefix.NAME}: unknown subcommand {render.escape(word)!r}; one of: "
                               f"{', '.join(names)}")
        gdb.execute(f"help {prefix.NAME}")


@body("version")
def version(args: argparse.Namespace) -> None:
    emit(version_text())


def register() -> None:
    """Create the `handle` prefix, every command declared for gdb, and the settings."""
    _HandlePrefix()
    for command in commandspec.COMMANDS.values():
        if "gdb" in command.front_ends:
            _GdbSubcommand(command)
    settings.register()
