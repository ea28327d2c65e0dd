"""The prepared guest RAM: one blob from `base` up, handed out page by page."""
from __future__ import annotations

PAGE = 0x1000


class PhysicalMemory:
    """A bump allocator over guest-physical pages; what it hands out is the blob QEMU loads."""

    def __init__(self, base: int, limit: int):
        self.base = base
        self.limit = limit
        self.data = bytearray()
        self.next = base
        self.reserved: set[int] = set()

    def reserve(self, pa: int) -> int:
        """Claim one page at a fixed address above the bump pointer (e.g. the System DTB)."""
        assert pa % PAGE == 0 and pa >= self.next and pa not in self.reserved
        self.reserved.add(pa)
        self._grow(pa + PAGE)
        return pa

    def alloc(self, npages: int = 1, align: int = PAGE) -> int:
        """Zeroed contiguous pages, skipping reserved ones."""
        pa = -(-self.next // align) * align
        while any(pa + i * PAGE in self.reserved for i in range(npages)):
            pa += align
        end = pa + npages * PAGE
        if end > self.limit:
            raise MemoryError(f"guest RAM exhausted at {end:#x}")
        self.next = end
        while self.next in self.reserved:
            self.next += PAGE
        self._grow(end)
        return pa

    def _grow(self, end: int) -> None:
        if end - self.base > len(self.data):
            self.data.extend(bytes(end - self.base - len(self.data)))

    def write(self, pa: int, data: bytes) -> None:
        off = pa - self.base
        assert 0 <= off and off + len(data) <= len(self.data), hex(pa)
        self.data[off:off + len(data)] = data

    def read(self, pa: int, n: int) -> bytes:
        off = pa - self.base
        assert 0 <= off and off + n <= len(self.data), hex(pa)
        return bytes(self.data[off:off + n])

    @property
    def end(self) -> int:
        return self.base + len(self.data)
