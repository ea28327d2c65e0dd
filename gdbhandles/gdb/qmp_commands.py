"""`handle pause|resume|vmstatus`: QEMU's run state through QMP, kept in step with gdb's
(the rule is in paused.py)."""

from __future__ import annotations

from gdbhandles.gdb.commands import body, emit
from gdbhandles.gdb.paused import gdb_state, monitor, prompt_after_stop, resume


@body("pause")
def pause(args) -> None:
    with monitor() as q:
        if q.status() == "running":
            q.stop()
            if gdb_state() == "running":
                prompt_after_stop()
                emit("VM paused (gdb reports the stop)")
            else:
                emit("VM paused")
        else:
            status = q.status()
            emit("VM already paused" if status == "paused" else f"VM not running (QEMU status: {status})")


@body("resume")
def resume_command(args) -> None:
    with monitor() as q:
        status = q.status()
        if status == "running" and gdb_state() != "stopped":
            emit("VM already running")
            return
        emit("VM resumed" + (" (through gdb)" if gdb_state() != "none" else " (through QMP)"))
        resume(q)          # after the message: gdb's `continue &` ends the command's output


@body("vmstatus")
def vmstatus(args) -> None:
    with monitor() as q:
        emit(f"QEMU: {q.status()}; gdb: {gdb_state()}")
