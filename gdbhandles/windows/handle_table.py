"""_HANDLE_TABLE: level arithmetic, bounded iteration and lookup (as ExpLookupHandleTableEntry).

A handle value's low 2 bits are tags and ignored; index = value / 4. Low-level pages hold
256 16-byte entries, mid- and top-level pages 512 pointers; `TableCode & 3` is the number
of levels above the entries. Values at or beyond NextHandleNeedingPool do not exist, and
the first entry of each low-level page is never a handle.
"""

from __future__ import annotations

import enum
import functools
import struct
from dataclasses import dataclass

from gdbhandles.errors import CorruptTable, HandleError
from gdbhandles.windows.layouts import Field, Layout
from gdbhandles.windows.memory import MASK64, AddressSpace
from gdbhandles.windows.structure import Struct

__all__ = ["LookupStatus", "EntryForm", "HandleTableEntry", "HandleTable", "Entry", "Problem", "TableStep"]

ENTRY_SIZE = 16
LOW_COUNT = 4096 // ENTRY_SIZE          # entries per low-level page
MID_COUNT = 4096 // 8                   # pointers per mid/top-level page
HANDLE_STEP = 4
MAX_HANDLE_VALUE = 1 << 26              # Windows allows 2^24 handles per table
PROTECT_CLOSE_BIT = 0x2000000           # Win7: ObpAccessProtectCloseBit in GrantedAccess
ATTRIBUTE_PROTECT_CLOSE = 1


class LookupStatus(enum.StrEnum):
    """What a handle value names in its table (as ExpLookupHandleTableEntry would find it)."""
    VALID = "valid"
    FREE = "free"                         # closed: the entry holds no object
    NEVER_ALLOCATED = "never_allocated"
    PAST_END = "past_end"                 # at or beyond NextHandleNeedingPool
    FIRST_SLOT = "first_slot"             # entry 0 of a low-level page, never a handle


class EntryForm(enum.Enum):
    """The two shapes of _HANDLE_TABLE_ENTRY: the one switch between Windows versions."""
    OBJECT_POINTER = "Win7: Object qword + GrantedAccess"
    BITFIELDS = "Win8+: ObjectPointerBits, Attributes, GrantedAccessBits"


@dataclass(frozen=True)
class TableStep:
    """One table the lookup went through: its level (2 top … 0 entries) and address."""
    level: int
    address: int
    index: int


@dataclass(frozen=True)
class Entry:
    handle: int
    address: int
    header: int | None                  # None: no object (free or never used)
    granted_access: int
    attributes: int
    empty: bool                         # both qwords zero: never handed out


@dataclass(frozen=True)
class Problem:
    """Something a walk could not read; it goes on after reporting it."""
    message: str
    handle: int | None = None


class HandleTableEntry(Struct):
    """How a 16-byte _HANDLE_TABLE_ENTRY holds object, access and attributes in this build."""
    NAME = "_HANDLE_TABLE_ENTRY"

    @functools.cached_property
    def form(self) -> EntryForm:
        """BITFIELDS when the layout has `ObjectPointerBits` (Win8+), else OBJECT_POINTER."""
        return EntryForm.BITFIELDS if self.find("ObjectPointerBits") else EntryForm.OBJECT_POINTER

    def decode(self, raw: bytes, offset: int) -> tuple[int | None, int, int]:
        """(header or None, granted access, attributes) of the entry at raw[offset:]."""
        if self.form is EntryForm.BITFIELDS:
            return self._bitfields(raw, offset)
        value = self.field("Object").extract(raw, offset)
        if not value:
            return None, 0, 0
        granted = self.field("GrantedAccess").extract(raw, offset)
        attributes = (value & 6) | (ATTRIBUTE_PROTECT_CLOSE if granted & PROTECT_CLOSE_BIT else 0)
        return value & ~0xF, granted & ~PROTECT_CLOSE_BIT, attributes

    @functools.cached_property
    def _plan(self) -> tuple:
        """(shift, mask) in the 16-byte entry read as one 128-bit number, of each field decode reads."""
        def at(name: str) -> tuple[int, int]:
            f = self.field(name)
            if f.bit_length is None:
                return 8 * f.offset, (1 << 8 * f.size) - 1
            return 8 * f.offset + f.bit_position, (1 << f.bit_length) - 1
        if self.form is EntryForm.BITFIELDS:
            return at("ObjectPointerBits"), at("GrantedAccessBits"), at("Attributes")
        return at("Object"), at("GrantedAccess")

    def decode_page(self, raw: bytes) -> list[tuple[int | None, int, int, bool]]:
        """decode() of every entry in `raw` at once, plus whether the entry is all zero (the walk's
        hot loop: one unpack per entry, no per-field calls)."""
        out = []
        if self.form is EntryForm.BITFIELDS:
            (ps, pm), (gs, gm), (ats, am) = self._plan
            top = (pm + 1) >> 1
            for lo, hi in struct.iter_unpack("<QQ", raw):
                entry = lo | hi << 64
                bits = (entry >> ps) & pm
                out.append(((((bits ^ top) - top) << 4) & MASK64, (entry >> gs) & gm, (entry >> ats) & am, False)
                           if bits else (None, 0, 0, not entry))
            return out
        (os_, om), (gs, gm) = self._plan
        for lo, hi in struct.iter_unpack("<QQ", raw):
            entry = lo | hi << 64
            value, granted = (entry >> os_) & om, (entry >> gs) & gm
            attributes = (value & 6) | (ATTRIBUTE_PROTECT_CLOSE if granted & PROTECT_CLOSE_BIT else 0)
            out.append((value & ~0xF, granted & ~PROTECT_CLOSE_BIT, attributes, False) if value
                       else (None, 0, 0, not entry))
        return out

    def _bitfields(self, raw: bytes, offset: int) -> tuple[int | None, int, int]:
        """`ObjectPointerBits` (header >> 4, sign-extended), `GrantedAccessBits`, `Attributes`."""
        pointer = self.field("ObjectPointerBits")
        bits = pointer.extract(raw, offset)
        if not bits:
            return None, 0, 0
        top = 1 << (pointer.bit_length - 1)
        header = (((bits ^ top) - top) << 4) & MASK64
        return (header, self.field("GrantedAccessBits").extract(raw, offset),
                self.field("Attributes").extract(raw, offset))


class HandleTableHeader(Struct):
    NAME = "_HANDLE_TABLE"

    def handle_count_fields(self) -> list[Field] | None:
        """Where Windows keeps the table's count of handles in use: `FreeLists[i].HandleCount`
        summed (Win8+), else `HandleCount` (Win7); None if this layout has neither."""
        lists = self.find("FreeLists")
        if lists is not None:
            per_list = self.layout.size("_HANDLE_TABLE_FREE_LIST")
            count = self.layout.find("_HANDLE_TABLE_FREE_LIST", "HandleCount")
            if not per_list or count is None:
                return None
            return [Field(lists.offset + i * per_list + count.offset, count.size)
                    for i in range(lists.size // per_list)]
        found = self.find("HandleCount")
        return [found] if found is not None else None


class HandleTable:
    """One _HANDLE_TABLE; `TableCode` and `NextHandleNeedingPool` are read once."""

    def __init__(self, space: AddressSpace, layout: Layout, address: int):
        self.space = space
        self.layout = layout
        self.address = address
        self.format = HandleTableEntry.of(layout)
        fields = HandleTableHeader.of(layout)
        start, size = fields.span("TableCode", "NextHandleNeedingPool")
        raw = self.space.read(address + start, size)
        self.table_code = fields.field("TableCode").extract(raw, -start)
        self.next_handle_needing_pool = fields.field("NextHandleNeedingPool").extract(raw, -start)
        self.levels = self.table_code & 3
        self.top = self.table_code & ~3
        if self.levels == 3:
            raise CorruptTable(f"handle table {address:#x}: TableCode {self.table_code:#x} has 3 levels")
        if self.next_handle_needing_pool > MAX_HANDLE_VALUE or self.next_handle_needing_pool % HANDLE_STEP:
            raise CorruptTable(f"handle table {address:#x}: NextHandleNeedingPool "
                               f"{self.next_handle_needing_pool:#x} is not a handle bound")

    @property
    def slots(self) -> int:
        """Entries below NextHandleNeedingPool."""
        return self.next_handle_needing_pool // HANDLE_STEP

    def _pointers(self, table: int, count: int) -> tuple[int, ...]:
        return struct.unpack(f"<{count}Q", self.space.read(table, 8 * count))

    def low_pages(self):
        """Yield (first index, page address or 0, path) of every low-level page in range."""
        pages = -(-self.slots // LOW_COUNT)
        if self.levels == 0:
            if pages:
                yield 0, self.top, [TableStep(0, self.top, 0)]
            return
        if self.levels == 1:
            for i, page in enumerate(self._pointers(self.top, min(pages, MID_COUNT))):
                yield i * LOW_COUNT, page, [TableStep(1, self.top, i), TableStep(0, page, 0)]
            return
        mids = -(-pages // MID_COUNT)
        for j, mid in enumerate(self._pointers(self.top, min(mids, MID_COUNT))):
            count = min(MID_COUNT, pages - j * MID_COUNT)
            if not mid:
                for k in range(count):
                    yield (j * MID_COUNT + k) * LOW_COUNT, 0, [TableStep(2, self.top, j)]
                continue
            try:
                lows = self._pointers(mid, count)
            except HandleError:
                yield j * MID_COUNT * LOW_COUNT, None, [TableStep(2, self.top, j), TableStep(1, mid, 0)]
                continue
            for k, page in enumerate(lows):
                yield ((j * MID_COUNT + k) * LOW_COUNT, page,
                       [TableStep(2, self.top, j), TableStep(1, mid, k), TableStep(0, page, 0)])

    def pages(self):
        """Yield, per low-level page in range, its Entries (first slot skipped) or one Problem."""
        for first, page, path in self.low_pages():
            if page is None:
                yield [Problem(f"mid-level table {path[-1].address:#x} unreadable", first * HANDLE_STEP)]
                continue
            if not page:
                continue
            count = min(LOW_COUNT, self.slots - first)
            try:
                raw = self.space.read(page, ENTRY_SIZE * count)
            except HandleError as exc:
                yield [Problem(f"handle table page {page:#x}: {exc}", first * HANDLE_STEP)]
                continue
            decoded = self.format.decode_page(raw)
            yield [Entry((first + i) * HANDLE_STEP, page + i * ENTRY_SIZE, *decoded[i]) for i in range(1, count)]

    def entries(self):
        """Every in-range Entry or Problem, in handle order."""
        for page in self.pages():
            yield from page

    def kernel_count(self) -> int | None:
        """The count of handles in use that Windows keeps in the table header, or None if this
        layout has no such field. CorruptTable if it exceeds what the table can hold."""
        fields = HandleTableHeader.of(self.layout).handle_count_fields()
        if fields is None:
            return None
        count = sum(f.read(self.space.read, self.address) for f in fields)
        if count > self.slots:
            raise CorruptTable(f"handle table {self.address:#x}: HandleCount {count} exceeds its "
                               f"{self.slots} slots")
        return count

    def count(self) -> int:
        """Entries that hold an object."""
        return sum(1 for e in self.entries() if isinstance(e, Entry) and e.header is not None)

    def lookup(self, handle: int) -> tuple[LookupStatus, Entry | None, list[TableStep]]:
        """(status, entry, path) of a handle value, as ExpLookupHandleTableEntry finds it."""
        value = handle & ~(HANDLE_STEP - 1)
        index = value // HANDLE_STEP
        if value >= self.next_handle_needing_pool:
            return LookupStatus.PAST_END, None, []
        path = []
        page = self.top
        if self.levels == 2:
            j, k = index // (LOW_COUNT * MID_COUNT), index // LOW_COUNT % MID_COUNT
            path.append(TableStep(2, self.top, j))
            mid = self.space.u64(self.top + 8 * j)
            if not mid:
                return LookupStatus.NEVER_ALLOCATED, None, path
            path.append(TableStep(1, mid, k))
            page = self.space.u64(mid + 8 * k)
        elif self.levels == 1:
            i = index // LOW_COUNT
            path.append(TableStep(1, self.top, i))
            page = self.space.u64(self.top + 8 * i)
        if not page:
            return LookupStatus.NEVER_ALLOCATED, None, path
        path.append(TableStep(0, page, index % LOW_COUNT))
        address = page + ENTRY_SIZE * (index % LOW_COUNT)
        if index % LOW_COUNT == 0:
            return LookupStatus.FIRST_SLOT, None, path
        raw = self.space.read(address, ENTRY_SIZE)
        header, granted, attributes = self.format.decode(raw, 0)
        entry = Entry(value, address, header, granted, attributes, not any(raw))
        if header is None:
            never = entry.empty or value > self.highest_in_use()
            return (LookupStatus.NEVER_ALLOCATED if never else LookupStatus.FREE), entry, path
        return LookupStatus.VALID, entry, path

    def highest_in_use(self) -> int:
        """The largest handle value holding an object (0 if none). Windows hands out the
        lowest free value first, so a free entry above it counts as never allocated."""
        return max((e.handle for e in self.entries() if isinstance(e, Entry) and e.header is not None),
                   default=0)
