"""Handle-entry bit decoding and table level arithmetic on hand-made tables (no guest needed)."""
import struct
from types import SimpleNamespace

import pytest

from gdbhandles.windows import layouts
from gdbhandles.errors import CorruptTable, UnreadablePage
from gdbhandles.windows.handle_table import Entry, HandleTable, HandleTableEntry, Problem
from gdbhandles.windows.memory import MASK64



class SparseSpace:
    """Virtual memory as a dict of 4 KiB pages; anything else is unreadable."""

    def __init__(self):
        self.pages = {}

    def page(self, va):
        return self.pages.setdefault(va & ~0xFFF, bytearray(0x1000))

    def put(self, va, data):
        for i, byte in enumerate(data):
            self.page(va + i)[(va + i) & 0xFFF] = byte

    def read(self, va, size):
        out = bytearray()
        for address in range(va, va + size):
            if address & ~0xFFF not in self.pages:
                raise UnreadablePage(address & ~0xFFF)
            out.append(self.pages[address & ~0xFFF][address & 0xFFF])
        return bytes(out)

    def u64(self, va):
        return struct.unpack("<Q", self.read(va, 8))[0]

    def prefetch(self, ranges, fine=False):
        """Nothing to cache: every read is local (AddressSpace.prefetch only saves round trips)."""


def kernel_for(build):
    layout = layouts.for_build(build)
    return SimpleNamespace(layout=layout, space=SparseSpace())


def encode_bitfield(layout, header, granted, attributes):
    """An in-use Win8+ entry, built from the profile's bit positions."""
    f = lambda name: layout.field("_HANDLE_TABLE_ENTRY", name)  # noqa: E731
    bits = f("ObjectPointerBits")
    low = 1 | (5 << f("RefCnt").bit_position) | (attributes << f("Attributes").bit_position)
    low |= ((header >> 4) & ((1 << bits.bit_length) - 1)) << bits.bit_position
    return struct.pack("<QII", low, granted, 0)


@pytest.mark.parametrize("build", [9200, 9600, 19041, 22631])
def test_bitfield_entries_sign_extend_the_header(build):
    kernel = kernel_for(build)
    form = HandleTableEntry.of(kernel.layout)
    header = 0xFFFFC08AB1234560 if build > 9200 else 0xFFFFFA8001234560
    raw = encode_bitfield(kernel.layout, header, 0x1F0003, 6)
    assert form.decode(raw, 0) == (header, 0x1F0003, 6)
    assert form.decode(bytes(16), 0) == (None, 0, 0)


def test_win8_and_win81_put_the_pointer_at_different_bits():
    k8, k81 = kernel_for(9200), kernel_for(9600)
    raw = encode_bitfield(k81.layout, 0xFFFFC08AB1234560, 0x3, 1)
    assert HandleTableEntry.of(k8.layout).decode(raw, 0)[0] != 0xFFFFC08AB1234560


def test_win7_entry_bits():
    form = HandleTableEntry.of(kernel_for(7601).layout)
    header = 0xFFFFFA8001234560
    # unlocked bit 0, Inherit bit 1, Audit bit 2; protect-from-close is GrantedAccess bit 25
    raw = struct.pack("<QI4x", header | 1 | 2, 0x120089 | 0x2000000)
    assert form.decode(raw, 0) == (header, 0x120089, 1 | 2)
    raw = struct.pack("<QI4x", header | 1 | 4, 0x1F0003)
    assert form.decode(raw, 0) == (header, 0x1F0003, 4)


TABLE = 0xFFFF800000100000
TOP, MIDS, LOWS = 0xFFFF800000200000, 0xFFFF800000300000, 0xFFFF800001000000


def make_table(kernel, levels, pages, used):
    """A table of `levels` above `pages` low-level pages, with `used` {handle: header} entries."""
    space, layout = kernel.space, kernel.layout
    low = [LOWS + 0x1000 * i for i in range(pages)]
    if levels == 0:
        top = low[0]
    elif levels == 1:
        top = TOP
        space.put(TOP, struct.pack(f"<{pages}Q", *low))
    else:
        top = TOP
        mids = -(-pages // 512)
        space.put(TOP, struct.pack(f"<{mids}Q", *[MIDS + 0x1000 * j for j in range(mids)]))
        for j in range(mids):
            chunk = low[512 * j:512 * (j + 1)]
            space.put(MIDS + 0x1000 * j, struct.pack(f"<{len(chunk)}Q", *chunk))
    for page in low:
        space.page(page)
    for handle, header in used.items():
        index = handle // 4
        space.put(low[index // 256] + 16 * (index % 256), encode_bitfield(layout, header, 0x1F0003, 0))
    code_field = layout.field("_HANDLE_TABLE", "TableCode")
    bound_field = layout.field("_HANDLE_TABLE", "NextHandleNeedingPool")
    space.put(TABLE + code_field.offset, struct.pack("<Q", top | levels))
    space.put(TABLE + bound_field.offset, struct.pack("<I", pages * 256 * 4))
    return HandleTable(kernel.space, kernel.layout, TABLE)


HEADER = 0xFFFFC08A00000000


@pytest.mark.parametrize("levels,pages,handles", [
    (0, 1, [4, 0x3FC]),
    (1, 3, [4, 0x404, 0xBFC]),
    (2, 513, [4, 0x400 * 512 + 4, 0x400 * 512 + 0x3FC]),   # beyond 131072 slots: the second mid page
])
def test_levels_walk_and_lookup_agree(levels, pages, handles):
    kernel = kernel_for(19041)
    used = {h: HEADER + 0x100 * i for i, h in enumerate(handles)}
    table = make_table(kernel, levels, pages, used)
    assert table.levels == levels
    found = {e.handle: e.header for e in table.entries() if isinstance(e, Entry) and e.header}
    assert found == used
    for handle, header in used.items():
        status, entry, path = table.lookup(handle | 3)             # tag bits ignored
        assert status == "valid" and entry.header == header
        assert [step.level for step in path] == list(range(levels, -1, -1))
        assert path[-1].index == (handle // 4) % 256
    assert table.lookup(0)[0] == "first_slot"
    assert table.lookup(0x400 * pages)[0] == "past_end"
    assert table.lookup(0x400 * (pages - 1))[0] == "first_slot"


def test_free_and_never_allocated():
    kernel = kernel_for(19041)
    table = make_table(kernel, 0, 1, {4: HEADER, 12: HEADER + 0x100})
    # a closed handle keeps a free-list link in its second qword
    kernel.space.put(LOWS + 16 * 2 + 8, struct.pack("<Q", LOWS + 16 * 5))
    assert table.lookup(8)[0] == "free"
    kernel.space.put(LOWS + 16 * 5 + 8, struct.pack("<Q", LOWS + 16 * 6))
    assert table.lookup(20)[0] == "never_allocated"     # above the highest handle in use
    assert table.lookup(40)[0] == "never_allocated"     # all zero
    assert table.count() == 2


def test_unreadable_low_page_is_reported_and_the_walk_goes_on():
    kernel = kernel_for(19041)
    table = make_table(kernel, 1, 3, {4: HEADER, 0x804: HEADER + 0x100})
    del kernel.space.pages[LOWS + 0x1000]
    items = list(table.entries())
    problems = [i for i in items if isinstance(i, Problem)]
    assert len(problems) == 1 and f"{LOWS + 0x1000:#x}" in problems[0].message
    assert {e.handle for e in items if isinstance(e, Entry) and e.header} == {4, 0x804}


def test_corrupt_table_code():
    kernel = kernel_for(19041)
    make_table(kernel, 0, 1, {})
    kernel.space.put(TABLE + 8, struct.pack("<Q", LOWS | 3))
    with pytest.raises(CorruptTable, match="level bits 3"):
        HandleTable(kernel.space, kernel.layout, TABLE)
