"""_FILE_OBJECT: the device it was opened on and the path on that device."""

from __future__ import annotations

from gdbhandles.windows.memory import AddressSpace
from gdbhandles.windows.structure import Struct
from gdbhandles.windows.unicode_string import UnicodeString

__all__ = ["FileObject"]


class FileObject(Struct):
    NAME = "_FILE_OBJECT"

    def device(self, space: AddressSpace, body: int) -> int:
        """`DeviceObject`: the `_DEVICE_OBJECT` (\\Device\\HarddiskVolume3), 0 if none."""
        return self.field("DeviceObject").read(space.read, body)

    def file_name_address(self, body: int) -> int:
        """Address of `FileName`, the _UNICODE_STRING path on the device (\\Windows\\System32)."""
        return body + self.offset("FileName")

    def file_name(self, space: AddressSpace, body: int) -> str | None:
        """`FileName`'s text."""
        return UnicodeString.of(self.layout).read(space, self.file_name_address(body))
