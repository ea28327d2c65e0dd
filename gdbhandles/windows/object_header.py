"""_OBJECT_HEADER: the object's type (cookie-encoded TypeIndex) and its optional headers.

Body = header + `Body`. Type = `ObTypeIndexTable[TypeIndex]`, with TypeIndex decoded as
`TypeIndex ^ cookie ^ ((header >> 8) & 0xff)` on builds with `ObHeaderCookie`. Optional
headers precede the header; the one of InfoMask bit b sits at
`header - ObpInfoMaskToOffset[InfoMask & ((b << 1) - 1)]`.
"""

from __future__ import annotations

import functools
import operator
import struct
from typing import Callable, NamedTuple

from gdbhandles.errors import HandleError
from gdbhandles.windows.kernel import Kernel
from gdbhandles.windows.structure import Struct
from gdbhandles.windows.unicode_string import UnicodeString

__all__ = ["MAX_DECODED", "NAME_INFO_BIT", "ObjectHeader", "ObjectHeaderNameInfo", "ObjectType", "Header", "Headers"]

NAME_INFO_BIT = 0x02
TYPE_SLOTS = 256             # ObTypeIndexTable: at most 256 types
MAX_DECODED = 1 << 16        # objects whose header (and name) is kept decoded, then start afresh


class ObjectHeader(Struct):
    NAME = "_OBJECT_HEADER"

    def body_offset(self) -> int:
        """`Body`: where the object itself starts (0x30 on every x64 build)."""
        return self.offset("Body")

    def type_index(self, raw: bytes, base: int = 0) -> int:
        """`TypeIndex` as stored (cookie-encoded on Win10+)."""
        return self.field("TypeIndex").extract(raw, base)

    def info_mask(self, raw: bytes, base: int = 0) -> int:
        """`InfoMask`: which optional headers precede this one."""
        return self.field("InfoMask").extract(raw, base)


class ObjectHeaderNameInfo(Struct):
    NAME = "_OBJECT_HEADER_NAME_INFO"

    def name(self, kernel: Kernel, info: int) -> str | None:
        """`Name`: the object's own name (last path component)."""
        return UnicodeString.of(self.layout).read(kernel.space, info + self.offset("Name"))

    def name_address(self, info: int) -> int:
        return info + self.offset("Name")

    def directory(self, kernel: Kernel, info: int) -> int:
        """`Directory`: the object directory holding it (0 for the root)."""
        return kernel.space.u64(info + self.offset("Directory"))


class ObjectType(Struct):
    NAME = "_OBJECT_TYPE"

    def name(self, kernel: Kernel, type_object: int) -> str | None:
        """`Name`: "File", "Key", "ALPC Port" …"""
        return UnicodeString.of(self.layout).read(kernel.space, type_object + self.offset("Name"))


class Header(NamedTuple):
    """What one _OBJECT_HEADER says, before any name is read (a tuple: one per object of a walk)."""
    header: int
    body: int
    type: str | None
    info_mask: int
    problem: str | None = None       # damage met reading it (a TypeIndex out of range)


class Headers:
    """The object headers of one kernel; type names and decoded headers are cached."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.struct = ObjectHeader.of(kernel.layout)
        self.types: dict[int, str | None] = {}
        self.decoded: dict[int, Header] = {}
        self._type_end: int | None = None

    def type_of_index(self, index: int) -> str | None:
        """The name of `ObTypeIndexTable[index]`; None when that slot is empty or unreadable."""
        if index not in self.types:
            table = self.kernel.globals["ObTypeIndexTable"]
            try:
                type_object = self.kernel.space.u64(table + 8 * index)
                self.types[index] = ObjectType.of(self.kernel.layout).name(self.kernel, type_object) \
                    if type_object else None
            except HandleError:
                self.types[index] = None
        return self.types[index]

    def type_end(self) -> int:
        """One past the last type index: ObTypeIndexTable holds types from index 2 up to its
        first NULL (at most 256 slots); an unreadable table counts as ending at once."""
        if self._type_end is None:
            table, end = self.kernel.globals["ObTypeIndexTable"], 2
            try:
                pointers = self.kernel.space.read(table, 8 * TYPE_SLOTS)
                while end < TYPE_SLOTS and any(pointers[8 * end:8 * end + 8]):
                    end += 1
                self._prefetch_types(pointers[16:8 * end])
            except HandleError:
                pass
            self._type_end = end
        return self._type_end

    def _prefetch_types(self, pointers: bytes) -> None:
        """Bring the Name of every type object, then its characters, into the cache in few reads:
        the types do not change while the guest is stopped, and lookups meet a new one each time."""
        space = self.kernel.space
        offset = ObjectType.of(self.kernel.layout).offset("Name")
        names = [pointer + offset for (pointer,) in struct.iter_unpack("<Q", pointers)]
        space.prefetch([(name, 16) for name in names])
        space.prefetch(UnicodeString.of(self.kernel.layout).buffers(space, names))

    @functools.cached_property
    def _plan(self) -> tuple[int, int, Callable[[bytes], int], Callable[[bytes], int], int]:
        """(first offset, size, TypeIndex from those bytes, InfoMask from them, Body offset):
        what read() needs, resolved once."""
        start, size = self.struct.span("TypeIndex", "InfoMask")

        def getter(path: str) -> Callable[[bytes], int]:
            field = self.struct.field(path)
            if field.size == 1 and field.bit_length is None:       # a UCHAR (every x64 build)
                return operator.itemgetter(field.offset - start)
            return lambda raw: field.extract(raw, -start)
        return start, size, getter("TypeIndex"), getter("InfoMask"), self.struct.body_offset()

    def read(self, header: int) -> Header:
        """Type and InfoMask of the object at `header` (3 bytes read); HandleError if unreadable.
        A TypeIndex outside ObTypeIndexTable gives type None and a `problem`."""
        known = self.decoded.get(header)
        if known is None:
            if len(self.decoded) >= MAX_DECODED:         # bounded like the line cache: start afresh
                self.decoded.clear()
            known = self.decoded[header] = self._decode(header)
        return known

    def _decode(self, header: int) -> Header:
        start, size, type_index, info_mask, body_offset = self._plan
        kernel = self.kernel
        raw = kernel.space.read(header + start, size)
        index = type_index(raw)
        if kernel.header_cookie is not None:         # stored encoded with ObHeaderCookie (Win10+)
            index ^= kernel.header_cookie ^ ((header >> 8) & 0xFF)
        body, problem, type_name = header + body_offset, None, None
        if 2 <= index < (self._type_end or self.type_end()):
            type_name = self.types[index] if index in self.types else self.type_of_index(index)
            if type_name is None:
                problem = f"object {body:#x}: the type object of TypeIndex {index:#x} is unreadable: type unknown"
        else:
            problem = (f"object {body:#x}: TypeIndex {index:#x} is out of range (ObTypeIndexTable holds "
                       f"types 0x2-{self.type_end() - 1:#x}): type unknown")
        return Header(header, body, type_name, info_mask(raw), problem)

    def at_body(self, body: int) -> Header:
        return self.read(body - self.struct.body_offset())

    def optional(self, header: Header, bit: int) -> int | None:
        """Address of the optional header of InfoMask `bit`, None if this object has none."""
        if not header.info_mask & bit:
            return None
        return header.header - self.kernel.info_mask_to_offset[header.info_mask & (bit | (bit - 1))]

    def name_info(self, header: Header) -> int | None:
        """Address of the `_OBJECT_HEADER_NAME_INFO` (InfoMask 0x02), or None."""
        return self.optional(header, NAME_INFO_BIT)

    def prefetch(self, headers: list[int], fine: bool = False) -> None:
        """Bring the TypeIndex and InfoMask of many headers into the cache in few reads; `fine`
        reads small pieces instead of whole lines (when few names will be read next)."""
        fresh = sorted({h for h in headers if h not in self.decoded})
        if fresh:
            start, size = self._plan[:2]
            self.kernel.space.prefetch([(h + start, size) for h in fresh], fine)
