"""Page walker, line cache and statistics on hand-built page tables (no guest needed)."""
import struct

import pytest

from gdbhandles.errors import UnreadablePage
from gdbhandles.windows.memory import FINE, FINE_SHARE, LINE, PAGE, AddressSpace, DumpFile, PhysicalMemory

P, W, LARGE, TRANSITION, PROTOTYPE = 1, 2, 0x80, 0x800, 0x400


class Ram:
    """A bytearray as physical memory; counts backend calls."""

    def __init__(self, size=0x400000):
        self.data = bytearray(size)
        self.calls = []

    def read(self, paddr, size):
        self.calls.append((paddr, size))
        if paddr + size > len(self.data):
            raise UnreadablePage(paddr, physical=True)
        return bytes(self.data[paddr:paddr + size])

    def q(self, paddr, value):
        struct.pack_into("<Q", self.data, paddr, value)


def idx(va, shift):
    return (va >> shift) & 0x1FF


@pytest.fixture
def ram():
    """PML4 0x1000; a 4 KiB page, a 2 MiB page, a 1 GiB page, a transition PTE, holes."""
    ram = Ram()
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    va4k = 0xFFFFF80000001000
    ram.q(pml4 + 8 * idx(va4k, 39), pdpt | P | W)
    ram.q(pdpt + 8 * idx(va4k, 30), pd | P | W)
    ram.q(pd + 8 * idx(va4k, 21), pt | P | W)
    ram.q(pt + 8 * idx(va4k, 12), 0x10000 | P | W | (1 << 63))          # NX set: still readable
    ram.q(pt + 8 * (idx(va4k, 12) + 1), 0x11000 | TRANSITION)           # transition: readable
    ram.q(pt + 8 * (idx(va4k, 12) + 2), 0x12000 | TRANSITION | PROTOTYPE)  # prototype: not
    ram.q(pt + 8 * (idx(va4k, 12) + 3), 0x13000)                         # not present
    ram.q(pd + 8 * (idx(va4k, 21) + 1), 0x200000 | P | W | LARGE)        # 2 MiB page
    ram.q(pdpt + 8 * (idx(va4k, 30) + 1), 0x0 | P | W | LARGE)           # 1 GiB page at 0
    ram.data[0x10000:0x10004] = b"4KIB"
    ram.data[0x11000:0x11004] = b"TRAN"
    ram.data[0x200000 + 0x1234:0x200000 + 0x1238] = b"2MIB"
    ram.data[0x5010:0x5014] = b"1GIB"
    return ram


def space(ram):
    return AddressSpace(PhysicalMemory(ram), 0x1000)


BASE = 0xFFFFF80000001000


def test_four_kib_and_transition_pages(ram):
    s = space(ram)
    assert s.read(BASE, 4) == b"4KIB"
    assert s.translate(BASE + 0x1000) == 0x11000
    assert s.read(BASE + 0x1000, 4) == b"TRAN"


def test_large_pages(ram):
    s = space(ram)
    assert s.read(0xFFFFF80000200000 + 0x1234, 4) == b"2MIB"
    assert s.translate(0xFFFFF80040000000 + 0x5010) == 0x5010
    assert s.read(0xFFFFF80040000000 + 0x5010, 4) == b"1GIB"


@pytest.mark.parametrize("va", [BASE + 0x2000, BASE + 0x3000, 0xFFFFF90000000000, 0x1000])
def test_unmapped_pages_name_the_address(ram, va):
    with pytest.raises(UnreadablePage) as error:
        space(ram).read(va, 8)
    assert f"{va:#x}" in str(error.value)


def test_non_canonical_address(ram):
    with pytest.raises(UnreadablePage, match="canonical"):
        space(ram).read(0x0000900000000000, 8)


def test_read_across_pages_fails_at_the_missing_page(ram):
    # The 4 KiB page at BASE+0x1000 is mapped (transition), BASE+0x2000 is not.
    with pytest.raises(UnreadablePage) as error:
        space(ram).read(BASE + 0x1FF8, 16)
    assert error.value.address == BASE + 0x2000
    assert len(space(ram).read(BASE + 0xFF8, 16)) == 16


def test_cache_and_statistics(ram):
    phys = PhysicalMemory(ram)
    s = AddressSpace(phys, 0x1000)
    s.read(BASE, 8)
    first = phys.stats.round_trips
    assert first == 5          # the PML4, PDPT, PD and page table, each read whole, then the data line
    s.read(BASE + 16, 8)       # same line, page already translated
    assert phys.stats.round_trips == first
    assert phys.stats.cache_hits >= 1
    assert phys.stats.bytes == 4 * PAGE + LINE
    s.read(BASE + 0x1000, 8)   # the next page of the 2 MiB region: its PTE came with the page table
    assert phys.stats.round_trips == first + 1


def test_adjacent_missing_lines_come_in_one_read(ram):
    phys = PhysicalMemory(ram)
    phys.read(0x20000, 0x1000)
    assert ram.calls == [(0x20000, 0x1000)]
    ram.calls.clear()
    phys.prefetch([(0x30000, 8), (0x30000 + 2 * LINE, 8), (0x38000, 8)])
    # lines 0 and 2 are one unneeded line apart: cheaper to read together than in two trips
    assert ram.calls == [(0x30000, 3 * LINE), (0x38000, LINE)]
    before = len(ram.calls)
    phys.read(0x30000 + 2 * LINE, 8)
    assert len(ram.calls) == before


class RemoteRam(Ram):
    round_trip_bytes = 512          # as QEMU's gdbstub: a round trip costs


def test_fine_pieces_bridge_the_smallest_gaps_within_their_byte_budget():
    """Over a costly wire the cheapest gaps are read rather than paid a round trip for, but the
    bytes stay within FINE_SHARE per piece; only the pieces asked for are kept."""
    ram = RemoteRam()
    phys = PhysicalMemory(ram)
    gaps = [FINE, 3 * FINE, 200, 4 * FINE, 1000, 2 * FINE]      # bytes between consecutive pieces
    wanted = [0x40000]
    for gap in gaps:
        wanted.append(wanted[-1] + FINE + gap)
    phys.prefetch_fine([(address + 1, 3) for address in wanted])
    budget = (FINE_SHARE - FINE) * len(wanted)
    bridged = sorted(gaps)[:max(n for n in range(len(gaps) + 1) if sum(sorted(gaps)[:n]) <= budget)]
    assert phys.stats.bytes == FINE * len(wanted) + sum(bridged) <= FINE_SHARE * len(wanted)
    assert len(ram.calls) == phys.stats.round_trips == len(wanted) - len(bridged) < len(wanted)
    assert sorted(phys.pieces) == wanted
    for address in wanted:
        phys.read(address + 1, 3)
    assert len(ram.calls) == phys.stats.round_trips


def test_fine_pieces_over_a_free_wire_are_read_alone_unless_adjacent(ram):
    phys = PhysicalMemory(ram)
    phys.prefetch_fine([(0x40000, 3), (0x40000 + FINE, 3), (0x40000 + 3 * FINE, 3)])
    assert ram.calls == [(0x40000, 2 * FINE), (0x40000 + 3 * FINE, FINE)]


def test_mapped_pages_enumerates_mappings(ram):
    pages = list(space(ram).mapped_pages(0xFFFFF80000000000, 0xFFFFF80080000000))
    assert (BASE, 0x1000) in pages and (BASE + 0x1000, 0x1000) in pages
    assert (0xFFFFF80000200000, 0x200000) in pages
    assert (0xFFFFF80040000000, 0x40000000) in pages
    assert (BASE + 0x2000, 0x1000) not in pages


def test_dump_file_reads_and_bounds(tmp_path):
    path = tmp_path / "mem.raw"
    path.write_bytes(b"\0" * 0x1000 + b"HELLO" + b"\0" * 0xFFB)
    dump = DumpFile(path)
    assert dump.read(0x1000, 5) == b"HELLO"
    with pytest.raises(UnreadablePage):
        dump.read(0x1FFE, 4)
    dump.close()
