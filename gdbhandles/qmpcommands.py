"""`handle pause|resume|vmstatus` and auto-pause: QEMU's run state through QMP, kept in step
with gdb's.

The rule (measured on QEMU 7.2, see README): a QMP `stop` is always safe — if gdb believes
the target runs, QEMU sends gdb a stop reply and gdb reports a SIGINT stop. A QMP `cont`
behind gdb's back is not: gdb's next packet would stall 2 s and leave the two out of step. So
whenever gdb is attached, resuming goes through gdb (`continue &`); QMP `cont` is only used
when no gdb target is connected.

Auto-pause: a walk or lookup started while the guest runs pauses the VM through QMP, reads a
RAM dump QEMU writes into a private directory (gdb cannot read a running target), and has the
VM resumed — by gdb once it has taken the stop, or by QMP when gdb is not attached — also when
the command fails or is interrupted. A VM that was already paused stays paused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import gdb

from gdbhandles import commands
from gdbhandles.engine import Windows
from gdbhandles.errors import HandleError
from gdbhandles.memory import DumpFile
from gdbhandles.qmp import LOW_RAM_LIMIT, Qmp, QmpError


class AutoPauseParameter(commands.BooleanParameter):
    """Whether a walk or lookup of a running guest pauses the VM through QMP (set handle qmp first)."""

    set_doc = "Set whether walks of a running guest pause the VM through QMP."
    show_doc = "Show whether walks of a running guest pause the VM through QMP."
    name, shown_as = "auto-pause", "Auto-pause of a running guest through QMP"

    def get_set_string(self):
        if self.value and not commands.parameters["qmp"].value:
            return "auto-pause is on, but no QMP socket is set (set handle qmp SOCKET)"
        return ""


commands.SETTINGS["auto-pause"] = AutoPauseParameter


def monitor() -> Qmp:
    address = commands.parameters["qmp"].value
    if not address:
        raise QmpError("no QMP socket: set handle qmp /path/to/qmp.sock (QEMU -qmp unix:PATH,server=on,wait=off)")
    return Qmp(address)


def gdb_state() -> str:
    """'none' (no target), 'running' or 'stopped', as gdb believes."""
    thread = gdb.selected_thread()
    if gdb.selected_inferior().pid == 0 or thread is None:
        return "none"
    return "running" if thread.is_running() else "stopped"


def _continue_after_stop(event) -> None:
    """gdb has taken the stop our QMP `stop` caused: resume through gdb, once."""
    gdb.events.stop.disconnect(_continue_after_stop)
    gdb.post_event(lambda: gdb.execute("continue &"))


def resume(q: Qmp) -> None:
    state = gdb_state()
    if state == "none":
        q.cont()
    elif state == "stopped":
        gdb.execute("continue &")
    else:           # gdb still has to take the stop QEMU sent it; resume right after
        gdb.events.stop.connect(_continue_after_stop)


@contextlib.contextmanager
def ram_dump(q: Qmp):
    """The paused VM's RAM as a DumpFile in a private directory, removed afterwards."""
    size = q.ram_size()
    if size > LOW_RAM_LIMIT:
        raise QmpError(f"guest RAM of {size >> 20} MiB: auto-pause dumps only guests below "
                       f"{LOW_RAM_LIMIT >> 20} MiB; stop the target in gdb instead")
    directory = tempfile.mkdtemp(prefix="gdbhandles-")
    os.chmod(directory, 0o700)
    dump = None
    try:
        path = os.path.join(directory, "ram.raw")
        q.pmemsave(path, size)
        dump = DumpFile(path)
        yield dump
    finally:
        if dump is not None:
            dump.close()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def paused_view(session):
    """An engine over a RAM dump of the VM, paused for the time of the block."""
    q = monitor()
    try:
        paused_by_us = q.status() == "running"
        if paused_by_us:
            q.stop()
        try:
            with ram_dump(q) as dump:
                previous = session.windows.info() if session.windows is not None else None
                hints = {"dtb": previous.dtb, "kernel_base": previous.kernel_base} if previous else {}
                try:
                    windows = Windows.open(dump, isf=session.isf, **hints)
                except HandleError:
                    windows = Windows.open(dump, isf=session.isf)
                yield windows
        finally:
            if paused_by_us:
                resume(q)
    finally:
        q.close()


def running_view(session):
    """What the gdb session uses when the target runs: a paused view, or the usual error."""
    if not commands.parameters["auto-pause"].value:
        raise HandleError("the target is running: stop it first (Ctrl-C or `interrupt`), or let gdbhandles "
                          "pause it: set handle qmp SOCKET, set handle auto-pause on")
    return paused_view(session)


@commands.subcommand("pause", "Pause the VM through QMP (gdb then reports a SIGINT stop).", "handle pause")
def pause(args) -> None:
    with monitor() as q:
        if q.status() == "running":
            q.stop()
            commands.emit("VM paused" + (" (gdb reports the stop)" if gdb_state() == "running" else ""))
        else:
            commands.emit(f"VM already {q.status()}")


@commands.subcommand("resume", "Resume the VM: through gdb when it is attached, else through QMP.",
                     "handle resume")
def resume_command(args) -> None:
    with monitor() as q:
        status = q.status()
        if status == "running" and gdb_state() != "stopped":
            commands.emit("VM already running")
            return
        commands.emit("VM resumed" + (" (through gdb)" if gdb_state() != "none" else " (through QMP)"))
        resume(q)          # after the message: gdb's `continue &` ends the command's output


@commands.subcommand("vmstatus", "Show QEMU's run state (QMP query-status) and gdb's view of it.",
                     "handle vmstatus")
def vmstatus(args) -> None:
    with monitor() as q:
        commands.emit(f"QEMU: {q.status()}; gdb: {gdb_state()}")
