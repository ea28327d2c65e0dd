"""_ETHREAD: the thread id, from `Cid.UniqueThread` (a _CLIENT_ID)."""

from __future__ import annotations

from gdbhandles.windows.memory import AddressSpace
from gdbhandles.windows.structure import Struct

__all__ = ["EThread", "ClientId"]


class ClientId(Struct):
    NAME = "_CLIENT_ID"


class EThread(Struct):
    NAME = "_ETHREAD"

    def thread_id_address(self, ethread: int) -> int:
        """Where `Cid.UniqueThread` is: far into the body (0x480 on 19041)."""
        return ethread + self.offset("Cid") + ClientId.of(self.layout).offset("UniqueThread")

    def thread_id(self, space: AddressSpace, ethread: int) -> int:
        """`Cid.UniqueThread`: the thread id (the same number space as process ids)."""
        return space.u64(self.thread_id_address(ethread))
