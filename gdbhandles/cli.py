"""`gdbhandles` on the shell, built from the declarations of commandspec.py.

The engine commands read a raw physical memory dump (`--dump FILE`); run, snapshot and
regress drive QEMU and gdb. Errors are one line on stderr with advice that works on the
shell, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from gdbhandles import commandspec, render
from gdbhandles.commandspec import Argument, Command, Frame, Kind
from gdbhandles.errors import Advice, HandleError
from gdbhandles.windows.memory import DumpFile

EXIT_ERROR = 2
ADVICE = {Advice.LIST_PROCESSES: "`gdbhandles ps --dump FILE` lists them",
          Advice.LOCATE_KERNEL: "give them yourself: --dtb ADDRESS, --kernel-base ADDRESS",
          Advice.SUPPLY_PROFILE: "supply a volatility3 ISF: --profile FILE"}
ANSI = {"header": "\x1b[1m", "type": "\x1b[36m"}
DUMP = (Argument("--dump", "raw physical memory dump (pmemsave)", required=True, metavar="FILE"),
        Argument("--dtb", "kernel DTB (physical PML4 address) instead of discovery", Kind.NUMBER,
                 metavar="ADDRESS"),
        Argument("--kernel-base", "ntoskrnl base address instead of discovery", Kind.NUMBER, metavar="ADDRESS"),
        Argument("--profile", "volatility3 ISF for a build gdbhandles does not ship", metavar="ISF"),
        Argument("--layout", "auto (shipped layout or ISF, else inferred) or infer (structure offsets derived "
                             "from the kernel's code and live data, shipped layouts ignored)", default="auto",
                 metavar="auto|infer"))
BODIES: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def body(name: str):
    """The shell body of a declared command without an engine query."""
    def bind(run):
        BODIES[name] = run
        return run
    return bind


def paint(role: str, text: str) -> str:
    """Colours on a terminal, unless NO_COLOR is set."""
    if role in ANSI and sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        return f"{ANSI[role]}{text}\x1b[0m"
    return text


def frame() -> Frame:
    terminal = sys.stdout.isatty()
    progress = render.Progress(sys.stderr.write if sys.stderr.isatty() else None)
    return Frame(progress, lambda w: print(render.warning_line(w), file=sys.stderr),
                 shutil.get_terminal_size().columns if terminal else None, paint)


def _layout(text: str) -> str:
    if text not in ("auto", "infer"):
        raise HandleError(f"--layout {text}: give auto or infer")
    return text


def open_dump(args: argparse.Namespace, progress=None):
    from gdbhandles.engine import Windows
    try:
        phys = DumpFile(args.dump)
    except OSError as exc:
        raise HandleError(f"cannot open dump {args.dump}: {exc.strerror}") from None
    if phys.size == 0:
        raise HandleError(f"dump {args.dump} is empty")
    return Windows.open(phys, dtb=args.dtb, kernel_base=args.kernel_base, isf=args.profile, progress=progress,
                        layout=_layout(args.layout))


def run_query(command: Command, args: argparse.Namespace) -> None:
    shown = frame()
    with commandspec.collector_paused():
        windows = open_dump(args, shown.progress)
        output = command.query(windows, args, shown)
        commandspec.deliver(output, args, sys.stdout.write, sys.stderr.write)


# --- scripted runs against QEMU (automation/runner.py, regress.py) ---------------------------------

@body("run")
def run(args):
    from gdbhandles.automation import runner
    with runner.session(args.qemu, args.snapshot, args.gdb, args.qmp) as gdb:
        results = runner.run_commands(gdb, args.commands)
    print(json.dumps(results[0] if len(results) == 1 else results, indent=1))


@body("snapshot")
def snapshot(args):
    from gdbhandles.automation import runner
    from gdbhandles.automation.qmp import Qmp
    if bool(args.qemu) == bool(args.qmp):
        raise HandleError("give either --qemu \"<qemu arguments>\" or --qmp SOCKET")
    if args.qmp:
        with Qmp(args.qmp) as q:
            node = runner.save_snapshot(q, args.name, args.disk)
    else:
        with runner.qemu(runner.qemu_arguments(args.qemu)) as vm:
            time.sleep(args.wait)
            with Qmp(vm.qmp) as q:
                node = runner.save_snapshot(q, args.name, args.disk)
    print(f"snapshot {args.name} saved in {node}", file=sys.stderr)


@body("regress")
def regress_command(args):
    from gdbhandles.automation import regress, runner
    if args.update:
        regress.check_writable(args.expect)
    else:
        expected = regress.load(args.expect)
    with runner.session(args.qemu, args.snapshot, args.gdb, args.qmp) as gdb:
        actual, = runner.run_commands(gdb, ["walk all"])
    if args.update:
        regress.save(args.expect, actual)
        print(f"{args.expect}: {len(actual)} handles written", file=sys.stderr)
        return 0
    diff = regress.compare(expected, actual)
    if diff:
        print(regress.report(diff))
        return 1
    print(f"{len(actual)} handles as expected", file=sys.stderr)
    return 0


@body("gdbinit")
def gdbinit(args):
    print(Path(__file__).resolve().parent / "gdbinit.py")


class _Version(argparse.Action):
    """--version: the text as written (argparse's own action rewraps it)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from gdbhandles.version import version_text
        print(version_text())
        parser.exit()


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="gdbhandles", description="Windows x64 handle tables of QEMU guests.")
    top.add_argument("--version", action=_Version, help="print the version and the layout data's provenance")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commandspec.COMMANDS.values():
        if "cli" not in command.front_ends:
            continue
        example = f"gdbhandles {command.name}" + (" --dump ram.raw" if command.guest else "") + \
            command.example[len(command.name):]
        one = sub.add_parser(command.name, help=command.summary, description=command.summary,
                             epilog=f"Example: {example}")
        if command.guest:
            commandspec.add_arguments(Command(command.name, "", "", DUMP), one)
        commandspec.add_arguments(command, one)
    return top


def error_text(exc: HandleError) -> str:
    advice = ADVICE.get(exc.advice) if exc.advice else None
    return render.error_line(f"{exc}; {advice}" if advice else str(exc))


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (what `timeout`, CI job limits and a closed terminal send): unwinds like
    Ctrl-C, so every QEMU and gdb started here is stopped and its files removed."""


def _stop(signum, frame):
    for name in _SIGNALS:                  # the clean-up runs once and is not cut short
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Stopped(signal.Signals(signum).name)


_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


@contextlib.contextmanager
def _signals_unwind():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {name: signal.signal(getattr(signal, name), _stop) for name in _SIGNALS}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def _say(text: str) -> None:
    with contextlib.suppress(OSError):          # stderr may be gone with the terminal (SIGHUP)
        print(f"gdbhandles: {text}", file=sys.stderr)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe its reader has closed; another broken pipe (gdb's) is an error."""
    poll = select.poll()
    poll.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = commandspec.COMMANDS[args.command]
    with _signals_unwind():
        try:
            if command.query is not None:
                status = run_query(command, args) or 0
            else:
                status = BODIES[command.name](args) or 0
            sys.stdout.flush()               # a full disk or closed pipe is an error, not a traceback at exit
            return status
        except HandleError as exc:
            _say(error_text(exc))
        except Stopped as exc:
            _say("interrupted" if str(exc) == "SIGINT" else f"stopped by {exc}; what it started is stopped")
        except KeyboardInterrupt:
            _say("interrupted")
        except OSError as exc:
            if isinstance(exc, BrokenPipeError) and _stdout_closed():   # `| head`: the reader took what
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # it wanted; quiet, as
                return 128 + signal.SIGPIPE                                      # cat's SIGPIPE death
            _say(f"{exc.filename}: {exc.strerror or exc}" if exc.filename
                 else f"a peer closed its pipe: {exc.strerror}" if isinstance(exc, BrokenPipeError)
                 else f"cannot write the output: {exc.strerror or exc}")
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())     # nothing left to flush at exit
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
