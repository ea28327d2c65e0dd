"""`gdbhandles` on the shell: the engine on a raw physical memory dump.

A small argparse dispatcher: each subcommand is an `arguments(parser)` and a `run(args)`
registered with `command()`; other modules add theirs (run, snapshot, regress) the same way.
Errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gdbhandles import render
from gdbhandles.errors import HandleError
from gdbhandles.windows.memory import DumpFile

EXIT_ERROR = 2


@dataclass
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register `gdbhandles NAME` (a decorator on its run function)."""
    def register(run):
        COMMANDS[name] = Command(name, help, arguments, run)
        return run
    return register


def number(text: str) -> int:
    """Decimal or 0x-hex; negative values wrap to 64 bits (-1 = 0xffffffffffffffff)."""
    try:
        return int(text, 0) & ((1 << 64) - 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None


def process(text: str) -> int | str:
    try:
        return int(text, 0)
    except ValueError:
        return text


def _dump_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dump", required=True, metavar="FILE", help="raw physical memory dump (pmemsave)")
    parser.add_argument("--dtb", type=number, help="kernel DTB (physical PML4 address) instead of discovery")
    parser.add_argument("--kernel-base", type=number, help="ntoskrnl base address instead of discovery")
    parser.add_argument("--profile", metavar="ISF", help="volatility3 ISF for a build gdbhandles does not ship")
    parser.add_argument("--json", action="store_true", help="one JSON list in the truth.json record shape")


class Progress:
    """Throttled progress lines on stderr, only when stderr is a terminal."""

    def __init__(self, every: float = 0.5):
        self.enabled = sys.stderr.isatty()
        self.every = every
        self.last = time.monotonic()

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            sys.stderr.write(f"\r{message[:100]:<100}")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")


def open_dump(args: argparse.Namespace, progress=None):
    from gdbhandles.engine import Windows
    try:
        phys = DumpFile(args.dump)
    except OSError as exc:
        raise HandleError(f"cannot open dump {args.dump}: {exc.strerror}") from None
    return Windows.open(phys, dtb=args.dtb, kernel_base=args.kernel_base, isf=args.profile, progress=progress)


def _walk_arguments(parser):
    _dump_arguments(parser)
    parser.add_argument("target", nargs="?", default="all", help="pid, image name, or all (default)")
    parser.add_argument("--type", help="only objects of this type (File, Key, Event …)")
    parser.add_argument("--name", help="only objects whose name contains this text")


@command("walk", "list the handles of one process or of all", _walk_arguments)
def walk(args):
    progress = Progress()
    started = time.monotonic()
    windows = open_dump(args, progress)
    target = None if args.target == "all" else process(args.target)
    records = list(windows.walk(target, type=args.type, name=args.name, progress=progress))
    progress.done()
    print(render.handles_json(records) if args.json else render.handles_table(records))
    summary = render.walk_summary(records, time.monotonic() - started, windows.info().stats)
    print(summary, file=sys.stderr if args.json else sys.stdout)
    for warning in windows.warnings:
        print(f"warning: pid {warning.pid} ({warning.process}): {warning.message}", file=sys.stderr)


def _lookup_arguments(parser):
    _dump_arguments(parser)
    parser.add_argument("pid", type=process, help="pid (decimal or 0x-hex) or a unique image name")
    parser.add_argument("handle", type=number, help="handle value (hex or decimal); kernel handles "
                        "as 0x80000004 or 0xffffffff80000004")


@command("lookup", "show what one handle refers to", _lookup_arguments)
def lookup(args):
    record = open_dump(args).lookup(args.pid, args.handle)
    print(render.lookup_json([record]) if args.json else render.lookup_text(record))


@command("ps", "list the processes (pid, name, EPROCESS, handle count, table level)", _dump_arguments)
def ps(args):
    records = open_dump(args).processes()
    print(render.processes_json(records) if args.json else render.processes_table(records))


@command("info", "show what was detected: build, GUID, kernel base, DTB, layout, globals", _dump_arguments)
def info(args):
    record = open_dump(args).info()
    print(render.info_json(record) if args.json else render.info_text(record))


# --- scripted runs against QEMU (runner.py, regress.py) ---------------------------------------

def _vm_arguments(parser: argparse.ArgumentParser, snapshot_required: bool = False) -> None:
    parser.add_argument("--qemu", metavar="ARGS", help="QEMU's arguments for the machine (quoted; gdbhandles adds "
                        "-gdb tcp:127.0.0.1:PORT, a private QMP socket and -loadvm)")
    parser.add_argument("--snapshot", required=snapshot_required, metavar="NAME",
                        help="start from this snapshot of the qcow2 disk (QEMU stays paused there)")
    parser.add_argument("--gdb", metavar="HOST:PORT", help="attach to a running QEMU's gdbstub instead of --qemu")
    parser.add_argument("--qmp", metavar="SOCKET", help="with --gdb: that QEMU's QMP socket")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    _vm_arguments(parser)
    parser.add_argument("commands", nargs="+", metavar="CMD",
                        help="handle commands after --, e.g. -- \"walk all\" \"ps\" (JSON is printed)")


@command("run", "boot QEMU (or attach), run handle commands in gdb, print their JSON", _run_arguments)
def run(args):
    from gdbhandles.automation import runner
    with runner.session(args.qemu, args.snapshot, args.gdb, args.qmp) as gdb:
        results = runner.run_commands(gdb, args.commands)
    print(json.dumps(results[0] if len(results) == 1 else results, indent=1))


def _snapshot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qemu", metavar="ARGS", help="boot this machine, let it run --wait seconds, then save")
    parser.add_argument("--qmp", metavar="SOCKET", help="instead: the QMP socket of a running QEMU")
    parser.add_argument("--name", required=True, help="snapshot name")
    parser.add_argument("--wait", type=float, default=2.0, help="seconds to let a booted machine run (default 2)")
    parser.add_argument("--disk", metavar="NODE", help="qcow2 block node for the snapshot (default: the first)")


@command("snapshot", "save a snapshot of a running VM into its qcow2 disk (QMP)", _snapshot_arguments)
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


def _regress_arguments(parser: argparse.ArgumentParser) -> None:
    _vm_arguments(parser)
    parser.add_argument("--expect", required=True, metavar="GOLDEN", help="golden JSON (handle walk all --json)")
    parser.add_argument("--update", action="store_true", help="write the golden file from this run")


@command("regress", "walk all handles of a snapshot and compare with a golden file (exit 0 same, 1 differs, "
         "2 error)", _regress_arguments)
def regress_command(args):
    from gdbhandles.automation import regress, runner
    if not args.update:
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


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A command that takes none."""


@command("gdbinit", "print the path of the gdbinit.py to load in gdb: gdb -x \"$(gdbhandles gdbinit)\"",
         _no_arguments)
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
    for spec in COMMANDS.values():
        spec.arguments(sub.add_parser(spec.name, help=spec.help, description=spec.help))
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args) or 0
    except HandleError as exc:
        print(f"gdbhandles: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("gdbhandles: interrupted", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
