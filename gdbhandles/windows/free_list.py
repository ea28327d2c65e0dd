"""The free list of a _HANDLE_TABLE: the order in which the kernel hands out free entries.

Windows 7 keeps the first free handle value in `_HANDLE_TABLE.FirstFreeHandle` and each free
entry the next value in `NextFreeTableEntry` (0 ends the list). Windows 8 and later keep
entry addresses: `FreeLists[0].FirstFreeHandleEntry` (a `_HANDLE_TABLE_FREE_LIST`) and
`_HANDLE_TABLE_ENTRY.NextFreeHandleEntry`; builds whose profile also has FirstFreeHandle
(9200) start from that value when FreeLists[0] is empty. Multiprocessor kernels may keep
more free lists after the first; only FreeLists[0] is followed (the walk says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gdbhandles.errors import HandleError
from gdbhandles.windows.handle_table import ENTRY_SIZE, HANDLE_STEP, LOW_COUNT, HandleTable

__all__ = ["FreeList", "free_list"]


@dataclass
class FreeList:
    """Free-list position (0 = handed out next) by handle value, and what stopped the walk early."""
    position: dict[int, int] = field(default_factory=dict)
    source: str = ""
    problem: str | None = None


def _entry_handles(table: HandleTable) -> dict[int, int]:
    """Entry address -> handle value, for every entry of every allocated low-level page."""
    found = {}
    for first, page, _path in table.low_pages():
        if page:
            for i in range(1, min(LOW_COUNT, table.slots - first)):
                found[page + i * ENTRY_SIZE] = (first + i) * HANDLE_STEP
    return found


def _head(table: HandleTable) -> tuple[str, int]:
    """('value', first free handle value) or ('entry', first free entry address); 0: empty."""
    layout, space = table.layout, table.space
    lists = layout.find("_HANDLE_TABLE", "FreeLists")
    if lists is not None:
        first = layout.offset("_HANDLE_TABLE_FREE_LIST", "FirstFreeHandleEntry")
        entry = space.u64(table.address + lists.offset + first)
        if entry or layout.find("_HANDLE_TABLE", "FirstFreeHandle") is None:
            return "entry", entry
    value = layout.field("_HANDLE_TABLE", "FirstFreeHandle").read(space.read, table.address)
    return "value", value


def free_list(table: HandleTable) -> FreeList:
    """Follow the list from its head, at most one step per slot; a loop or a link to
    something that is not an entry of this table ends it with `problem` set."""
    layout, space = table.layout, table.space
    by_entry = _entry_handles(table)
    by_value = {value: address for address, value in by_entry.items()}
    old_link = layout.find("_HANDLE_TABLE_ENTRY", "NextFreeTableEntry")
    link = old_link or layout.field("_HANDLE_TABLE_ENTRY", "NextFreeHandleEntry")
    kind, head = _head(table)
    result = FreeList(source="FirstFreeHandle" if kind == "value" else "FreeLists[0].FirstFreeHandleEntry")
    current = head
    while current:
        if kind == "value":
            value, address = current, by_value.get(current)
        else:
            value, address = by_entry.get(current), current
        if value is None or address is None:
            result.problem = f"free list link {current:#x} is not an entry of this table"
            break
        if value in result.position:
            result.problem = f"free list loops back to handle {value:#x}"
            break
        result.position[value] = len(result.position)
        try:
            current = link.read(space.read, address)
        except HandleError as exc:
            result.problem = f"free entry {address:#x}: {exc}"
            break
        kind = "value" if old_link is not None else "entry"
    return result
