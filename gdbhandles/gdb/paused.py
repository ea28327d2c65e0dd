"""A running guest seen through QMP: pause the VM, read a private RAM dump, resume it.

The rule (measured on QEMU 7.2, see README): a QMP `stop` is always safe — if gdb believes
the target runs, QEMU sends gdb a stop reply and gdb reports a SIGINT stop. A QMP `cont`
behind gdb's back is not: gdb's next packet would stall 2 s and leave the two out of step. So
whenever gdb is attached, resuming goes through gdb (`continue &`); QMP `cont` is only used
when no gdb target is connected. A VM that was already paused stays paused. Auto-pause avoids
both where it can: QMP's hold (hold.py) pauses in a run state the gdbstub does not report, and
QEMU itself resumes the VM when the hold ends, so gdb never sees a stop.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import gdb

from gdbhandles.automation import hold, private
from gdbhandles.automation.guardian import DUMP_PREFIX, Guardian
from gdbhandles.automation.qmp import LOW_RAM_LIMIT, Qmp, QmpError
from gdbhandles.gdb import settings
from gdbhandles.windows.memory import DumpFile

__all__ = ["gdb_state", "monitor", "paused_dump", "paused_vm", "prompt_after_stop", "ram_dump", "resume"]


def monitor() -> Qmp:
    address = settings.value("qmp")
    if not address:
        raise QmpError("no QMP socket: set handle qmp /path/to/qmp.sock (QEMU -qmp unix:PATH,server=on,wait=off)")
    return Qmp(address)


def gdb_state() -> str:
    """'none' (no target), 'running' or 'stopped', as gdb believes."""
    thread = gdb.selected_thread()
    if gdb.selected_inferior().pid == 0 or thread is None:
        return "none"
    return "running" if thread.is_running() else "stopped"


def _show_prompt() -> None:
    """gdb takes the stop our QMP `stop` caused only after the command returned, so its "Program
    received signal SIGINT" lands after the prompt: show the prompt again below it (on a
    terminal; MI and scripts have no prompt to restore)."""
    if os.isatty(0) and os.isatty(1):
        gdb.write(gdb.parameter("prompt") or "")
        gdb.flush()


_after_stop: list = []          # what to do once the deferred resume ran (tell the guardian)


def _continue_after_stop(event) -> None:
    """gdb has taken the stop our QMP `stop` caused: resume through gdb, once."""
    gdb.events.stop.disconnect(_continue_after_stop)

    def resume_and_prompt() -> None:
        try:
            gdb.execute("continue &")
            _show_prompt()
        finally:
            while _after_stop:
                _after_stop.pop()()
    gdb.post_event(resume_and_prompt)


def _prompt_after_stop(event) -> None:
    gdb.events.stop.disconnect(_prompt_after_stop)
    gdb.post_event(_show_prompt)


def prompt_after_stop() -> None:
    """After `handle pause` of a target gdb believes running: the prompt again below the stop."""
    gdb.events.stop.connect(_prompt_after_stop)


def resume(q: Qmp, then=lambda: None) -> None:
    """Resume the VM as the rule says; `then()` once the resume is under way."""
    state = gdb_state()
    if state == "none":
        q.cont()
    elif state == "stopped":
        gdb.execute("continue &")
    else:           # gdb still has to take the stop QEMU sent it; resume right after
        _after_stop.append(then)
        gdb.events.stop.connect(_continue_after_stop)
        return
    then()


def _interrupted_dump(directory: str) -> None:
    gdb.write("gdbhandles: interrupted; QEMU cannot cancel the RAM dump it is writing: the VM "
              "resumes once it has finished (the partial dump is removed)\n", gdb.STDERR)
    gdb.flush()
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def ram_dump(q: Qmp):
    """The paused VM's RAM as a DumpFile in a private directory, removed afterwards."""
    size = q.ram_size()
    if size > LOW_RAM_LIMIT:
        raise QmpError(f"guest RAM of {size >> 20} MiB: auto-pause dumps only guests below "
                       f"{LOW_RAM_LIMIT >> 20} MiB; stop the target in gdb instead")
    directory = private.make(DUMP_PREFIX)      # 0700, named with gdb's pid; dead gdbs' ones removed
    dump = None
    try:
        path = os.path.join(directory, "ram.raw")
        q.pmemsave(path, size, on_interrupt=lambda: _interrupted_dump(directory))
        dump = DumpFile(path)
        yield dump
    finally:
        if dump is not None:
            dump.close()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def paused_vm():
    """The VM paused for the time of the block (yields the QMP connection) and resumed after
    (also on error or Ctrl-C) unless it was paused before. Over a unix socket the pause is QMP's
    hold (hold.py), which gdb does not see: the command's output is all it prints. Over TCP it is
    a QMP `stop`, which gdb reports as a SIGINT stop after the command, resumed through gdb."""
    q = monitor()
    guardian = None
    try:
        if q.status() != "running":
            yield q
            return
        guardian = Guardian(q.address)       # resumes the VM if gdb dies before the finally below
        if hold.can_hold(q):
            with hold.held(q):
                yield q
            guardian.done()
            return
        q.stop()
        try:
            yield q
        finally:
            resume(q, then=guardian.done)
    except BaseException:
        if guardian is not None and not _after_stop:
            guardian.done()         # the pause never began or resume() failed: it must not wait for ever
        raise
    finally:
        q.close()


@contextlib.contextmanager
def paused_dump():
    """The VM's RAM as a DumpFile, the VM paused for the time of the block (see paused_vm)."""
    with paused_vm() as q, ram_dump(q) as dump:
        yield dump
