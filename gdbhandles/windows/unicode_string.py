"""_UNICODE_STRING: Length (bytes, not characters) and Buffer, read with the layout's size."""

from __future__ import annotations

from gdbhandles.errors import CorruptTable, HandleError
from gdbhandles.windows.memory import AddressSpace
from gdbhandles.windows.structure import Struct

__all__ = ["MAX_NAME", "UnicodeString"]

MAX_NAME = 0x1000            # bytes: a longer string is taken as corrupt and cut


class UnicodeString(Struct):
    NAME = "_UNICODE_STRING"

    def _raw(self, space: AddressSpace, address: int) -> bytes:
        """The structure's bytes, read in one request of the layout's size."""
        length, buffer = self.field("Length"), self.field("Buffer")
        return space.read(address, self.size() or max(length.offset + length.size, buffer.offset + buffer.size))

    def fields(self, space: AddressSpace, address: int) -> tuple[int, int]:
        """(`Length`, `Buffer`) as stored."""
        raw = self._raw(space, address)
        return self.field("Length").extract(raw), self.field("Buffer").extract(raw)

    def extent(self, space: AddressSpace, address: int) -> tuple[int, int] | None:
        """(Buffer, Length cut at MAX_NAME) of the string at `address`, None when empty.
        CorruptTable when Length is odd or beyond MaximumLength (Length counts bytes of UTF-16
        characters, within the MaximumLength bytes of the buffer): such a string is damage."""
        raw = self._raw(space, address)
        length, buffer = self.field("Length").extract(raw), self.field("Buffer").extract(raw)
        if not length or not buffer:
            return None
        maximum = self.find("MaximumLength")
        if maximum is not None and length > maximum.extract(raw):
            raise CorruptTable(f"UNICODE_STRING at {address:#x}: Length {length:#x} is beyond MaximumLength "
                               f"{maximum.extract(raw):#x}")
        if length & 1:
            raise CorruptTable(f"UNICODE_STRING at {address:#x}: odd Length {length:#x} (UTF-16 has 2-byte units)")
        return buffer, min(length, MAX_NAME)

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
