"""_UNICODE_STRING: Length (bytes, not characters) and Buffer, read with the layout's size."""

from __future__ import annotations

from gdbhandles.errors import HandleError
from gdbhandles.windows.memory import AddressSpace
from gdbhandles.windows.structure import Struct

__all__ = ["MAX_NAME", "UnicodeString"]

MAX_NAME = 0x1000            # bytes: a longer string is taken as corrupt and cut


class UnicodeString(Struct):
    NAME = "_UNICODE_STRING"

    def fields(self, space: AddressSpace, address: int) -> tuple[int, int]:
        """(`Length`, `Buffer`) as stored, read in one request of the layout's size."""
        length, buffer = self.field("Length"), self.field("Buffer")
        raw = space.read(address, self.size() or max(length.offset + length.size, buffer.offset + buffer.size))
        return length.extract(raw), buffer.extract(raw)

    def extent(self, space: AddressSpace, address: int) -> tuple[int, int] | None:
        """(Buffer, Length cut at MAX_NAME) of the string at `address`, None when empty."""
        length, buffer = self.fields(space, address)
        if not length or not buffer:
            return None
        return buffer, min(length, MAX_NAME) & ~1

    def read(self, space: AddressSpace, address: int) -> str | None:
        """The text of the _UNICODE_STRING at `address` (Buffer, Length bytes); None when empty.
        Unpaired UTF-16 is replaced, never raised."""
        extent = self.extent(space, address)
        if extent is None:
            return None
        return space.read(*extent).decode("utf-16-le", "replace")

    def buffers(self, space: AddressSpace, addresses: list[int]) -> list[tuple[int, int]]:
        """(Buffer, Length) of every readable, non-empty string among `addresses`, to prefetch."""
        ranges = []
        for address in addresses:
            try:
                extent = self.extent(space, address)
            except HandleError:
                continue
            if extent is not None:
                ranges.append(extent)
        return ranges
