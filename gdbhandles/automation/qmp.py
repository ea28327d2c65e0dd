"""QEMU's monitor (QMP) through qemu.qmp: run state, pause/resume, RAM dumps, snapshots.

Synchronous wrappers, each failure one `QmpError` line that says what to fix. Addresses are a
unix socket path or `tcp:127.0.0.1:PORT`.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time

from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from gdbhandles.errors import HandleError

TIMEOUT = 10.0                 # seconds for one command (a 4 GiB pmemsave takes about 8)
LOW_RAM_LIMIT = 0xB0000000     # the pc machine puts RAM above this beyond 4 GiB


class QmpError(HandleError):
    """QMP failed: socket missing, permission denied, not a QMP server, QEMU gone, refused."""


def _address(address: str):
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        if host not in ("127.0.0.1", "localhost", "::1") or not port.isdigit():
            raise QmpError(f"QMP address {address}: use a unix socket or tcp:127.0.0.1:PORT")
        return host, int(port)
    try:
        mode = os.stat(address).st_mode
    except FileNotFoundError:
        raise QmpError(f"QMP socket {address}: no such file (is QEMU running with -qmp unix:{address},"
                       "server=on,wait=off?)") from None
    except PermissionError:
        raise QmpError(f"QMP socket {address}: permission denied") from None
    if not stat.S_ISSOCK(mode):
        raise QmpError(f"QMP socket {address}: not a socket")
    return address


class Qmp:
    """One QMP connection (QEMU serves one client per monitor: close it when done)."""

    def __init__(self, address: str):
        self.address = address
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)   # its tracebacks on EOF are noise
        self.monitor = QEMUMonitorProtocol(_address(address))
        try:
            self.monitor.connect(negotiate=True)
        except (QMPError, OSError, EOFError) as exc:
            self._drop()
            cause = getattr(exc, "exc", exc)          # qemu.qmp wraps the socket error
            if isinstance(cause, PermissionError):
                raise QmpError(f"QMP socket {address}: permission denied") from None
            if isinstance(cause, (ConnectionRefusedError, FileNotFoundError)):
                raise QmpError(f"QMP socket {address}: nobody listens (QEMU gone?)") from None
            raise QmpError(f"{address} is not a QMP server or is busy with another client "
                           f"({type(cause).__name__})") from None
        self.monitor.settimeout(TIMEOUT)

    def __enter__(self) -> "Qmp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _drop(self) -> None:
        try:
            self.monitor.close()
        except Exception:       # noqa: BLE001 - closing a dead connection
            pass

    def close(self) -> None:
        self._drop()

    def execute(self, command: str, **arguments):
        try:
            return self.monitor.cmd(command, **arguments)
        except ExecuteError as exc:
            raise QmpError(f"QMP {command} refused: {exc}") from None
        except (QMPError, OSError, EOFError, socket.timeout) as exc:
            raise QmpError(f"QMP {command} failed: QEMU gone or not answering ({type(exc).__name__})") from None

    def status(self) -> str:
        """running, paused, debug, prelaunch, …"""
        return self.execute("query-status")["status"]

    def stop(self) -> None:
        self.execute("stop")

    def cont(self) -> None:
        self.execute("cont")

    def ram_size(self) -> int:
        return self.execute("query-memory-size-summary")["base-memory"]

    def pmemsave(self, path: str, size: int) -> None:
        """Guest RAM from physical 0 into `path` (QEMU writes it; the VM should be paused)."""
        self.execute("pmemsave", val=0, size=size, filename=path)

    def hmp(self, line: str) -> str:
        return self.execute("human-monitor-command", **{"command-line": line})

    def snapshot_save(self, tag: str, disk: str) -> None:
        """savevm into the qcow2 node `disk` as a job, waited for."""
        job = f"save-{tag}-{os.getpid()}"
        self.execute("snapshot-save", **{"job-id": job, "tag": tag, "vmstate": disk, "devices": [disk]})
        self._wait_job(job)

    def _wait_job(self, job: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for info in self.execute("query-jobs"):
                if info["id"] == job and info["status"] == "concluded":
                    self.execute("job-dismiss", id=job)
                    if info.get("error"):
                        raise QmpError(f"QMP snapshot job {job} failed: {info['error']}")
                    return
            time.sleep(0.02)
        raise QmpError(f"QMP job {job} did not finish within 60 s")

    def block_nodes(self) -> list[str]:
        """qcow2 node names (where snapshots go)."""
        return [n["node-name"] for n in self.execute("query-named-block-nodes")
                if n.get("drv") == "qcow2" and n.get("node-name")]
