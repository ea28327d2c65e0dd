"""_UNICODE_STRING: Length (bytes, not characters) and Buffer, read with the layout's size."""

from __future__ import annotations

import functools

from gdbhandles.errors import CorruptTable, HandleError
from gdbhandles.windows.layouts import Field
from gdbhandles.windows.memory import AddressSpace
from gdbhandles.windows.structure import Struct

__all__ = ["MAX_NAME", "UnicodeString"]

MAX_NAME = 0x1000            # bytes: a longer string is taken as corrupt and cut


class UnicodeString(Struct):
    NAME = "_UNICODE_STRING"

    @functools.cached_property
    def _plan(self) -> tuple[int, Field, Field, Field | None]:
        """(bytes to read, Length, Buffer, MaximumLength or None): the fields, resolved once."""
        length, buffer = self.field("Length"), self.field("Buffer")
        size = self.size() or max(length.offset + length.size, buffer.offset + buffer.size)
        return size, length, buffer, self.find("MaximumLength")

    def fields(self, space: AddressSpace, address: int) -> tuple[int, int]:
        """(`Length`, `Buffer`) as stored, read in one request of the layout's size."""
        size, length, buffer, _ = self._plan
        raw = space.read(address, size)
        return length.extract(raw), buffer.extract(raw)

    def extent(self, space: AddressSpace, address: int) -> tuple[int, int] | None:
        """(Buffer, Length cut at MAX_NAME) of the string at `address`, None when empty.
        CorruptTable when Length is odd or beyond MaximumLength (Length counts bytes of UTF-16
        characters, within the MaximumLength bytes of the buffer): such a string is damage."""
        size, length_field, buffer_field, maximum = self._plan
        raw = space.read(address, size)
        length, buffer = length_field.extract(raw), buffer_field.extract(raw)
        if not length or not buffer:
            return None
        if maximum is not None and length > maximum.extract(raw):
            raise CorruptTable(f"UNICODE_STRING at {address:#x}: Length {length:#x} is beyond MaximumLength "
                               f"{maximum.extract(raw):#x}")
        if length & 1:
            raise CorruptTable(f"UNICODE_STRING at {address:#x}: odd Length {length:#x} (UTF-16 has 2-byte units)")
        return buffer, min(length, MAX_NAME)

    def read(self, space: AddressSpace, address: int) -> str | None:
        """The text of the _UNICODE_STRING at `address` (Buffer, Length bytes); None when empty.
        Unpaired UTF-16 is replaced, never raised."""
        return self.text(space, self.extent(space, address))

    @staticmethod
    def text(space: AddressSpace, extent: tuple[int, int] | None) -> str | None:
        """The characters of an `extent()`; None for an empty string."""
        if extent is None:
            return None
        return space.read(*extent).decode("utf-16-le", "replace")

    def buffers(self, space: AddressSpace, addresses: list[int], known: dict | None = None) -> list[tuple[int, int]]:
        """(Buffer, Length) of every readable, non-empty string among `addresses`, to prefetch;
        each readable string's extent is also put in `known` (address -> extent or None)."""
        ranges = []
        for address in addresses:
            try:
                extent = self.extent(space, address)
            except HandleError:
                continue
            if known is not None:
                known[address] = extent
            if extent is not None:
                ranges.append(extent)
        return ranges
