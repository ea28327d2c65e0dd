"""Guest memory: physical backends, a line cache with read statistics, and the x64 page walk.

A backend is a `PhysicalBackend` (DumpFile here, GdbPhysical in gdb); one with a `size` can
be scanned whole, one with `round_trip_bytes` says what a read request costs over the wire.
Over QEMU's gdbstub a round trip costs ~0.06 ms plus ~0.23 ms per 2 KiB, so reads are
cached in 512-byte lines (about the bytes one round trip is worth), missing lines that are
adjacent are fetched in one backend read, and `prefetch` gathers many small ranges into
few reads. `prefetch_fine` reads 4-byte pieces instead, for a few bytes each of many
scattered structures (a type-filtered walk reads 3 bytes of each object header, and whole
lines around them would be mostly bytes never used); over a costly wire it bridges the
smallest gaps between pieces first, within a byte budget per piece; `prefetch(most=N)`
reads only when N reads suffice (a lookup's whole handle table). Page walks follow Windows:
4 levels, 1 GiB/2 MiB pages, transition entries (bit 11 set, bit 10 clear, not present)
still name their page; each page-table page met is read whole (one read, as one line of it).

About 360 lines: the backends, the line cache and the page walk are one read path (every
engine read goes through all three), kept together so its hot loop reads in one place.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from gdbhandles.errors import UnreadablePage
from gdbhandles.windows.files import open_regular

PAGE = 0x1000
LINE = 0x200
FINE = 4                   # bytes per piece of `prefetch_fine` (a header's TypeIndex..InfoMask, at +0x18, fits one)
# bytes `prefetch_fine` may read per piece, gaps included, when round trips cost. The type pass
# of a --type walk is the trade: 4 per header costs a round trip per header; 24 bridges the
# smallest gaps (round trips: big 33,950 for 41,767 headers, huge 189,950 for 232,182) and
# keeps the walk within a third of the full walk's bytes where table pages are a fifth of
# them (huge: 30.0%; 32 reaches 32.4%, 48 37%; 512-byte gaps read 81% on big, 86% on huge).
# The time this costs over the stub: README, Benchmark.
FINE_SHARE = 24
MAX_PIECES = 1 << 16       # pieces kept (a table page's headers are read right after they come)
PFN_MASK = 0x000F_FFFF_FFFF_F000
MASK64 = (1 << 64) - 1      # a 64-bit register or pointer, the one definition
MAX_RUN = 0x10000          # bytes per backend read when gathering lines
MERGE_GAP = 1              # lines: reading one unneeded line is cheaper than a round trip
MAX_LINES = 1 << 15        # 16 MiB of cached lines (a big walk reads 13), then start afresh
PRESENT, LARGE, PROTOTYPE, TRANSITION = 1, 0x80, 1 << 10, 1 << 11


@runtime_checkable
class PhysicalBackend(Protocol):
    """Where guest-physical memory comes from; UnreadablePage for what it cannot read."""

    def read(self, paddr: int, size: int) -> bytes: ...


@runtime_checkable
class SizedBackend(PhysicalBackend, Protocol):
    """A backend that knows how much physical memory there is (a dump), so it can be scanned."""
    size: int


@runtime_checkable
class RemoteBackend(PhysicalBackend, Protocol):
    """A backend whose every read request costs a round trip (QEMU's gdbstub)."""
    round_trip_bytes: int            # a round trip's cost, in bytes of transfer time


@dataclass
class ReadStats:
    reads: int = 0               # read requests by the engine
    bytes: int = 0               # bytes fetched from the backend
    round_trips: int = 0         # backend read calls
    cache_hits: int = 0          # requests served from the cache alone


class DumpFile:
    """A raw physical memory file (QMP pmemsave, memory.raw): offset == physical address."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open(open_regular(path, "dump"), "rb") as handle:
            self.size = handle.seek(0, 2)
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""

    def read(self, paddr: int, size: int) -> bytes:
        if paddr < 0 or paddr + size > self.size:
            raise UnreadablePage(paddr, f"past the end of the dump ({self.size:#x} bytes): the dump is truncated",
                                 physical=True)
        return self._map[paddr:paddr + size]

    def close(self) -> None:
        if self.size:
            self._map.close()


class PhysicalMemory:
    """Cached physical reads over a backend, with statistics."""

    def __init__(self, backend: PhysicalBackend):
        self.backend = backend
        self.lines: dict[int, bytes] = {}
        self.pieces: dict[int, bytes] = {}     # FINE-byte pieces from prefetch_fine
        self.stats = ReadStats()
        # over a costly round trip, gaps between pieces may be read; where trips are free, none
        self.fine_share = FINE_SHARE if isinstance(backend, RemoteBackend) else FINE

    def _fetch(self, first: int, count: int) -> None:
        """Read `count` lines from line address `first` in as few backend reads as allowed."""
        per_read = MAX_RUN // LINE
        for start in range(0, count, per_read):
            n = min(per_read, count - start)
            address = first + start * LINE
            data = self.backend.read(address, n * LINE)
            self.stats.round_trips += 1
            self.stats.bytes += len(data)
            for i in range(n):
                self.lines[address + i * LINE] = data[i * LINE:(i + 1) * LINE]

    def _ensure(self, wanted: list[int], most: int | None = None) -> bool:
        """Fetch the missing lines among sorted line addresses; True if none was missing. With
        `most`, fetch nothing when that would take more than `most` backend reads."""
        missing = [line for line in wanted if line not in self.lines]
        if not missing:
            return True
        if len(self.lines) + len(missing) > MAX_LINES:
            self.lines.clear()
            missing = wanted
        runs = _runs(missing)
        if most is not None and sum(-(-count * LINE // MAX_RUN) for _, count in runs) > most:
            return False
        for first, count in runs:
            self._fetch(first, count)
        return False

    def read(self, paddr: int, size: int) -> bytes:
        stats = self.stats
        stats.reads += 1
        first = paddr & -LINE
        if paddr + size <= first + LINE:             # the common case, kept short
            line = self.lines.get(first)
            if line is not None:
                stats.cache_hits += 1
                return line[paddr - first:paddr - first + size]
        piece = paddr & -FINE
        if self.pieces and piece in self.pieces and paddr + size <= piece + FINE:
            stats.cache_hits += 1
            return self.pieces[piece][paddr - piece:paddr - piece + size]
        last = (paddr + size - 1) - (paddr + size - 1) % LINE
        if self._ensure(list(range(first, last + 1, LINE))):
            self.stats.cache_hits += 1
        if first == last:
            offset = paddr - first
            return self.lines[first][offset:offset + size]
        data = b"".join(self.lines[line] for line in range(first, last + 1, LINE))
        return data[paddr - first:paddr - first + size]

    def u64(self, paddr: int) -> int:
        return struct.unpack("<Q", self.read(paddr, 8))[0]

    def scan(self, paddr: int, size: int) -> bytes:
        """One large uncached read, for whole-memory scans; counted like any other."""
        data = self.backend.read(paddr, size)
        self.stats.reads += 1
        self.stats.round_trips += 1
        self.stats.bytes += len(data)
        return data

    def prefetch(self, ranges: list[tuple[int, int]], most: int | None = None) -> None:
        """Bring many (paddr, size) ranges into the cache with few backend reads; with `most`,
        only if that takes at most `most` reads (else nothing is read)."""
        wanted = set()
        add = wanted.add
        for paddr, size in ranges:
            first = paddr & -LINE
            add(first)
            if paddr + size > first + LINE:        # past its first line (the common case is within)
                wanted.update(range(first + LINE, paddr + size, LINE))
        if wanted:
            self._ensure(sorted(wanted), most)

    def prefetch_fine(self, ranges: list[tuple[int, int]]) -> None:
        """Bring many small (paddr, size) ranges into the cache as FINE-byte pieces, in the
        fewest backend reads that read at most `fine_share` bytes per piece; only the pieces
        asked for are kept."""
        wanted = sorted({piece for paddr, size in ranges for piece in range(paddr - paddr % FINE, paddr + size, FINE)
                         if piece not in self.pieces and piece - piece % LINE not in self.lines})
        if len(self.pieces) + len(wanted) > MAX_PIECES:
            self.pieces.clear()
        kept = iter(wanted)
        for start, end in self._fine_runs(wanted):
            data = self.backend.read(start, end - start)
            self.stats.round_trips += 1
            self.stats.bytes += len(data)
            for piece in kept:
                self.pieces[piece] = data[piece - start:piece - start + FINE]
                if piece + FINE == end:
                    break

    def _fine_runs(self, wanted: list[int]) -> list[list[int]]:
        """[start, end) reads covering the sorted pieces: gaps bridged smallest first while the
        bytes stay within budget (the fewest round trips for those bytes)."""
        budget = (self.fine_share - FINE) * len(wanted)
        bridged = set()
        for i in sorted(range(1, len(wanted)), key=lambda i: wanted[i] - wanted[i - 1]):
            gap = wanted[i] - wanted[i - 1] - FINE
            if gap > budget:
                break
            budget -= gap
            bridged.add(i)
        runs: list[list[int]] = []
        for i, piece in enumerate(wanted):
            if i in bridged and piece + FINE - runs[-1][0] <= MAX_RUN:
                runs[-1][1] = piece + FINE
            else:
                runs.append([piece, piece + FINE])
        return runs


def _runs(lines: list[int]) -> list[tuple[int, int]]:
    """(first line, count) of each run of sorted line addresses, lines at most MERGE_GAP apart
    joined (reading an unneeded line is cheaper than a round trip)."""
    runs: list[tuple[int, int]] = []
    start = previous = lines[0]
    for line in lines[1:]:
        if line - previous > (MERGE_GAP + 1) * LINE:
            runs.append((start, (previous - start) // LINE + 1))
            start = line
        previous = line
    runs.append((start, (previous - start) // LINE + 1))
    return runs


def _transition(entry: int) -> bool:
    """A page Windows has taken off the working set but not yet reused: its frame is valid."""
    return bool(entry & TRANSITION and not entry & PROTOTYPE and entry & PFN_MASK)


def canonical(va: int) -> bool:
    top = va >> 47
    return top == 0 or top == 0x1FFFF


class AddressSpace:
    """Virtual reads through one DTB (a PML4's physical address)."""

    def __init__(self, phys: PhysicalMemory, dtb: int):
        self.phys = phys
        self.dtb = dtb & PFN_MASK
        self._pages: dict[int, int] = {}
        self._page_tables: dict[int, int] = {}      # va >> 21 -> its page table
        self._large: dict[int, int] = {}            # va >> 21 -> its frame, in a 2 MiB or 1 GiB page
        self._whole: set[int] = set()               # directory pages read whole

    def _walk(self, va: int) -> int:
        """The physical address of va's page (4 KiB base), or UnreadablePage. The page table of
        each 2 MiB region is remembered and read whole when first met (one read, the same round
        trip as one line of it), so the other pages of the region cost no read."""
        if not canonical(va):
            raise UnreadablePage(va, "not a canonical address")
        table = self._page_tables.get(va >> 21)
        if table is None:
            frame = self._large.get(va >> 21)
            if frame is not None:
                return frame | (va & 0x1FF000)
            table, large = self._descend(va)
            if large:
                self._large[va >> 21] = table & ~0x1FFFFF
                return table
            self._page_tables[va >> 21] = table
            self.phys.prefetch([(table, PAGE)])
        entry = self.phys.u64(table + ((va >> 12) & 0x1FF) * 8)
        if not entry & PRESENT and not _transition(entry):
            raise UnreadablePage(va, f"paged out: PTE {entry:#x}" if entry else "page")
        return entry & PFN_MASK

    def _descend(self, va: int) -> tuple[int, bool]:
        """(page table of va, False), or (va's page in a 1 GiB/2 MiB page, True; its 2 MiB piece is
        remembered). Each directory page is read whole once (one read, as one line of it): its
        other entries come next."""
        table = self.dtb
        for shift in (39, 30, 21):
            if table not in self._whole:
                self._whole.add(table)
                self.phys.prefetch([(table, PAGE)])
            entry = self.phys.u64(table + ((va >> shift) & 0x1FF) * 8)
            if not entry & PRESENT and not _transition(entry):
                raise UnreadablePage(va, "page")
            elif shift != 39 and entry & LARGE:
                span = (1 << shift) - 1
                return (entry & PFN_MASK & ~span) | (va & span & ~(PAGE - 1)), True
            table = entry & PFN_MASK
        return table, False

    def translate(self, va: int) -> int:
        page = va & ~(PAGE - 1)
        base = self._pages.get(page)
        if base is None:
            base = self._pages[page] = self._walk(page)
        return base | (va & (PAGE - 1))

    def read(self, va: int, size: int) -> bytes:
        """Bytes at va; UnreadablePage names the first address whose page is missing."""
        offset = va & (PAGE - 1)
        if 0 < size and offset + size <= PAGE:    # within one page: one translation, no joining
            base = self._pages.get(va - offset)
            if base is None:
                base = self._pages[va - offset] = self._walk(va - offset)
            return self.phys.read(base | offset, size)
        end = va + size
        parts = []
        while va < end:
            chunk = min(end, (va | (PAGE - 1)) + 1) - va
            parts.append(self.phys.read(self.translate(va), chunk))
            va += chunk
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def u8(self, va: int) -> int:
        return self.read(va, 1)[0]

    def u16(self, va: int) -> int:
        return struct.unpack("<H", self.read(va, 2))[0]

    def u32(self, va: int) -> int:
        return struct.unpack("<I", self.read(va, 4))[0]

    def u64(self, va: int) -> int:
        return struct.unpack("<Q", self.read(va, 8))[0]

    def prefetch(self, ranges: list[tuple[int, int]], fine: bool = False, most: int | None = None) -> None:
        """Cache many small virtual ranges in few reads (in FINE pieces if `fine`; with `most`,
        only if that takes at most `most` reads besides the page walks); unmapped ones are
        left to fail later."""
        physical, pages = [], self._pages
        for va, size in ranges:
            offset = va & (PAGE - 1)
            base = pages.get(va - offset)
            if base is not None and offset + size <= PAGE:      # most: within one known page
                physical.append((base | offset, size))
                continue
            end = va + size
            while va < end:
                offset = va & (PAGE - 1)
                chunk = min(end - va, PAGE - offset)
                base = pages.get(va - offset)
                if base is None:
                    try:
                        base = pages[va - offset] = self._walk(va - offset)
                    except UnreadablePage:
                        va += chunk
                        continue
                physical.append((base | offset, chunk))
                va += chunk
        if fine:
            self.phys.prefetch_fine(physical)
        else:
            self.phys.prefetch(physical, most)

    def mapped_pages(self, start: int, end: int):
        """Yield (va, size) of every mapped page or large page in [start, end), in order."""
        yield from self._mapped(self.dtb, 39, 0, start, end)

    def _mapped(self, table: int, shift: int, base: int, start: int, end: int):
        span = 1 << shift
        raw = self.phys.read(table, PAGE)
        for index, entry in enumerate(struct.unpack("<512Q", raw)):
            va = base + index * span
            if shift == 39 and index >= 256:
                va |= 0xFFFF_0000_0000_0000
            if va + span <= start or va >= end:
                continue
            if not (entry & PRESENT or (shift == 12 and _transition(entry))):
                continue
            if shift == 12 or (shift in (30, 21) and entry & LARGE):
                yield va, span
            else:
                yield from self._mapped(entry & PFN_MASK, shift - 9, va, start, end)
