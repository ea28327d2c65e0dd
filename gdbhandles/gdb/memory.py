"""What gdb offers the engine: physical reads through QEMU's gdbstub, and vCPU registers.

QEMU's stub reads physical memory after `Qqemu.PhyMemMode:1`. The mode is per connection
and persists, so it is switched on once around a whole engine operation (`session()`) and
always switched off in `finally`. gdb's dcache would serve bytes read in the other mode,
so it is flushed on each switch. In physical mode QEMU returns zeros instead of errors
past RAM, so reads are checked against the RAM map QEMU's monitor reports.
"""

from __future__ import annotations

import contextlib
import re

import gdb

from gdbhandles.automation.qemu_ram import flat_ranges
from gdbhandles.errors import HandleError, UnreadablePage
from gdbhandles.windows.memory import MASK64

PAGE = 0x1000
REGISTERS = ("rip", "rsp", "cs", "ss", "eflags", "cr0", "cr3", "cr4", "efer",
             "fs_base", "gs_base", "k_gs_base")
LOW_MEMORY = 0x100000     # below 1 MiB QEMU's map has holes (VGA, ROMs); reads there are fine


class NoTarget(HandleError):
    """gdb is not connected to a target."""


class TargetRunning(HandleError):
    """All-stop gdb cannot read a running target."""


def require_stopped_target() -> gdb.InferiorThread:
    """The selected thread of a connected, stopped target, or a one-line error."""
    inferior = gdb.selected_inferior()
    thread = gdb.selected_thread()
    if inferior.pid == 0 or thread is None:
        raise NoTarget("no target: connect first with `target remote 127.0.0.1:PORT` (QEMU -gdb)")
    if thread.is_running():
        raise TargetRunning("the target is running: stop it first (Ctrl-C or `interrupt`)")
    return thread


def _packet(text: str) -> str | None:
    """Send one remote packet; the stub's reply, or None if gdb refuses or the stub does not know it."""
    try:
        out = gdb.execute(f"maintenance packet {text}", to_string=True)
    except gdb.error:
        return None
    found = re.search(r'received: "(.*)"', out)
    return found.group(1) if found else None


def ram_ranges() -> list[tuple[int, int]] | None:
    """Guest-physical RAM/ROM ranges [start, end) from `monitor info mtree -f`, adjacent ones
    merged; None if unknown."""
    try:
        text = gdb.execute("monitor info mtree -f", to_string=True)
    except gdb.error:
        return None
    ranges: list[tuple[int, int]] = []
    for start, end, _block in flat_ranges(text):
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges or None


class GdbPhysical:
    """Physical memory of the guest through QEMU's gdbstub: `read(paddr, size) -> bytes`."""

    round_trip_bytes = 512     # ~0.06 ms per packet ≈ 0.23 ms per 2 KiB: a trip is worth ~0.5 KiB

    def __init__(self):
        self.inferior = gdb.selected_inferior()
        reply = _packet("qqemu.PhyMemMode")
        self.supported = reply in ("0", "1")
        if reply == "1":           # left on by a crashed session: start from a clean state
            _packet("Qqemu.PhyMemMode:0")
        self.ram = ram_ranges() if self.supported else None
        self._depth = 0

    @contextlib.contextmanager
    def session(self):
        """Physical mode on for a whole walk; off again (and dcache flushed) whatever happens."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        if not self.supported:
            raise HandleError("this gdbstub has no physical memory mode (Qqemu.PhyMemMode): "
                              "gdbhandles needs QEMU's gdbstub")
        gdb.execute("maintenance flush dcache", to_string=True)
        if _packet("Qqemu.PhyMemMode:1") != "OK":
            raise HandleError("QEMU refused Qqemu.PhyMemMode:1")
        self._depth = 1
        try:
            yield self
        finally:
            self._depth = 0
            _packet("Qqemu.PhyMemMode:0")
            gdb.execute("maintenance flush dcache", to_string=True)

    def _check(self, paddr: int, size: int) -> None:
        if self.ram is None or paddr + size <= LOW_MEMORY:
            return
        for start, end in self.ram:
            if start <= paddr and paddr + size <= end:
                return
        raise UnreadablePage(paddr, "not guest RAM", physical=True)

    def read(self, paddr: int, size: int) -> bytes:
        """Bytes at a physical address. In an open session it is one call (a type pass makes
        ~28,000; the general path added ~15 us to each ~50 us round trip, and a call per page of
        a 64 KiB read ~10%); if that fails, or outside a session, a page at a time, so that one
        failing page names itself."""
        self._check(paddr, size)
        if self._depth:
            try:
                return bytes(self.inferior.read_memory(paddr, size))
            except gdb.MemoryError as exc:
                if (paddr & (PAGE - 1)) + size <= PAGE:
                    raise UnreadablePage(paddr, physical=True) from exc
        with self.session():
            parts = []
            addr, end = paddr, paddr + size
            while addr < end:
                step = min(end, (addr & ~(PAGE - 1)) + PAGE) - addr
                try:
                    parts.append(bytes(self.inferior.read_memory(addr, step)))
                except gdb.MemoryError as exc:
                    raise UnreadablePage(addr, physical=True) from exc
                addr += step
            return b"".join(parts)


def _read_register(frame: gdb.Frame, name: str) -> int | None:
    try:
        return int(frame.read_register(name)) & MASK64
    except (ValueError, gdb.error):
        return None


def stub_answers() -> bool:
    """True when gdb can talk to the stub now: while it evaluates a breakpoint condition the
    vCPUs are stopped although gdb still reports the thread as running."""
    return _packet("qqemu.PhyMemMode") is not None


def vcpu_registers(in_condition: bool = False) -> list[dict]:
    """Registers of every vCPU (gdb thread), the selected one first; the selection is restored."""
    selected = gdb.selected_thread() if in_condition else require_stopped_target()
    frame = gdb.selected_frame()
    threads = sorted(gdb.selected_inferior().threads(), key=lambda t: t.num)
    threads.sort(key=lambda t: t != selected)
    result = []
    try:
        for thread in threads:
            thread.switch()
            newest = gdb.newest_frame()
            regs = {"thread": thread.num}
            for name in REGISTERS:
                value = _read_register(newest, name)
                if value is not None:
                    regs[name] = value
            result.append(regs)
    finally:
        selected.switch()
        if frame.is_valid():
            frame.select()
    return result
