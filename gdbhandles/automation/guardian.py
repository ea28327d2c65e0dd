"""The guardian of a pause: resumes the VM (and removes its RAM dump) if gdb dies while the VM
is paused by gdbhandles.

gdb's Python pauses the VM through QMP and resumes it in a `finally`; a SIGKILL or a SIGHUP of
gdb skips that, and QEMU does not resume a VM when its gdbstub client vanishes. So while a pause
lasts, a small process watches a pipe from gdb: "done" means the pause ended normally; end of
file without it means gdb is gone. Then (and only then: QMP serves one client at a time, and
gdb's connection closes with gdb) it connects, resumes a paused VM with QMP `cont` (safe: no
gdb is attached any more) and removes the RAM dump directories of dead owners (private.py).

    python -m gdbhandles.automation.guardian QMP_ADDRESS
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from gdbhandles.automation import private
from gdbhandles.automation.qmp import Qmp, QmpError

__all__ = ["Guardian"]

DONE = b"done\n"
DUMP_PREFIX = "gdbhandles-dump-"       # auto-pause RAM dumps: private.make(DUMP_PREFIX)
RECONNECT_FOR = 30.0            # seconds to wait for QEMU's monitor to serve us after gdb died


class Guardian:
    """The parent's side: start() when the VM is paused, done() when the pause ended normally."""

    def __init__(self, qmp: str):
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        python = os.path.join(sys.base_exec_prefix, "bin", version)
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                        os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen([python if os.path.exists(python) else sys.executable, "-m",
                                         "gdbhandles.automation.guardian", qmp],
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=env, start_new_session=True)     # gdb's Ctrl-C is not for it
        self.released = False

    def done(self) -> None:
        """The pause ended normally (the VM is resumed or was paused before): let it go (it exits
        at once; subprocess reaps it with the next one)."""
        if self.released:
            return
        self.released = True
        try:
            self.process.stdin.write(DONE)
            self.process.stdin.close()
        except OSError:
            pass


def _resume(address: str) -> str:
    deadline = time.monotonic() + RECONNECT_FOR
    while True:
        try:
            with Qmp(address, connect_timeout=2.0) as q:
                if q.status() in ("paused", "debug"):
                    q.cont()
                    return "resumed"
                return "not paused"
        except QmpError as exc:
            if time.monotonic() > deadline or "no such file" in str(exc) or "nobody listens" in str(exc):
                return f"not resumed: {exc}"
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    owner = os.getppid()                     # gdb
    message = sys.stdin.buffer.read()        # until gdb writes "done" or dies
    if message == DONE:
        return 0
    result = _resume(argv[0])
    private.remove_stale(DUMP_PREFIX, owner=owner)
    return 1 if result.startswith("not resumed") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
