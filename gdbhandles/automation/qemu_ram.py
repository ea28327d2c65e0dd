"""Guest RAM read straight from a local QEMU process (`/proc/PID/mem`): the fast path.

QEMU keeps each RAM block in one host mapping. Its monitor names the guest-physical RAM
ranges (`info mtree -f`) and the host address of any guest-physical address (`gpa2hva`), so
a guest-physical read is one `pread` of QEMU's memory. Nothing here trusts that mapping
blindly: `map_ram` checks both ends of every range with `gpa2hva` and compares sample pages
with a reference reader (QEMU's gdbstub or its monitor) before the reader is handed out.
The QEMU process is found from the socket gdb or QMP talks to (its peer), never by name.
"""

from __future__ import annotations

import bisect
import os
import re
import socket
import struct
from dataclasses import dataclass
from typing import Callable

from gdbhandles.errors import HandleError, UnreadablePage

__all__ = ["FastPathUnavailable", "QemuRam", "RamRange", "map_ram", "own_unix_peer_pid", "tcp_peer_pid",
           "unix_peer_pid", "xp_bytes"]

PAGE = 0x1000
SAMPLES_PER_RANGE = 4       # pages compared with the reference in each RAM range, besides its ends
FLAT_RAM = re.compile(r"\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (?:ram|rom|romd)\): (\S+)")


class FastPathUnavailable(HandleError):
    """The guest's RAM cannot be read from the QEMU process; the message says why."""


@dataclass(frozen=True)
class RamRange:
    """Guest-physical [start, end) held at host address `host` of the QEMU process."""
    start: int
    end: int
    host: int
    block: str


class QemuRam:
    """Physical reads from QEMU's own memory: `read(paddr, size) -> bytes` (a memory backend)."""

    def __init__(self, pid: int, ranges: list[RamRange]):
        self.pid = pid
        self.ranges = sorted(ranges, key=lambda r: r.start)
        self._starts = [r.start for r in self.ranges]
        self.verified = ""          # what map_ram compared, for `handle info`
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise FastPathUnavailable(f"no permission to read /proc/{pid}/mem ({exc.strerror})") from None

    def _range(self, paddr: int) -> RamRange | None:
        index = bisect.bisect_right(self._starts, paddr) - 1
        if index >= 0 and paddr < self.ranges[index].end:
            return self.ranges[index]
        return None

    def read(self, paddr: int, size: int) -> bytes:
        parts = []
        address, end = paddr, paddr + size
        while address < end:
            found = self._range(address)
            if found is None:
                raise UnreadablePage(address, "not guest RAM", physical=True)
            step = min(end, found.end) - address
            try:
                data = os.pread(self._fd, step, found.host + address - found.start)
            except OSError as exc:
                raise UnreadablePage(address, f"QEMU process memory: {exc.strerror}", physical=True) from None
            if len(data) != step:
                raise UnreadablePage(address + len(data), "QEMU process memory: short read", physical=True)
            parts.append(data)
            address += step
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- which process: the peer of a socket ------------------------------------------------------

def _tcp_table() -> list[tuple[tuple[str, int], tuple[str, int], int]]:
    """(local, remote, inode) of every TCP socket of this network namespace (IPv4 and IPv6)."""
    rows = []
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/net/{name}") as table:
                lines = table.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            rows.append((_endpoint(fields[1], family), _endpoint(fields[2], family), int(fields[9])))
    return rows


def _endpoint(text: str, family: int) -> tuple[str, int]:
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))     # per 32-bit word, host order
    host = socket.inet_ntop(family, raw)
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, int(port, 16)


def _sockets(pid: str) -> dict[int, int]:
    """{fd: socket inode} of process `pid` ("self": ours), as far as we may see them."""
    found = {}
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                found[int(fd)] = int(target[8:-1])
    except OSError:
        pass
    return found


def _owner(inode: int) -> int | None:
    """The process holding socket `inode` (that we may see), or None."""
    for pid in os.listdir("/proc"):
        if pid.isdigit() and inode in _sockets(pid).values():
            return int(pid)
    return None


def tcp_peer_pid(remote: tuple[str, int]) -> int:
    """The local process at the other end of this process's TCP connection to `remote`."""
    rows = _tcp_table()
    mine = set(_sockets("self").values())
    ours = [(local, rem) for local, rem, inode in rows if inode in mine and rem[1] == remote[1]]
    if not ours:
        raise FastPathUnavailable(f"no connection of ours to {remote[0]}:{remote[1]} found in /proc/net/tcp")
    for local, rem in ours:
        for peer_local, peer_remote, inode in rows:
            if peer_local == rem and peer_remote == local:
                if not inode:
                    raise FastPathUnavailable(f"the server at {rem[0]}:{rem[1]} has not accepted the "
                                              "connection yet")
                pid = _owner(inode)
                if pid is None:
                    raise FastPathUnavailable(f"the server at {rem[0]}:{rem[1]} belongs to a process "
                                              "this user cannot see")
                return pid
    raise FastPathUnavailable(f"the server at {remote[0]}:{remote[1]} is not a process on this host "
                              "(remote QEMU)")


def unix_peer_pid(path: str) -> int:
    """The process listening on unix socket `path` (SO_PEERCRED of a fresh connection)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError as exc:
            raise FastPathUnavailable(f"cannot connect to {path} ({exc.strerror})") from None
        return _peer_pid(probe)


def own_unix_peer_pid(path: str) -> int:
    """The process at the other end of this process's own connection to unix socket `path` (gdb's
    to QEMU's gdbstub): SO_PEERCRED of that socket. A fresh connection would only queue behind
    gdb's, the stub serving one client."""
    try:
        wanted = os.stat(path)
    except OSError as exc:
        raise FastPathUnavailable(f"gdb's socket {path}: {exc.strerror}") from None
    for fd in _sockets("self"):
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.family != socket.AF_UNIX or not isinstance(peer := sock.getpeername(), str) or not peer:
                    continue
                if os.path.samestat(os.stat(peer), wanted):
                    return _peer_pid(sock)
        except OSError:
            continue            # closed meanwhile, not connected, or a peer path we cannot stat
    raise FastPathUnavailable(f"no connection of ours to {path} found")


def _peer_pid(sock: socket.socket) -> int:
    """The pid at the other end of a connected unix socket (SO_PEERCRED: pid, uid, gid)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def check_owner(pid: int) -> None:
    """Same uid as ours, or we are root: else one line saying who owns QEMU."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        raise FastPathUnavailable(f"QEMU process {pid} is gone") from None
    if os.geteuid() not in (0, uid):
        raise FastPathUnavailable(f"QEMU (pid {pid}) runs as uid {uid}, gdb as uid {os.geteuid()}")


# --- where the RAM is: the monitor's answers, checked ------------------------------------------

def flat_ranges(mtree: str) -> list[tuple[int, int, str]]:
    """(start, end, block) of RAM/ROM in the flat view of the "memory" address space."""
    result: list[tuple[int, int, str]] = []
    inside = False
    for line in mtree.splitlines():
        if line.startswith("FlatView"):
            inside = False
        elif line.startswith(' AS "memory"'):
            inside = True
        elif inside and (found := FLAT_RAM.match(line)):
            result.append((int(found.group(1), 16), int(found.group(2), 16) + 1, found.group(3)))
    return result


def _host(monitor: Callable[[str], str], paddr: int) -> int | None:
    found = re.search(r"Host virtual address for 0x[0-9a-f]+ \((\S+)\) is (0x[0-9a-f]+)", monitor(f"gpa2hva {paddr:#x}"))
    return int(found.group(2), 16) if found else None


def _merge(ranges: list[RamRange]) -> list[RamRange]:
    """Neighbours that are contiguous both in the guest and in QEMU become one range."""
    merged: list[RamRange] = []
    for r in ranges:
        last = merged[-1] if merged else None
        if last and last.end == r.start and last.host + (last.end - last.start) == r.host and last.block == r.block:
            merged[-1] = RamRange(last.start, r.end, last.host, last.block)
        else:
            merged.append(r)
    return merged


def _samples(r: RamRange) -> list[int]:
    pages = (r.end - r.start) // PAGE
    picks = {0, pages - 1} | {pages * i // (SAMPLES_PER_RANGE + 1) for i in range(1, SAMPLES_PER_RANGE + 1)}
    return [r.start + p * PAGE for p in sorted(picks) if 0 <= p < pages]


def map_ram(pid: int, monitor: Callable[[str], str], reference: Callable[[int, int], bytes],
            extra_pages: tuple[int, ...] = ()) -> QemuRam:
    """A QemuRam for QEMU process `pid`, every range checked: both ends by `gpa2hva`, sample
    pages (and `extra_pages`, e.g. the page tables) byte for byte against `reference`."""
    check_owner(pid)
    ranges = []
    for start, end, block in flat_ranges(monitor("info mtree -f")):
        host, last = _host(monitor, start), _host(monitor, end - 1)
        if host is None or last != host + (end - 1 - start):
            raise FastPathUnavailable(f"QEMU's monitor gives no contiguous host mapping for {start:#x}-{end:#x} ({block})")
        ranges.append(RamRange(start, end, host, block))
    if not ranges:
        raise FastPathUnavailable("QEMU's monitor lists no guest RAM (info mtree -f)")
    ram = QemuRam(pid, _merge(ranges))
    try:
        pages = [p for r in ram.ranges for p in _samples(r)]
        pages += [p & ~(PAGE - 1) for p in extra_pages if ram._range(p) is not None]
        nonzero = 0
        for page in pages:
            try:
                mine = ram.read(page, PAGE)
            except UnreadablePage as exc:
                raise FastPathUnavailable(f"process {pid} does not hold the guest RAM QEMU reports "
                                          f"(a proxy or a remote QEMU?): {exc}") from None
            if mine != reference(page, PAGE):
                raise FastPathUnavailable(f"page {page:#x} read from process {pid} differs from the stub's "
                                          "(a proxy or a remote QEMU?)")
            nonzero += any(mine)
        ram.verified = f"{len(pages)} pages equal to the reference reads ({nonzero} not all zero)"
    except BaseException:
        ram.close()
        raise
    return ram


def xp_bytes(monitor: Callable[[str], str], paddr: int, size: int) -> bytes:
    """`size` bytes (a multiple of 8) at a guest-physical address through the monitor's `xp`."""
    text = monitor(f"xp /{size // 8}gx {paddr:#x}")
    words = [int(w, 16) for line in text.splitlines() if ":" in line for w in line.split(":", 1)[1].split()]
    if len(words) != size // 8:
        raise FastPathUnavailable(f"QEMU's monitor did not read {size} bytes at {paddr:#x}")
    return struct.pack(f"<{len(words)}Q", *words)
