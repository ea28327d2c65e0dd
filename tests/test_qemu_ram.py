"""The fast path's reader and its checks, on this test process's own memory (/proc/self/mem):
reads across ranges, holes refused, and a mapping whose pages differ from the reference refused.
The same code against a real QEMU is in test_fastpath_live.py."""

from __future__ import annotations

import ctypes
import os

import pytest

from gdbhandles.automation import qemu_ram
from gdbhandles.automation.qemu_ram import FastPathUnavailable, QemuRam, RamRange
from gdbhandles.errors import UnreadablePage

PAGE = 0x1000


@pytest.fixture
def buffer():
    """Two pages-aligned regions of this process standing in for two RAM blocks."""
    raw = ctypes.create_string_buffer(6 * PAGE)
    base = (ctypes.addressof(raw) + PAGE - 1) & ~(PAGE - 1)
    for i in range(4 * PAGE):
        ctypes.c_ubyte.from_address(base + i).value = (i * 7 + i // PAGE) & 0xFF
    yield raw, base
    del raw


def expected(base: int, offset: int, size: int) -> bytes:
    return ctypes.string_at(base + offset, size)


def test_reads_cross_ranges_and_refuse_holes(buffer):
    _, base = buffer
    ram = QemuRam(os.getpid(), [RamRange(0x10000, 0x12000, base, "a"), RamRange(0x12000, 0x13000, base + 3 * PAGE, "b")])
    try:
        assert ram.read(0x10000, 16) == expected(base, 0, 16)
        assert ram.read(0x11ff8, 16) == expected(base, 2 * PAGE - 8, 8) + expected(base, 3 * PAGE, 8)
        with pytest.raises(UnreadablePage, match="not guest RAM"):
            ram.read(0x12ff8, 16)
        with pytest.raises(UnreadablePage, match="not guest RAM"):
            ram.read(0xf000, 8)
    finally:
        ram.close()


MTREE = """FlatView #0
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000010000-0000000000011fff (prio 0, ram): pc.ram
  0000000000012000-0000000000012fff (prio 0, rom): pc.ram @0000000000002000
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic

FlatView #1
 AS "I/O", root: io
  0000000000000000-0000000000000007 (prio 0, ram): not-memory
"""


def monitor_for(base: int):
    """Answers of QEMU's monitor for a guest whose RAM 0x10000-0x13000 is at `base` here."""
    def monitor(command: str) -> str:
        if command == "info mtree -f":
            return MTREE
        paddr = int(command.split()[1], 16)
        return f"Host virtual address for {paddr:#x} (pc.ram) is {base + paddr - 0x10000:#x}\r\n"
    return monitor


def test_map_ram_merges_contiguous_ranges_and_checks_pages(buffer):
    _, base = buffer
    reference = lambda paddr, size: expected(base, paddr - 0x10000, size)   # noqa: E731
    ram = qemu_ram.map_ram(os.getpid(), monitor_for(base), reference, extra_pages=(0x11000,))
    try:
        assert [(r.start, r.end) for r in ram.ranges] == [(0x10000, 0x13000)]
        assert ram.verified.startswith("4 pages equal")
    finally:
        ram.close()


def test_map_ram_refuses_a_mapping_that_differs_from_the_reference(buffer):
    _, base = buffer
    different = lambda paddr, size: bytes(size)                                 # noqa: E731
    with pytest.raises(FastPathUnavailable, match="differs from the stub's"):
        qemu_ram.map_ram(os.getpid(), monitor_for(base), different)
