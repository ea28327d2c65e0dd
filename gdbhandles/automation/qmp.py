"""QEMU's monitor (QMP): run state, pause/resume, RAM dumps, snapshots.

A small synchronous client on a plain socket, so that every step has a time limit and a
Ctrl-C leaves nothing behind (qemu.qmp's asyncio loop had neither: a silent peer blocked for
ever and an interrupt printed "Task exception was never retrieved"). Each failure is one
`QmpError` line that says what to fix. Addresses are a unix socket path or
`tcp:127.0.0.1:PORT`.

Measured on QEMU 7.2: a monitor serves one client at a time. A second client's connect()
succeeds (the kernel queues it) but QEMU sends it no greeting until the first one leaves; when
that queue is full, connect() fails with EAGAIN. Both read as "busy with another client".
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time

from gdbhandles.errors import HandleError

CONNECT_TIMEOUT = 5.0          # seconds for connect + greeting + capabilities
TIMEOUT = 10.0                 # seconds for one command
PMEMSAVE_RATE = 64 << 20       # bytes per second we grant pmemsave on top of TIMEOUT (measured ~550)
JOB_TIMEOUT = 60.0             # seconds for a snapshot job
MAX_MESSAGE = 16 << 20         # no QMP answer we ask for is this long
STALE_EVENTS = 64              # events of an earlier client skipped before the greeting
LOW_RAM_LIMIT = 0xB0000000     # the pc machine puts RAM above this beyond 4 GiB


class QmpError(HandleError):
    """QMP failed: socket missing, permission denied, not a QMP server, busy, QEMU gone, refused,
    no answer in time."""


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


def _connected(address: str, where, timeout: float) -> socket.socket:
    """A connected socket; a full accept queue (EAGAIN) is retried until `timeout`."""
    family = socket.AF_UNIX if isinstance(where, str) else socket.AF_INET6 if ":" in where[0] else socket.AF_INET
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(where)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise QmpError(f"QMP socket {address}: busy with another client (QEMU serves one at a time; "
                               "close the other one)") from None
            time.sleep(0.02)
        except BaseException as exc:
            sock.close()
            raise _connect_error(address, exc) from None


def _connect_error(address: str, exc: BaseException) -> BaseException:
    if isinstance(exc, PermissionError):
        return QmpError(f"QMP socket {address}: permission denied")
    if isinstance(exc, (ConnectionRefusedError, FileNotFoundError)):
        return QmpError(f"QMP socket {address}: nobody listens (QEMU gone?)")
    if isinstance(exc, socket.timeout):
        return QmpError(f"QMP socket {address}: no connection within the time limit (busy with another client?)")
    if isinstance(exc, OSError):
        return QmpError(f"QMP socket {address}: cannot connect ({exc.strerror or exc})")
    return exc


class Qmp:
    """One QMP connection (QEMU serves one client per monitor: close it when done)."""

    def __init__(self, address: str, timeout: float = TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT):
        self.address = address
        self.timeout = timeout
        self._buffer = bytearray()
        self._id = 0
        self._pending = None            # the id of a command sent and not yet answered
        self.events: list[dict] = []       # events seen while waiting for answers, newest last
        self.sock = _connected(address, _address(address), connect_timeout)
        try:
            self._handshake(connect_timeout)
        except BaseException:
            self.close()
            raise

    def _handshake(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            greeting = self._message(deadline, "greeting")
            # QEMU's monitor keeps unsent output across clients: events queued for the one before
            # may come first (seen under load). The greeting follows them; the wait stays bounded.
            for _ in range(STALE_EVENTS):
                if not (isinstance(greeting, dict) and "event" in greeting):
                    break
                greeting = self._message(deadline, "greeting")
        except _Silent:
            raise QmpError(f"{self.address}: no QMP greeting within {timeout:g} s: QEMU's monitor is busy with "
                           "another client (it serves one at a time), or this is not a QMP server") from None
        if not isinstance(greeting, dict) or "QMP" not in greeting:
            raise QmpError(f"{self.address} is not a QMP server (its first message: {_short(greeting)})")
        self._command("qmp_capabilities", {}, timeout)

    def __enter__(self) -> "Qmp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        sock, self.sock = getattr(self, "sock", None), None
        if sock is not None:
            sock.close()

    # --- the wire: one JSON object per line ----------------------------------------------------

    def _message(self, deadline: float, what: str):
        """The next JSON message; _Silent if none arrives before `deadline`."""
        end = self._buffer.find(b"\n")
        while end < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Silent()
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise _Silent() from None
            except OSError as exc:
                raise QmpError(f"QMP {what}: connection lost ({exc.strerror or exc}; QEMU gone?)") from None
            if not chunk:
                raise QmpError(f"QMP {what}: {self.address} closed the connection (QEMU gone, or not QMP)")
            end = chunk.find(b"\n")
            end = end + len(self._buffer) if end >= 0 else -1
            self._buffer += chunk
            if end < 0 and len(self._buffer) > MAX_MESSAGE:
                raise QmpError(f"QMP {what}: answer longer than {MAX_MESSAGE >> 20} MiB (not a QMP server?)")
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        try:
            return json.loads(line)
        except ValueError:
            raise QmpError(f"{self.address} is not a QMP server (it sent {_short(line)})") from None

    def _command(self, command: str, arguments: dict, timeout: float, fd: int | None = None):
        """One command and its answer; `fd` goes along with it (SCM_RIGHTS, unix sockets)."""
        deadline = time.monotonic() + timeout
        self._id += 1
        request = {"execute": command, "id": self._id, **({"arguments": arguments} if arguments else {})}
        data = json.dumps(request).encode() + b"\n"
        try:
            self.sock.settimeout(timeout)
            sent = 0 if fd is None else socket.send_fds(self.sock, [data], [fd])
            self.sock.sendall(data[sent:])
        except OSError as exc:
            raise QmpError(f"QMP {command} failed: cannot send ({exc.strerror or exc}; QEMU gone?)") from None
        self._pending = self._id
        while True:
            try:
                reply = self._message(deadline, command)
            except _Silent:
                raise QmpError(f"QMP {command}: no answer within {timeout:g} s "
                               "(QEMU hangs, or this is not a QMP server)") from None
            if not isinstance(reply, dict) or not ({"return", "error", "event"} & reply.keys()):
                raise QmpError(f"QMP {command}: {self.address} is not a QMP server (it answered {_short(reply)})")
            if "event" in reply:
                self.events = [*self.events[-STALE_EVENTS:], reply]
                continue
            if reply.get("id") != self._id:
                continue                 # the late answer to an earlier command
            self._pending = None
            if "error" in reply:
                error = reply["error"]
                desc = error.get("desc", error) if isinstance(error, dict) else error
                raise QmpError(f"QMP {command} refused: {desc}")
            return reply["return"]

    def execute(self, command: str, timeout: float | None = None, **arguments):
        if self.sock is None:
            raise QmpError(f"QMP {command}: the connection is closed")
        return self._command(command, arguments, self.timeout if timeout is None else timeout)

    # --- what gdbhandles asks ------------------------------------------------------------------

    def status(self) -> str:
        """running, paused, debug, prelaunch, …"""
        return self.execute("query-status")["status"]

    def stop(self) -> None:
        self.execute("stop")

    def cont(self) -> None:
        self.execute("cont")

    def wait_event(self, name: str) -> None:
        """Wait (as long as for an answer) for event `name`, unless seen since self.events was cleared."""
        deadline = time.monotonic() + self.timeout
        while not any(event.get("event") == name for event in self.events):
            try:
                message = self._message(deadline, name)
            except _Silent:
                raise QmpError(f"QMP: no {name} event from QEMU within {self.timeout:g} s") from None
            if isinstance(message, dict) and "event" in message:
                self.events.append(message)

    def pass_fd(self, name: str, fd: int) -> None:
        """Give QEMU a copy of `fd` under `name` (QMP getfd; SCM_RIGHTS: a unix socket only)."""
        self._command("getfd", {"fdname": name}, self.timeout, fd=fd)

    def ram_size(self) -> int:
        return self.execute("query-memory-size-summary")["base-memory"]

    def pmemsave(self, path: str, size: int, on_interrupt=lambda: None) -> None:
        """Guest RAM from physical 0 into `path` (QEMU writes it; the VM should be paused).

        QEMU cannot cancel a pmemsave, and until it ends its main loop serves nothing else (a
        resume sent through gdb meanwhile times out, leaving QEMU paused and gdb believing it
        runs: measured with a 2 GiB guest). So a Ctrl-C runs `on_interrupt()` (say so, remove
        the partial file), waits for QEMU to finish, then propagates."""
        timeout = self.timeout + size / PMEMSAVE_RATE
        deadline = time.monotonic() + timeout
        try:
            self.execute("pmemsave", timeout=timeout, val=0, size=size, filename=path)
        except KeyboardInterrupt:
            on_interrupt()
            self._settle(deadline)
            raise

    def _settle(self, deadline: float) -> None:
        """Wait (until `deadline`, deaf to further Ctrl-C) for the answer to the command in
        flight; give up silently on a silent or lost peer (the caller reports the interrupt)."""
        while self._pending is not None:
            try:
                reply = self._message(deadline, "pending command")
            except KeyboardInterrupt:
                continue
            except (_Silent, QmpError):
                return
            if isinstance(reply, dict) and reply.get("id") == self._pending and "event" not in reply:
                self._pending = None

    def hmp(self, line: str) -> str:
        return self.execute("human-monitor-command", **{"command-line": line})

    def snapshot_save(self, tag: str, disk: str) -> None:
        """savevm into the qcow2 node `disk` as a job, waited for."""
        job = f"save-{tag}-{os.getpid()}"
        self.execute("snapshot-save", **{"job-id": job, "tag": tag, "vmstate": disk, "devices": [disk]})
        self._wait_job(job)

    def _wait_job(self, job: str) -> None:
        deadline = time.monotonic() + JOB_TIMEOUT
        while time.monotonic() < deadline:
            for info in self.execute("query-jobs"):
                if info["id"] == job and info["status"] == "concluded":
                    self.execute("job-dismiss", id=job)
                    if info.get("error"):
                        raise QmpError(f"QMP snapshot job {job} failed: {info['error']}")
                    return
            time.sleep(0.02)
        raise QmpError(f"QMP job {job} did not finish within {JOB_TIMEOUT:g} s")

    def block_nodes(self) -> list[str]:
        """qcow2 node names (where snapshots go)."""
        return [n["node-name"] for n in self.execute("query-named-block-nodes")
                if n.get("drv") == "qcow2" and n.get("node-name")]


class _Silent(Exception):
    """No complete message before the deadline."""


def _short(value) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else json.dumps(value)
    return ascii(text[:60] + ("…" if len(text) > 60 else ""))
