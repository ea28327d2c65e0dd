"""x64 4-level page tables as Windows builds them (hardware bits plus MMPTE software forms)."""
from __future__ import annotations

from .physmem import PAGE, PhysicalMemory

P, RW, US, PWT, PCD, A, D, PS, G = 1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80, 0x100
SW_WRITE = 1 << 11          # MMPTE_HARDWARE.Write (software), only meaningful when valid
TRANSITION = 1 << 11        # MMPTE_TRANSITION.Transition, only meaningful when not valid
NX = 1 << 63
PFN_MASK = 0x000FFFFFFFFFF000
MM_READWRITE = 4            # MMPTE protection value (bits 5..9 of a non-valid PTE)
LARGE = 0x200000


def canonical(va: int) -> int:
    va &= (1 << 48) - 1
    return va | (0xFFFF << 48) if va >> 47 else va


def indices(va: int) -> tuple[int, int, int, int]:
    return (va >> 39) & 511, (va >> 30) & 511, (va >> 21) & 511, (va >> 12) & 511


def leaf_flags(write: bool, execute: bool, user: bool, glob: bool) -> int:
    f = P | A
    if write:
        f |= RW | D | SW_WRITE
    if user:
        f |= US
    elif glob:
        f |= G
    if not execute:
        f |= NX
    return f


class AddressSpace:
    """One PML4 tree. Accessed/dirty bits are preset so the CPU never rewrites the tables."""

    def __init__(self, phys: PhysicalMemory, pml4: int | None = None):
        self.phys = phys
        self.pml4 = pml4 if pml4 is not None else phys.alloc()

    def _entry(self, table: int, idx: int) -> int:
        return int.from_bytes(self.phys.read(table + idx * 8, 8), "little")

    def _set(self, table: int, idx: int, value: int) -> None:
        self.phys.write(table + idx * 8, value.to_bytes(8, "little"))

    def _table(self, table: int, idx: int, user: bool) -> int:
        """The next-level table under table[idx], created if missing."""
        e = self._entry(table, idx)
        if e & P:
            assert not e & PS, "large page where a table is needed"
            if user and not e & US:
                self._set(table, idx, e | US)
            return e & PFN_MASK
        new = self.phys.alloc()
        self._set(table, idx, new | P | RW | A | D | (US if user else 0))
        return new

    def set_pte(self, va: int, value: int, user: bool = False) -> None:
        """Store any 4 KiB PTE value (valid, transition, paged out) for va."""
        i4, i3, i2, i1 = indices(va)
        pdpt = self._table(self.pml4, i4, user)
        pd = self._table(pdpt, i3, user)
        pt = self._table(pd, i2, user)
        self._set(pt, i1, value)

    def map(self, va: int, pa: int, *, write=True, execute=False, user=False, glob=True) -> None:
        self.set_pte(va, pa | leaf_flags(write, execute, user, glob), user)

    def map_large(self, va: int, pa: int, *, write=True, execute=False, glob=True) -> None:
        assert va % LARGE == 0 and pa % LARGE == 0
        i4, i3, i2, _ = indices(va)
        pdpt = self._table(self.pml4, i4, False)
        pd = self._table(pdpt, i3, False)
        assert not self._entry(pd, i2) & P
        self._set(pd, i2, pa | PS | leaf_flags(write, execute, False, glob))

    def set_pml4e(self, idx: int, value: int) -> None:
        self._set(self.pml4, idx, value)

    def pml4e(self, idx: int) -> int:
        return self._entry(self.pml4, idx)

    def translate(self, va: int) -> int | None:
        """Physical address of va, following large pages and transition PTEs as Windows tools do."""
        table = self.pml4
        for level, idx in zip((4, 3, 2, 1), indices(va)):
            e = self._entry(table, idx)
            if not e & P:
                if level == 1 and e & TRANSITION and not e & (1 << 10):
                    return (e & PFN_MASK) | (va & 0xFFF)
                return None
            if level == 2 and e & PS:
                return (e & PFN_MASK & ~(LARGE - 1)) | (va & (LARGE - 1))
            table = e & PFN_MASK
        return table | (va & 0xFFF)
