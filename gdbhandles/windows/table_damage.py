"""Damage met walking one _HANDLE_TABLE's pages, gathered into one line per damaged page.

A walk uses every mid- and low-level page once; a page named by a second slot (the
amplification a hostile table uses to make a walk yield millions of records), a NULL slot
below NextHandleNeedingPool and an unreadable page are noted as met and reported at the
end of the walk, one Problem per (table page, kind of damage, page named again), with the
handles they cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from gdbhandles.errors import HandleError

__all__ = ["Problem", "TableDamage", "LEVEL_NAME"]

HANDLES_PER_PAGE = 255          # entries of a low-level page that can hold a handle


@dataclass(frozen=True)
class Problem:
    """Something a walk could not read; it goes on after reporting it."""
    message: str
    handle: int | None = None


LEVEL_NAME = {2: "top-level", 1: "mid-level", 0: "low-level"}


class TableDamage:
    """What one walk of a table found unusable: pages named twice, NULL slots below the bound,
    unreadable pages; one Problem per (table page, kind of damage, page named again)."""

    def __init__(self, table: int):
        """`table`: the _HANDLE_TABLE's address, which every line names."""
        self.table = table
        self.seen: set[int] = set()                 # every mid and low page already used
        self.found: dict[tuple, list] = {}          # (parent, kind, page) -> [slots, pages lost, detail]
        self.problems: list[Problem] = []

    def note(self, parent: int, kind: str, page: int, lost: int, detail: str = "", slot: int | None = None) -> None:
        key = (parent, kind, page if kind == "named again" else None)
        slots, pages, _ = self.found.setdefault(key, [[], 0, detail or f"{page:#x}"])
        if slot is not None:
            slots.append(slot)
        self.found[key][1] = pages + lost

    def children(self, read_pointers, parent: int, count: int, lost):
        """(slot, page) of the first `count` pointers of the table page `parent` whose page is
        usable and not yet used; `lost(slot)` is how many low-level pages a slot covers."""
        try:
            pointers = read_pointers(parent, count)
        except HandleError as exc:
            self.note(parent, "unreadable page", parent, sum(lost(i) for i in range(count)), str(exc))
            return
        for slot, child in enumerate(pointers):
            if not child:
                self.note(parent, "NULL", 0, lost(slot), slot=slot)
            elif child in self.seen:
                self.note(parent, "named again", child, lost(slot), slot=slot)
            else:
                self.seen.add(child)
                yield slot, child

    def report(self) -> list[Problem]:
        here = f"handle table {self.table:#x}"
        out = list(self.problems)
        for (parent, kind, page), (slots, pages, detail) in self.found.items():
            where = f"{_slots(slots)} of table page {parent:#x}" if slots else f"table page {parent:#x}"
            lost = f"up to {pages * HANDLES_PER_PAGE} handles not listed"
            if kind == "NULL":
                text = f"{where} NULL below NextHandleNeedingPool: {lost}"
            elif kind == "named again":
                text = f"page {page:#x} named again by {where} (a damaged or hostile table): {lost}"
            elif kind == "unreadable page":
                text = f"table page {parent:#x} unreadable ({detail}): its {pages} low-level page(s), {lost}"
            else:
                text = f"{pages} low-level page(s) under {where} unreadable ({detail}): {lost}"
            out.append(Problem(f"{here}: {text}"))
        return out


def _slots(slots: list[int]) -> str:
    """'slot 3' or '127 slots (1-127)' or '3 slots (1, 4, 9)'."""
    if len(slots) == 1:
        return f"slot {slots[0]}"
    if slots == list(range(slots[0], slots[-1] + 1)):
        return f"{len(slots)} slots ({slots[0]}-{slots[-1]})"
    shown = ", ".join(map(str, slots[:4])) + (", …" if len(slots) > 4 else "")
    return f"{len(slots)} slots ({shown})"
