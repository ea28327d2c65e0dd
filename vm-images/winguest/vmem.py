"""Kernel virtual memory of the guest: regions per Windows build, pools with pool headers."""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from .paging import MM_READWRITE, PFN_MASK, TRANSITION, AddressSpace, canonical
from .physmem import PAGE, PhysicalMemory


@dataclass
class Regions:
    """Where this build puts things in the kernel half (canonical VAs)."""
    self_ref: int            # PML4 slot of the self-reference
    kernel_base: int         # ntoskrnl, 2 MiB aligned
    nonpaged: int            # nonpaged pool start
    paged: int               # paged pool start
    stacks: int              # kernel stacks
    user_shared: int = 0xFFFFF78000000000


def choose_regions(build: int, rng: random.Random) -> Regions:
    """Win7/8.0: the 16 TB system space from 0xfffff000`00000000 (8.0's handle entries keep only
    41 pointer bits); 8.1/10 RTM: fixed 0xffffe000/0xffffc000; 1607+: randomised slots."""
    kernel_base = 0xFFFFF80000000000 + rng.randrange(16, 0x3F00) * 0x200000
    if build < 9600:
        return Regions(0x1ED, 0xFFFFF80002000000 + rng.randrange(0, 16) * 0x200000,
                       0xFFFFFA8000000000 + rng.randrange(0, 64) * 0x100000,
                       0xFFFFF8A000000000 + rng.randrange(0, 64) * 0x100000,
                       0xFFFFF88000000000 + rng.randrange(0, 64) * 0x100000)
    if build < 14393:
        return Regions(0x1ED, kernel_base,
                       0xFFFFE00000000000 + rng.randrange(0, 0x100) * 0x40000000,
                       0xFFFFC00000000000 + rng.randrange(0, 0x100) * 0x40000000,
                       0xFFFFD00000000000 + rng.randrange(0, 0x100) * 0x40000000)
    slots = rng.sample(range(0x100, 0x1EC), 4)

    def in_slot(slot: int) -> int:
        return canonical((slot << 39) | (rng.randrange(0x10, 0x7F00) << 28))
    return Regions(slots[0], kernel_base, in_slot(slots[1]), in_slot(slots[2]), in_slot(slots[3]))


class KernelMemory:
    """The System address space's kernel half as the builder sees it: map, read, write by VA."""

    def __init__(self, phys: PhysicalMemory, space: AddressSpace, glob: bool):
        self.phys = phys
        self.space = space
        self.glob = glob
        self.transition: list[int] = []

    def back(self, va: int, npages: int, *, write=True, execute=False) -> int:
        """Fresh physical pages mapped at va; returns the first physical page."""
        first = None
        for i in range(npages):
            pa = self.phys.alloc()
            first = pa if first is None else first
            self.space.map(va + i * PAGE, pa, write=write, execute=execute, glob=self.glob)
        return first

    def pa(self, va: int) -> int:
        pa = self.space.translate(va)
        if pa is None:
            raise KeyError(f"{va:#x} not mapped")
        return pa

    def write(self, va: int, data: bytes) -> None:
        while data:
            n = min(len(data), PAGE - (va & 0xFFF))
            self.phys.write(self.pa(va), data[:n])
            va, data = va + n, data[n:]

    def read(self, va: int, n: int) -> bytes:
        out = b""
        while n:
            k = min(n, PAGE - (va & 0xFFF))
            out += self.phys.read(self.pa(va), k)
            va, n = va + k, n - k
        return out

    def u64(self, va: int, value: int) -> None:
        self.write(va, (value & (2**64 - 1)).to_bytes(8, "little"))

    def u32(self, va: int, value: int) -> None:
        self.write(va, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def list_entry(self, va: int, flink: int, blink: int) -> None:
        self.write(va, struct.pack("<QQ", flink, blink))

    def unicode_string(self, va: int, buffer: int, text: str) -> None:
        n = len(text.encode("utf-16-le"))
        self.write(va, struct.pack("<HH4xQ", n, n + 2, buffer))

    def make_transition(self, va: int) -> None:
        """Turn a mapped 4 KiB page into a transition PTE (standby list): same frame, not valid."""
        pa = self.pa(va) & PFN_MASK
        self.space.set_pte(va, pa | TRANSITION | (MM_READWRITE << 5))
        self.transition.append(va & ~0xFFF)


class Pool:
    """One pool region: small blocks behind 16-byte _POOL_HEADERs, and whole pages."""

    HEADER = 16

    def __init__(self, kmem: KernelMemory, base: int, pool_type: int, rng: random.Random):
        self.kmem = kmem
        self.next_page = base
        self.pool_type = pool_type    # 1 = NonPagedPool, 2 = PagedPool (+1 as stored)
        self.rng = rng
        self.cur = self.end = 0
        self.prev_size = 0

    def pages(self, n: int, *, gap: bool = False) -> int:
        """n fresh page-aligned pages (big allocations carry no pool header)."""
        if gap or self.rng.random() < 0.05:
            self.next_page += PAGE * self.rng.randrange(1, 4)   # never-mapped holes, as pools have
        va = self.next_page
        self.kmem.back(va, n)
        self.next_page += n * PAGE
        return va

    def alloc(self, size: int, tag: bytes, accept=None) -> int:
        """Block data address (16-aligned) after a pool header; accept(va) may veto a placement."""
        need = -(-(size + self.HEADER) // 16) * 16
        assert need <= PAGE
        while True:
            if self.cur + need > self.end:
                self.cur = self.pages(1)
                self.end = self.cur + PAGE
                self.prev_size = 0
            data = self.cur + self.HEADER
            if accept is None or accept(data):
                break
            self.cur += 16
        hdr = (self.prev_size // 16) | ((need // 16) << 16) | ((self.pool_type + 1) << 24)
        self.kmem.write(self.cur, struct.pack("<II", hdr, int.from_bytes(tag.ljust(4)[:4], "little")))
        self.prev_size = need
        self.cur += need
        return data
