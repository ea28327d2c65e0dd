"""_HANDLE_TABLE and its entries: levels, Win7 and Win8+ entry forms, free lists."""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from .objects import KObject
from .profiles import Layout
from .vmem import KernelMemory, Pool

LOW = 256                  # entries per low-level page
MID = 512                  # pointers per mid/top page
PROTECT_CLOSE, INHERIT, AUDIT = 1, 2, 4          # attribute bits of the record contract
WIN7_PROTECT_BIT = 0x2000000                     # ObpAccessProtectCloseBit in GrantedAccess
ADDITIONAL_INFO_SIGNATURE = 0xFFFFFFFE           # EX_ADDITIONAL_INFO_SIGNATURE, first slot


@dataclass
class Entry:
    obj: KObject | None       # None: free
    access: int = 0
    attributes: int = 0
    target: int = 0           # address the entry encodes (header, or body for PspCidTable)


@dataclass
class HandleTable:
    """A process's table before it is laid out: slots by index, then pages in kernel memory."""
    layout: Layout
    rng: random.Random
    pid: int
    quota_process: int = 0
    cid: bool = False
    slots: dict[int, Entry] = field(default_factory=dict)
    next_index: int = 1
    va: int = 0
    table_code: int = 0
    pages: list[int] = field(default_factory=list)       # low-level page VAs in index order
    next_handle_needing_pool: int = 0
    freed: list[int] = field(default_factory=list)
    reserve_pages: int = 1      # low-level pages to allocate at least (room to grow at run time)

    def add(self, obj: KObject, access: int, attributes: int = 0, index: int | None = None) -> int:
        """Put obj in the next free slot (or `index`); returns the handle value."""
        if index is None:
            while self.next_index % LOW == 0 or self.next_index in self.slots:
                self.next_index += 1
            index = self.next_index
            self.next_index += 1
        assert index % LOW and index not in self.slots
        target = obj.body if self.cid else obj.header
        self.slots[index] = Entry(obj, access, attributes, target)
        if not self.cid:
            obj.handles += 1
        return index * 4

    def free(self, value: int) -> None:
        """Close a handle: its slot stays inside the table as a free entry."""
        e = self.slots.pop(value // 4)
        if not self.cid:
            e.obj.handles -= 1
        self.freed.append(value)

    @property
    def used(self) -> list[tuple[int, Entry]]:
        return sorted((i * 4, e) for i, e in self.slots.items())

    @property
    def npages(self) -> int:
        top = max(list(self.slots) + [v // 4 for v in self.freed] + [1])
        return max(top // LOW + 1, self.reserve_pages)

    @property
    def level(self) -> int:
        n = self.npages
        return 0 if n == 1 else 1 if n <= MID else 2

    def layout_in(self, kmem: KernelMemory, pool: Pool, struct_va: int | None = None) -> None:
        """Allocate the pages, write entries and the _HANDLE_TABLE structure."""
        L = self.layout
        n = self.npages
        self.pages = [pool.pages(1) for _ in range(n)]
        if self.level == 0:
            self.table_code = self.pages[0]
        elif self.level == 1:
            top = pool.pages(1)
            kmem.write(top, struct.pack(f"<{n}Q", *self.pages))
            self.table_code = top | 1
        else:
            top = pool.pages(1)
            mids = []
            for m in range(0, n, MID):
                mid = pool.pages(1)
                chunk = self.pages[m:m + MID]
                kmem.write(mid, struct.pack(f"<{len(chunk)}Q", *chunk))
                mids.append(mid)
            kmem.write(top, struct.pack(f"<{len(mids)}Q", *mids))
            self.table_code = top | 2
        self.next_handle_needing_pool = n * LOW * 4
        chain = self.free_chain()
        for p, data in self.render(chain).items():
            kmem.write(self.pages[p], data)
        self.va = struct_va or pool.alloc(L.size("_HANDLE_TABLE"), b"Obtb")
        self._write_struct(kmem, chain)

    def free_chain(self) -> list[int]:
        """Free slots in free-list order: closed handles (most recent first), then never used."""
        freed = [v // 4 for v in reversed(self.freed) if v // 4 not in self.slots]
        seen = set(freed)
        return freed + [i for i in range(1, self.npages * LOW)
                        if i % LOW and i not in self.slots and i not in seen]

    def entry_va(self, index: int) -> int:
        return self.pages[index // LOW] + (index % LOW) * 16

    def render(self, chain: list[int]) -> dict[int, bytes]:
        """The low-level pages' bytes (entries and free links), by page index."""
        L = self.layout
        buf = {p: bytearray(4096) for p in range(len(self.pages))}
        for p in buf:
            if L.is_win7:
                L.put(buf[p], 0, "_HANDLE_TABLE_ENTRY", "NextFreeTableEntry", ADDITIONAL_INFO_SIGNATURE)
        for index, e in self.slots.items():
            self.put_entry(buf[index // LOW], (index % LOW) * 16, e)
        for here, nxt in zip(chain, chain[1:] + [None]):
            b, at = buf[here // LOW], (here % LOW) * 16
            if L.is_win7:
                L.put(b, at, "_HANDLE_TABLE_ENTRY", "NextFreeTableEntry", 0 if nxt is None else nxt * 4)
            else:
                L.put(b, at, "_HANDLE_TABLE_ENTRY", "NextFreeHandleEntry",
                      0 if nxt is None else self.entry_va(nxt))
        return {p: bytes(data) for p, data in buf.items()}

    def put_entry(self, b: bytearray, at: int, e: Entry) -> None:
        """Write one used entry in this build's form at b[at:at + 16]."""
        L = self.layout
        if L.is_win7:
            attrs = (INHERIT if e.attributes & INHERIT else 0) | (AUDIT if e.attributes & AUDIT else 0)
            L.put(b, at, "_HANDLE_TABLE_ENTRY", "Object", e.target | 1 | attrs)
            acc = e.access | (WIN7_PROTECT_BIT if e.attributes & PROTECT_CLOSE else 0)
            L.put(b, at, "_HANDLE_TABLE_ENTRY", "GrantedAccess", acc)
            return
        _, _, ref_len = L.bits("_HANDLE_TABLE_ENTRY", "RefCnt")
        _, _, ptr_len = L.bits("_HANDLE_TABLE_ENTRY", "ObjectPointerBits")
        refcnt = self.rng.choice([0x7FFF, 0x7FFF, 0x7FFE, 0x7FFD, 0x7FF8]) & ((1 << ref_len) - 1)
        L.put(b, at, "_HANDLE_TABLE_ENTRY", "Unlocked", 1)
        L.put(b, at, "_HANDLE_TABLE_ENTRY", "RefCnt", 0 if self.cid else refcnt)
        L.put(b, at, "_HANDLE_TABLE_ENTRY", "Attributes", e.attributes)
        L.put(b, at, "_HANDLE_TABLE_ENTRY", "ObjectPointerBits", (e.target >> 4) & ((1 << ptr_len) - 1))
        L.put(b, at, "_HANDLE_TABLE_ENTRY", "GrantedAccessBits", e.access)

    def _write_struct(self, kmem: KernelMemory, chain: list[int]) -> None:
        L = self.layout
        S = "_HANDLE_TABLE"
        b = bytearray(L.size(S))
        L.put(b, 0, S, "TableCode", self.table_code)
        L.put(b, 0, S, "NextHandleNeedingPool", self.next_handle_needing_pool)
        L.put(b, 0, S, "QuotaProcess", self.quota_process)
        L.put(b, 0, S, "UniqueProcessId", self.pid)
        count = len(self.slots)
        if L.has(S, "HandleCount"):
            L.put(b, 0, S, "HandleCount", count)
            L.put(b, 0, S, "HandleCountHighWatermark", count + len(self.freed))
            L.put(b, 0, S, "FirstFreeHandle", chain[0] * 4 if chain else 0)
            L.put(b, 0, S, "LastFreeHandleEntry", self.entry_va(chain[-1]) if chain else 0)
        else:
            fl = L.off(S, "FreeLists")
            F = "_HANDLE_TABLE_FREE_LIST"
            L.put(b, fl, F, "FirstFreeHandleEntry", self.entry_va(chain[0]) if chain else 0)
            L.put(b, fl, F, "LastFreeHandleEntry", self.entry_va(chain[-1]) if chain else 0)
            L.put(b, fl, F, "HandleCount", count)
            L.put(b, fl, F, "HighWaterMark", (count + len(self.freed)) * 4)
        kmem.write(self.va, bytes(b))

    def link(self, kmem: KernelMemory, prev: "HandleTable | int", nxt: "HandleTable | int") -> None:
        """HandleTableList between neighbours (tables or a list head address)."""
        off = self.layout.off("_HANDLE_TABLE", "HandleTableList")
        addr = lambda t: t if isinstance(t, int) else t.va + off
        kmem.list_entry(self.va + off, addr(nxt), addr(prev))
