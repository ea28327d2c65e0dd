"""The object manager's memory: _OBJECT_HEADERs with optional headers, types, the index table."""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from .object_types import TAGS, VALID_ACCESS, type_names
from .profiles import Layout
from .vmem import KernelMemory, Pool

HEADER_BODY = 0x30          # _OBJECT_HEADER.Body, constant in every x64 build
BAD_TYPE = 0xBAD0B0B0       # ObTypeIndexTable[1] as Windows has it

# InfoMask bits, nearest the header first; sizes come from the profile's structs.
CREATOR, NAME, HANDLE, QUOTA, PROCESS, AUDIT, PADDING = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40
OPTIONAL = [(CREATOR, "_OBJECT_HEADER_CREATOR_INFO"), (NAME, "_OBJECT_HEADER_NAME_INFO"),
            (HANDLE, "_OBJECT_HEADER_HANDLE_INFO"), (QUOTA, "_OBJECT_HEADER_QUOTA_INFO"),
            (PROCESS, "_OBJECT_HEADER_PROCESS_INFO"), (AUDIT, None), (PADDING, "_OBJECT_HEADER_PADDING_INFO")]


@dataclass
class KObject:
    """One object the builder made: its body, header and what truth needs."""
    body: int
    header: int
    type: str
    name: str | None            # the name Windows reports for a handle to it (contract names)
    info_mask: int
    handles: int = 0
    pointers: int = 1
    extra: dict = field(default_factory=dict)


class ObjectManager:
    def __init__(self, layout: Layout, kmem: KernelMemory, pools: dict[str, Pool], rng: random.Random):
        self.L = layout
        self.kmem = kmem
        self.pools = pools
        self.rng = rng
        self.types = type_names(layout.build)
        self.index = {name: i + 2 for i, name in enumerate(self.types)}
        self.cookie = rng.randrange(1, 256) if layout.has_cookie else None
        self.sizes = {bit: self._opt_size(bit, s) for bit, s in OPTIONAL}
        self.objects: dict[int, KObject] = {}
        self.type_objects: dict[str, int] = {}

    def _opt_size(self, bit: int, struct_name: str | None) -> int:
        if bit == AUDIT:
            for s in ("_OBJECT_HEADER_EXTENDED_INFO", "_OBJECT_HEADER_AUDIT_INFO"):
                if self.L.size(s):
                    return self.L.size(s)
            return 0
        return self.L.size(struct_name) or 0

    def info_mask_to_offset(self) -> bytes:
        """ObpInfoMaskToOffset as ObInitSystem fills it: sum of the sizes of the bits present."""
        n = 256 if self.sizes[PADDING] else 64
        return bytes(sum(size for bit, size in self.sizes.items() if i & bit) for i in range(n))

    def stored_type_index(self, type_name: str, header: int) -> int:
        idx = self.index[type_name]
        if self.cookie is None:
            return idx
        return idx ^ self.cookie ^ ((header >> 8) & 0xFF)

    def create(self, type_name: str, body_size: int, *, name: str | None = None,
               directory: int = 0, info: int = 0, pool: str = "nonpaged",
               report_name: str | None = None, creator_pid: int = 0, quota_process: int = 0,
               flags: int = 0) -> KObject:
        """Allocate header + body; `name` goes to a name-info header (InfoMask 0x2)."""
        if name is not None:
            info |= NAME
        info = sum(bit for bit in (CREATOR, NAME, HANDLE, QUOTA, PROCESS) if info & bit and self.sizes[bit])
        opt = sum(self.sizes[b] for b in self.sizes if info & b)
        total = opt + HEADER_BODY + body_size

        def accept(data: int) -> bool:   # volatility drops stored TypeIndex 0; Windows never has it
            return self.stored_type_index(type_name, data + opt) & 0xFF != 0

        if total <= 0xFF0:
            start = self.pools[pool].alloc(total, TAGS.get(type_name, "ObjX").encode(), accept)
        else:
            start = self.pools[pool].pages(-(-total // 0x1000))
            assert accept(start), "page-aligned object header with TypeIndex 0"
        header = start + opt
        body = header + HEADER_BODY
        self.kmem.write(header + 0x18, bytes([self.stored_type_index(type_name, header) & 0xFF, 0, info, flags]))
        off = 0
        for bit, sname in OPTIONAL:
            if not info & bit:
                continue
            off += self.sizes[bit]
            at = header - off
            if bit == NAME:
                buf = self.string(name, pool="paged", tag=b"ObNm")
                self.kmem.u64(at, directory)
                self.kmem.unicode_string(at + 8, buf, name)
                self.kmem.u32(at + 0x18, 1)
            elif bit == CREATOR:   # TypeList links to itself; CreatorUniqueProcess
                self.kmem.list_entry(at, at, at)
                self.kmem.u64(at + 0x10, creator_pid)
            elif bit == QUOTA:
                self.kmem.write(at, struct.pack("<II", 0x1000 if pool == "paged" else 0, 0x200))
                self.kmem.u64(at + 0x18, quota_process)
            elif bit == PROCESS:
                self.kmem.u64(at, quota_process)
        obj = KObject(body, header, type_name, name if report_name is None else report_name, info)
        self.objects[body] = obj
        return obj

    def string(self, text: str, *, pool: str = "paged", tag: bytes = b"Strg") -> int:
        """A NUL-terminated UTF-16 buffer in pool, for UNICODE_STRINGs."""
        data = text.encode("utf-16-le") + b"\0\0"
        va = self.pools[pool].alloc(len(data), tag)
        self.kmem.write(va, data)
        return va

    def make_types(self, types_directory: int) -> None:
        """The _OBJECT_TYPE objects (type 'Type'), each named, in index order."""
        L = self.L
        size = L.size("_OBJECT_TYPE")
        for name in self.types:
            obj = self.create("Type", size, name=name, directory=types_directory, info=CREATOR,
                              flags=0x10 | 0x2)
            t = obj.body
            self.kmem.list_entry(t + L.off("_OBJECT_TYPE", "TypeList"), t, t)
            self.kmem.unicode_string(t + L.off("_OBJECT_TYPE", "Name"), self.string(name), name)
            self.kmem.write(t + L.off("_OBJECT_TYPE", "Index"), bytes([self.index[name]]))
            self.kmem.write(t + L.off("_OBJECT_TYPE", "Key"), TAGS.get(name, name[:4]).encode().ljust(4)[:4])
            ti = t + L.off("_OBJECT_TYPE", "TypeInfo")
            self.kmem.write(ti, struct.pack("<H", L.field("_OBJECT_TYPE", "TypeInfo")["size"]))
            self.kmem.u32(ti + 0x1C, VALID_ACCESS.get(name, 0x1F0001))
            self.type_objects[name] = t

    def type_index_table(self) -> bytes:
        """ObTypeIndexTable contents: NULL, 0xbad0b0b0, then the type objects, NULL-terminated."""
        ptrs = [0, BAD_TYPE] + [self.type_objects[n] for n in self.types] + [0]
        return struct.pack(f"<{len(ptrs)}Q", *ptrs)

    def finish(self) -> None:
        """Counts that depend on every handle: header counts, per-type totals."""
        per_type: dict[str, list[int]] = {}
        for obj in self.objects.values():
            self.kmem.write(obj.header, struct.pack("<qq", obj.pointers + obj.handles, obj.handles))
            c = per_type.setdefault(obj.type, [0, 0])
            c[0] += 1
            c[1] += obj.handles
        L = self.L
        for name, t in self.type_objects.items():
            n, h = per_type.get(name, (0, 0))
            self.kmem.u32(t + L.off("_OBJECT_TYPE", "TotalNumberOfObjects"), n)
            self.kmem.u32(t + L.off("_OBJECT_TYPE", "TotalNumberOfHandles"), h)
