"""Property-based tests (hypothesis): table arithmetic, entry decoding and name decoding on
random tables of every level and entry layout, laid out in raw memory (no guest needed).

Each property is stated against how Windows lays the structures out (docs/architecture.md):
entries are encoded here independently of the engine, from the profile's bit positions.
"""
from __future__ import annotations

import struct
from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings, strategies as st

from gdbhandles.errors import UnreadablePage
from gdbhandles.windows import layouts
from gdbhandles.windows.handle_table import Entry, HandleTable, HandleTableEntry, Problem
from gdbhandles.windows.unicode_string import UnicodeString

BUILDS = [7601, 9200, 9600, 14393, 19041, 22631]
PAGE = 0x1000
MASK64 = (1 << 64) - 1
TABLE, TOP, MIDS, LOWS = 0xFFFF800000100000, 0xFFFF800000200000, 0xFFFF800000300000, 0xFFFF800001000000
LAYOUTS = {build: layouts.for_build(build) for build in BUILDS}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class PageSpace:
    """Virtual memory as a dict of 4 KiB pages; anything else is unreadable."""

    def __init__(self):
        self.pages: dict[int, bytearray] = {}

    def put(self, va: int, data: bytes) -> None:
        while data:
            n = min(len(data), PAGE - va % PAGE)
            page = self.pages.setdefault(va - va % PAGE, bytearray(PAGE))
            page[va % PAGE:va % PAGE + n] = data[:n]
            va, data = va + n, data[n:]

    def read(self, va: int, size: int) -> bytes:
        out = bytearray()
        while size:
            base = va - va % PAGE
            if base not in self.pages:
                raise UnreadablePage(base)
            n = min(size, PAGE - va % PAGE)
            out += self.pages[base][va % PAGE:va % PAGE + n]
            va, size = va + n, size - n
        return bytes(out)

    def prefetch(self, ranges, fine: bool = False) -> None:
        """Nothing to cache: every read is local (AddressSpace.prefetch only saves round trips)."""

    def u64(self, va: int) -> int:
        return struct.unpack("<Q", self.read(va, 8))[0]


# --- entries ----------------------------------------------------------------------------------

def pointer_bits(layout) -> int:
    return layout.field("_HANDLE_TABLE_ENTRY", "ObjectPointerBits").bit_length


def encode(layout, header: int, granted: int, attributes: int) -> bytes:
    """An in-use entry as the kernel writes it, from the profile's fields (both forms)."""
    field = lambda name: layout.find("_HANDLE_TABLE_ENTRY", name)  # noqa: E731
    if field("ObjectPointerBits") is None:          # Win7: Object | unlocked | Inherit | Audit
        protect = 0x2000000 if attributes & 1 else 0
        return struct.pack("<QI4x", header | 1 | (attributes & 6), granted | protect)
    bits = field("ObjectPointerBits")
    low = 1 | (attributes << field("Attributes").bit_position)
    low |= ((header >> 4) & ((1 << bits.bit_length) - 1)) << bits.bit_position
    granted_field = field("GrantedAccessBits")
    raw = bytearray(struct.pack("<Q", low) + bytes(8))
    value = int.from_bytes(raw[granted_field.offset:granted_field.offset + 4], "little")
    value |= granted << granted_field.bit_position
    raw[granted_field.offset:granted_field.offset + 4] = value.to_bytes(4, "little")
    return bytes(raw)


@st.composite
def entries(draw, build):
    """(header, granted access, attributes) any kernel of `build` can hold in an entry."""
    layout = LAYOUTS[build]
    if layout.find("_HANDLE_TABLE_ENTRY", "ObjectPointerBits") is None:
        header = 0xFFFF000000000000 | draw(st.integers(0x800000000000 >> 4, (1 << 44) - 1)) << 4
        granted = draw(st.integers(0, 0xFFFFFFFF)) & ~0x2000000
    else:
        bits = pointer_bits(layout)                   # sign-extended: a kernel address has the top bit
        value = draw(st.integers(1 << (bits - 1), (1 << bits) - 1))
        header = ((MASK64 << (bits + 4)) | (value << 4)) & MASK64
        granted = draw(st.integers(0, (1 << layout.field("_HANDLE_TABLE_ENTRY", "GrantedAccessBits").bit_length) - 1))
    return header, granted, draw(st.integers(0, 7))


@SETTINGS
@given(st.data())
def test_entry_decoding_inverts_the_kernels_encoding(data):
    build = data.draw(st.sampled_from(BUILDS))
    header, granted, attributes = data.draw(entries(build))
    form = HandleTableEntry.of(LAYOUTS[build])
    raw = encode(LAYOUTS[build], header, granted, attributes)
    offset = data.draw(st.integers(0, 255)) * 16
    page = bytearray(PAGE)
    page[offset:offset + 16] = raw
    assert form.decode(bytes(page), offset) == (header, granted, attributes)
    assert form.decode(bytes(16), 0)[0] is None                 # a free entry holds no object


# --- tables -----------------------------------------------------------------------------------

@st.composite
def tables(draw):
    """(build, levels, low pages, {handle value: (header, granted, attributes)})."""
    build = draw(st.sampled_from(BUILDS))
    levels = draw(st.sampled_from([0, 1, 2]))
    pages = 1 if levels == 0 else draw(st.one_of(st.integers(1, 4), st.just(513))) if levels == 2 \
        else draw(st.integers(1, 512))
    indices = draw(st.sets(st.integers(1, pages * 256 - 1).filter(lambda i: i % 256), max_size=40))
    return build, levels, pages, {4 * i: draw(entries(build)) for i in sorted(indices)}


def lay_out(build, levels, pages, used) -> tuple[PageSpace, object]:
    """The table in raw memory, as ExpAllocateHandleTable and its growth leave it."""
    space, layout = PageSpace(), LAYOUTS[build]
    low = [LOWS + PAGE * i for i in range(pages)]
    for page in low:
        space.pages[page] = bytearray(PAGE)
    top = low[0]
    if levels == 1:
        top = TOP
        space.put(TOP, struct.pack(f"<{pages}Q", *low))
    elif levels == 2:
        top = TOP
        mids = [MIDS + PAGE * j for j in range(-(-pages // 512))]
        space.put(TOP, struct.pack(f"<{len(mids)}Q", *mids))
        for j, mid in enumerate(mids):
            chunk = low[512 * j:512 * (j + 1)]
            space.put(mid, struct.pack(f"<{len(chunk)}Q", *chunk))
    for value, (header, granted, attributes) in used.items():
        index = value // 4
        space.put(low[index // 256] + 16 * (index % 256), encode(layout, header, granted, attributes))
    free = [i for i in range(1, pages * 256) if i % 256 and 4 * i not in used]
    for here, after in zip(free, free[1:] + [None]):     # the free list links every free entry
        at = low[here // 256] + 16 * (here % 256)
        if layout.find("_HANDLE_TABLE_ENTRY", "NextFreeTableEntry"):      # Win7: the next handle value
            space.put(at + 8, struct.pack("<I", 4 * after if after else 0))
        else:                                                              # Win8+: the next entry's address
            space.put(at + 8, struct.pack("<Q", low[after // 256] + 16 * (after % 256) if after else 0))
    code = layout.field("_HANDLE_TABLE", "TableCode")
    bound = layout.field("_HANDLE_TABLE", "NextHandleNeedingPool")
    space.put(TABLE + code.offset, struct.pack("<Q", top | levels))
    space.put(TABLE + bound.offset, struct.pack("<I", pages * 1024))
    return space, layout


@SETTINGS
@given(tables(), st.data())
def test_walk_and_lookup_agree_with_the_level_arithmetic(table_spec, data):
    build, levels, pages, used = table_spec
    space, layout = lay_out(build, levels, pages, used)
    table = HandleTable(space, layout, TABLE)
    items = list(table.entries())
    assert not [i for i in items if isinstance(i, Problem)]
    found = {e.handle: (e.header, e.granted_access, e.attributes) for e in items
             if isinstance(e, Entry) and e.header is not None}
    assert found == used
    assert len(items) == pages * 255                              # every slot once, first slots skipped
    for value, decoded in used.items():
        tags = data.draw(st.integers(0, 3))
        status, entry, path = table.lookup(value | tags)
        assert status == "valid" and (entry.header, entry.granted_access, entry.attributes) == decoded
        index = value // 4
        expected = {2: [index // (256 * 512), index // 256 % 512, index % 256],
                    1: [index // 256, index % 256], 0: [index % 256]}[levels]
        assert [step.index for step in path] == expected
        assert [step.level for step in path] == list(range(levels, -1, -1))
    assert table.lookup(1024 * pages)[0] == "past_end"
    assert table.lookup(1024 * data.draw(st.integers(0, pages - 1)))[0] == "first_slot"
    unused = [i for i in range(1, min(pages * 256, 2048)) if i % 256 and 4 * i not in used]
    if unused:                       # free or never allocated: either way no object, and no error
        assert table.lookup(4 * data.draw(st.sampled_from(unused)))[0] in ("free", "never_allocated")


# --- names ------------------------------------------------------------------------------------

@SETTINGS
@given(st.sampled_from(BUILDS), st.text(max_size=200), st.integers(0, PAGE - 1), st.integers(0, 8))
def test_unicode_strings_decode_to_their_text(build, text, buffer_offset, slack):
    """Any text, its buffer anywhere (also across a page boundary), MaximumLength above Length."""
    space, layout = PageSpace(), LAYOUTS[build]
    data = text.encode("utf-16-le", "surrogatepass")
    buffer = LOWS + buffer_offset
    space.put(buffer, data + b"\0\0")
    length = layout.field("_UNICODE_STRING", "Length")
    maximum = layout.field("_UNICODE_STRING", "MaximumLength")
    pointer = layout.field("_UNICODE_STRING", "Buffer")
    raw = bytearray(16)
    raw[length.offset:length.offset + 2] = len(data).to_bytes(2, "little")
    raw[maximum.offset:maximum.offset + 2] = (len(data) + 2 * slack).to_bytes(2, "little")
    raw[pointer.offset:pointer.offset + 8] = (buffer if data else 0).to_bytes(8, "little")
    space.put(TOP, bytes(raw))
    decoded = UnicodeString.of(layout).read(space, TOP)
    assert decoded == (text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace") or None)
