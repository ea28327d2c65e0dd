"""A registry key object: _CM_KEY_BODY → _CM_KEY_CONTROL_BLOCK chain → _CM_NAME_CONTROL_BLOCK.

The key's full path (`\\REGISTRY\\MACHINE\\SOFTWARE\\…`) is the names of its control block and
of every `ParentKcb` above it; a name block holds the name compressed (one byte per
character) or as UTF-16.
"""

from __future__ import annotations

from gdbhandles.errors import CorruptTable, DamagedChain
from gdbhandles.windows.memory import AddressSpace
from gdbhandles.windows.structure import Struct

__all__ = ["KeyBody", "KeyControlBlock", "NameControlBlock", "key_path", "MAX_KEY_DEPTH"]

MAX_KEY_DEPTH = 512         # control blocks above a key (registry paths nest at most 512 deep)
MAX_KEY_NAME = 255 * 2      # bytes of a key's own name (255 characters, UTF-16)
NAME_HEAD = 0x40            # bytes of a name prefetched with its block (most key names are shorter)


class KeyBody(Struct):
    NAME = "_CM_KEY_BODY"

    def control_block(self, space: AddressSpace, body: int) -> int:
        """`KeyControlBlock`: the key's _CM_KEY_CONTROL_BLOCK."""
        return self.field("KeyControlBlock").read(space.read, body)


class KeyControlBlock(Struct):
    NAME = "_CM_KEY_CONTROL_BLOCK"

    def name_block(self, space: AddressSpace, kcb: int) -> int:
        """`NameBlock`: the _CM_NAME_CONTROL_BLOCK holding this key's own name."""
        return self.field("NameBlock").read(space.read, kcb)

    def parent(self, space: AddressSpace, kcb: int) -> int:
        """`ParentKcb`: the parent key's control block, 0 at the root."""
        return self.field("ParentKcb").read(space.read, kcb)

    def links_end(self) -> int:
        """Bytes from the block's start through `NameBlock` and `ParentKcb`: what the chain reads."""
        return max(f.offset + f.size for f in (self.field("NameBlock"), self.field("ParentKcb")))


class NameControlBlock(Struct):
    NAME = "_CM_NAME_CONTROL_BLOCK"

    def name(self, space: AddressSpace, block: int) -> str:
        """`Name` (`NameLength` bytes), Latin-1 when the `Compressed` bit is set, else UTF-16."""
        at = self.offset("Name")
        head = space.read(block, at)
        length = self.field("NameLength").extract(head)
        if length > MAX_KEY_NAME:
            raise CorruptTable(f"key name block {block:#x}: NameLength {length:#x} (key names hold at most "
                               "255 characters)")
        raw = space.read(block + at, length)
        if self.field("Compressed").extract(head):
            return raw.decode("latin-1")
        return raw.decode("utf-16-le", "replace")


def key_path(space: AddressSpace, layout, body: int, known: dict[int, str | None] | None = None) -> str | None:
    """\\REGISTRY\\… of the key body at `body`, up through ParentKcb; None without a name.
    `known` (control block -> path) keeps the path of every control block met, so the many
    handles to one key, and keys under one parent, read the shared chain once. Each level's
    name block comes in one gathered read with the parent's control block."""
    kcbs, names = KeyControlBlock.of(layout), NameControlBlock.of(layout)
    kcb = KeyBody.of(layout).control_block(space, body)
    known = {} if known is None else known
    chain: list[tuple[int, str | None]] = []
    seen: set[int] = set()
    prefix: str | None = None
    while kcb:
        if kcb in known:
            prefix = known[kcb]
            break
        if kcb in seen:
            raise DamagedChain(f"key control block {kcb:#x} is its own ancestor (the ParentKcb chain loops)")
        if len(chain) >= MAX_KEY_DEPTH:
            raise DamagedChain(f"key control block {kcb:#x} is more than {MAX_KEY_DEPTH} ParentKcb links deep")
        block, parent = kcbs.name_block(space, kcb), kcbs.parent(space, kcb)
        space.prefetch([(block, names.offset("Name") + NAME_HEAD)] * bool(block) +
                       [(parent, kcbs.links_end())] * bool(parent and parent not in known))
        chain.append((kcb, names.name(space, block) if block else None))
        seen.add(kcb)
        kcb = parent
    for met, name in reversed(chain):
        if name is not None:
            prefix = (prefix or "") + "\\" + name
        known[met] = prefix
    return prefix
