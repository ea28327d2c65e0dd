"""_HANDLE_TABLE: level arithmetic, bounded iteration and lookup (as ExpLookupHandleTableEntry).

A handle value's low 2 bits are tags and ignored; index = value / 4. Low-level pages hold
256 16-byte entries, mid- and top-level pages 512 pointers; `TableCode & 3` is the number
of levels above the entries. Values at or beyond NextHandleNeedingPool do not exist, and
the first entry of each low-level page is never a handle.

About 360 lines: the entry (_HANDLE_TABLE_ENTRY in its Win7 and Win8+ forms), the table's
own header and the walk stay together, because iteration, counting and lookup share one
level arithmetic and one entry decoder.
"""

from __future__ import annotations

import enum
import functools
import struct
from dataclasses import dataclass
from typing import NamedTuple

from gdbhandles.errors import CorruptTable, HandleError
from gdbhandles.windows.layouts import Field, Layout
from gdbhandles.windows.memory import MASK64, MAX_RUN, PAGE, AddressSpace
from gdbhandles.windows.structure import Struct
from gdbhandles.windows.table_damage import LEVEL_NAME, Problem, TableDamage

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


class Entry(NamedTuple):
    """One in-range slot of a low-level page (a tuple: the walk builds one per slot)."""
    handle: int
    address: int
    header: int | None                  # None: no object (free or never used)
    granted_access: int
    attributes: int
    empty: bool                         # both qwords zero: never handed out


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

    def decode_page(self, raw: bytes, first: int, page: int, used_only: bool = False) -> list[Entry]:
        """The Entries of a low-level page at `page` whose slot 0 is entry `first`, from slot 1
        to the end of `raw`; with `used_only`, only those that hold an object (a walk: most slots
        of a table can be free, as in `huge`: 718,000 free for 283,000 in use). The walk's hot loop:
        one unpack per entry, no per-field calls."""
        out, handle, address = [], (first + 1) * HANDLE_STEP, page + ENTRY_SIZE
        if self.form is EntryForm.BITFIELDS:
            (ps, pm), (gs, gm), (ats, am) = self._plan
            top = (pm + 1) >> 1
            for lo, hi in struct.iter_unpack("<QQ", raw[ENTRY_SIZE:]):
                entry = lo | hi << 64
                bits = (entry >> ps) & pm
                if bits:
                    out.append(Entry(handle, address, (((bits ^ top) - top) << 4) & MASK64, (entry >> gs) & gm,
                                     (entry >> ats) & am, False))
                elif not used_only:
                    out.append(Entry(handle, address, None, 0, 0, not entry))
                handle, address = handle + HANDLE_STEP, address + ENTRY_SIZE
            return out
        (os_, om), (gs, gm) = self._plan
        for lo, hi in struct.iter_unpack("<QQ", raw[ENTRY_SIZE:]):
            entry = lo | hi << 64
            value, granted = (entry >> os_) & om, (entry >> gs) & gm
            if value:
                attributes = (value & 6) | (ATTRIBUTE_PROTECT_CLOSE if granted & PROTECT_CLOSE_BIT else 0)
                out.append(Entry(handle, address, value & ~0xF, granted & ~PROTECT_CLOSE_BIT, attributes, False))
            elif not used_only:
                out.append(Entry(handle, address, None, 0, 0, not entry))
            handle, address = handle + HANDLE_STEP, address + ENTRY_SIZE
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
    """One _HANDLE_TABLE; `TableCode` and `NextHandleNeedingPool` are read once.

    Walks are bounded by what the table can honestly hold: NextHandleNeedingPool no further
    than its levels reach, and every mid- or low-level page used once (a page named by a
    second slot, a NULL slot below the bound, an unreadable or all-zero page are damage,
    reported as one Problem per damaged page at the end of the walk)."""

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
        here = f"handle table {address:#x}"
        if self.levels == 3:
            raise CorruptTable(f"{here}: TableCode {self.table_code:#x} has level bits 3 (at most 2 levels "
                               "exist): its handles cannot be listed")
        if not self.top:
            raise CorruptTable(f"{here}: TableCode is 0 (the _HANDLE_TABLE is zeroed): its handles cannot be listed")
        if self.next_handle_needing_pool > MAX_HANDLE_VALUE or self.next_handle_needing_pool % HANDLE_STEP:
            raise CorruptTable(f"{here}: NextHandleNeedingPool {self.next_handle_needing_pool:#x} is not a "
                               "handle bound: its handles cannot be listed")
        self.capacity = LOW_COUNT * MID_COUNT ** self.levels * HANDLE_STEP
        self.pages_read = False              # read_pages ran (its pages are in the cache)
        self.bound_problem = None
        if self.next_handle_needing_pool > self.capacity:
            self.bound_problem = (f"{here}: NextHandleNeedingPool {self.next_handle_needing_pool:#x} is past what "
                                  f"a level-{self.levels} table holds ({self.capacity:#x}); read up to that")

    @property
    def slots(self) -> int:
        """Entries below NextHandleNeedingPool, as far as the levels reach."""
        return min(self.next_handle_needing_pool, self.capacity) // HANDLE_STEP

    def _pointers(self, table: int, count: int) -> tuple[int, ...]:
        return struct.unpack(f"<{count}Q", self.space.read(table, 8 * count))

    def low_pages(self, damage: TableDamage | None = None):
        """Yield (first index, low-level page, path) of every usable low-level page in range,
        each page once; what is unusable goes to `damage` (or is left unsaid)."""
        damage = damage or TableDamage(self.address)
        pages = -(-self.slots // LOW_COUNT)
        if not pages:
            return
        if self.levels == 0:
            yield 0, self.top, [TableStep(0, self.top, 0)]
            return
        damage.seen.add(self.top)
        if self.levels == 1:
            for i, page in damage.children(self._pointers, self.top, pages, lambda i: 1):
                yield i * LOW_COUNT, page, [TableStep(1, self.top, i), TableStep(0, page, 0)]
            return
        span = lambda j: min(MID_COUNT, pages - j * MID_COUNT)  # noqa: E731  (low pages under mid slot j)
        for j, mid in damage.children(self._pointers, self.top, -(-pages // MID_COUNT), span):
            for k, page in damage.children(self._pointers, mid, span(j), lambda k: 1):
                yield ((j * MID_COUNT + k) * LOW_COUNT, page,
                       [TableStep(2, self.top, j), TableStep(1, mid, k), TableStep(0, page, 0)])

    def pages(self, used_only: bool = False):
        """Yield, per usable low-level page in range, its Entries (first slot skipped; only those
        holding an object if `used_only`); then one list of Problems for the damage met, if any."""
        damage = self._damage()
        for first, page, path in self.low_pages(damage):
            count = min(LOW_COUNT, self.slots - first)
            raw = self._low_page(first, page, path, count, damage)
            if raw is None:
                continue
            yield self.format.decode_page(raw, first, page, used_only)
        problems = damage.report()
        if problems:
            yield problems

    def page_problems(self) -> list[Problem]:
        """The damage a walk would meet in the table's pages, found without reading them all:
        the pointer pages, then each low-level page's first handle entry, and the whole page
        only when that entry is zero (an all-zero page is damage). What `ps` checks."""
        damage = self._damage()
        for first, page, path in self.low_pages(damage):
            count = min(LOW_COUNT, self.slots - first)
            try:
                if count > 1 and any(self.space.read(page + ENTRY_SIZE, ENTRY_SIZE)):
                    continue
            except HandleError:
                pass                        # _low_page says so, with the page's place
            self._low_page(first, page, path, count, damage)
        return damage.report()

    def _damage(self) -> TableDamage:
        damage = TableDamage(self.address)
        if self.bound_problem:
            damage.problems.append(Problem(self.bound_problem))
        return damage

    def _low_page(self, first: int, page: int, path: list, count: int, damage: TableDamage) -> bytes | None:
        """The `count` entries of a low-level page, or None (said in `damage`) if unreadable or
        all zeros."""
        try:
            raw = self.space.read(page, ENTRY_SIZE * count)
        except HandleError as exc:
            if len(path) == 1:
                damage.problems.append(Problem(f"handle table {self.address:#x}: its low-level page "
                                               f"{page:#x} is unreadable ({exc}): up to {count - 1} handles "
                                               "not listed"))
            else:
                damage.note(path[-2].address, "unreadable", page, 1, str(exc))
            return None
        if count > 1 and not any(raw[ENTRY_SIZE:]):
            damage.problems.append(Problem(f"handle table {self.address:#x}: low-level page {page:#x} is "
                                           f"all zeros below NextHandleNeedingPool: up to {count - 1} "
                                           "handles not listed", first * HANDLE_STEP))
            return None
        return raw

    def entries(self):
        """Every in-range Entry, then the Problems met, in handle order."""
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

    def census(self) -> tuple[int, list[Problem]]:
        """(entries that hold an object, the damage met counting them): bounded like a walk."""
        count, problems = 0, []
        for item in self.entries():
            if isinstance(item, Problem):
                problems.append(item)
            elif item.header is not None:
                count += 1
        return count, problems

    def count(self) -> int:
        """Entries that hold an object."""
        return self.census()[0]

    def read_pages(self, most: int) -> None:
        """Bring every low-level page into the cache, once, when that takes at most `most` backend
        reads besides the page walks (at most `most` x 64 KiB): later lookups in the table then
        read no table page. A bigger or scattered table is left to be read page by page."""
        if self.pages_read:
            return
        self.pages_read = True
        if -(-self.slots // LOW_COUNT) > most * (MAX_RUN // PAGE):
            return
        self.space.prefetch([(page, PAGE) for _, page, _ in self.low_pages()], most=most)

    def lookup(self, handle: int) -> tuple[LookupStatus, Entry | None, list[TableStep]]:
        """(status, entry, path) of a handle value, as ExpLookupHandleTableEntry finds it;
        CorruptTable (one line) when the table's damage is on the way to it."""
        value = handle & ~(HANDLE_STEP - 1)
        index = value // HANDLE_STEP
        if value >= self.next_handle_needing_pool:
            return LookupStatus.PAST_END, None, []
        if index >= self.slots:
            raise CorruptTable(f"{self.bound_problem}: handle {value:#x} cannot be looked up")
        try:
            page, path = self._page_of(index, value)
            path.append(TableStep(0, page, index % LOW_COUNT))
            if index % LOW_COUNT == 0:
                return LookupStatus.FIRST_SLOT, None, path
            address = page + ENTRY_SIZE * (index % LOW_COUNT)
            self.space.prefetch([(page, ENTRY_SIZE * LOW_COUNT)])    # one read: its neighbours come next
            raw = self.space.read(address, ENTRY_SIZE)
            if not any(raw) and not any(self.space.read(page + ENTRY_SIZE, ENTRY_SIZE * (LOW_COUNT - 1))):
                raise CorruptTable(f"low-level page {page:#x} is all zeros below NextHandleNeedingPool")
        except CorruptTable as exc:
            raise CorruptTable(f"handle table {self.address:#x}: {exc}: handle {value:#x} cannot be looked up")
        except HandleError as exc:
            raise CorruptTable(f"handle table {self.address:#x}: handle {value:#x}: {exc}")
        header, granted, attributes = self.format.decode(raw, 0)
        entry = Entry(value, address, header, granted, attributes, not any(raw))
        if header is None:
            never = entry.empty or value > self.highest_in_use()
            return (LookupStatus.NEVER_ALLOCATED if never else LookupStatus.FREE), entry, path
        return LookupStatus.VALID, entry, path

    def _page_of(self, index: int, value: int) -> tuple[int, list[TableStep]]:
        """The low-level page holding entry `index` and the steps to it; CorruptTable for a NULL
        slot below the bound or a page an earlier slot of the same table page already names."""
        if self.levels == 0:
            return self.top, []
        path, parent = [], self.top
        steps = [(2, index // (LOW_COUNT * MID_COUNT)), (1, index // LOW_COUNT % MID_COUNT)][2 - self.levels:]
        for level, slot in steps:
            pointers = self._pointers(parent, slot + 1)
            child = pointers[slot]
            path.append(TableStep(level, parent, slot))
            if not child:
                raise CorruptTable(f"slot {slot} of {LEVEL_NAME[level]} page {parent:#x} is NULL below "
                                   "NextHandleNeedingPool")
            if child in pointers[:slot] or child in (self.top, parent):
                raise CorruptTable(f"{LEVEL_NAME[level - 1]} page {child:#x} is named again by slot {slot} of "
                                   f"{LEVEL_NAME[level]} page {parent:#x} (a damaged or hostile table)")
            parent = child
        return parent, path

    def highest_in_use(self) -> int:
        """The largest handle value holding an object (0 if none). Windows hands out the
        lowest free value first, so a free entry above it counts as never allocated."""
        return max((e.handle for e in self.entries() if isinstance(e, Entry) and e.header is not None),
                   default=0)
