"""The fast path in gdb: the QEMU process behind gdb's connection (or behind the QMP socket),
its RAM mapped through the monitor and checked against QEMU's own reads before it is used.

gdb's `monitor` only works while the target is stopped; a running target (auto-pause) asks
the same questions through QMP's human-monitor-command, and checks pages with `xp`.
"""

from __future__ import annotations

import os

import gdb

from gdbhandles.automation import qemu_ram
from gdbhandles.automation.qemu_ram import FastPathUnavailable, QemuRam
from gdbhandles.automation.qmp import Qmp

__all__ = ["from_qmp", "from_stub", "qmp_pid"]

PFN_MASK = 0x000F_FFFF_FFFF_F000


def _stub_pid() -> int:
    """The QEMU process at the other end of gdb's remote connection (a unix socket path, or
    HOST:PORT), or why there is none we can follow."""
    connection = gdb.selected_inferior().connection
    if connection is None or connection.type not in ("remote", "extended-remote"):
        raise FastPathUnavailable("gdb is not connected through the remote protocol")
    details = connection.details or ""
    path = os.path.expanduser(details.removeprefix("unix::"))
    if details.startswith("unix::") or os.path.exists(path):
        return qemu_ram.own_unix_peer_pid(path)
    text = details.split(":", 1)[1] if details.startswith(("tcp:", "tcp4:", "tcp6:")) else details
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not host:
        raise FastPathUnavailable(f"gdb's connection {details!r} is neither a unix nor a TCP socket")
    return qemu_ram.tcp_peer_pid((host.strip("[]"), int(port)))


def _monitor(command: str) -> str:
    return gdb.execute(f"monitor {command}", to_string=True)


def from_stub(reference, registers: list[dict]) -> QemuRam:
    """The RAM of the QEMU serving gdb's connection, checked against `reference(paddr, size)`
    (the stub in physical mode); the vCPUs' page-table roots are among the pages compared."""
    pid = _stub_pid()
    roots = tuple(r["cr3"] & PFN_MASK for r in registers if "cr3" in r)
    return qemu_ram.map_ram(pid, _monitor, reference, roots)


def from_qmp(q: Qmp) -> QemuRam:
    """The RAM of the QEMU behind the QMP socket, checked against the monitor's `xp` reads."""
    pid = qmp_pid(q)
    return qemu_ram.map_ram(pid, q.hmp, lambda paddr, size: qemu_ram.xp_bytes(q.hmp, paddr, size))


def qmp_pid(q: Qmp) -> int:
    """The QEMU process behind the QMP connection `q`."""
    address = q.address
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        return qemu_ram.tcp_peer_pid((host, int(port)))      # q's own connection
    return qemu_ram.unix_peer_pid(address)
