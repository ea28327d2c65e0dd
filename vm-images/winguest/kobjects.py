"""Bodies of the object types the guests hold, as each type's kernel structure begins."""
from __future__ import annotations

import random
import struct

from .objects import CREATOR, HANDLE, QUOTA, KObject, ObjectManager
from .profiles import Layout
from .vmem import KernelMemory

# Dispatcher object types (DISPATCHER_HEADER.Type) and body sizes of types without a profile entry.
DISPATCH = {"Event": 0, "Mutant": 2, "IoCompletion": 4, "Semaphore": 5, "Timer": 8}
BODY = {"Event": 0x18, "Mutant": 0x38, "Semaphore": 0x20, "Timer": 0x40, "IRTimer": 0x58,
        "Section": 0x38, "Directory": 0x158, "SymbolicLink": 0x38, "Device": 0x150, "Driver": 0x150,
        "Token": 0x498, "ALPC Port": 0x1D8, "IoCompletion": 0x40, "TpWorkerFactory": 0x100,
        "WaitCompletionPacket": 0x50, "Job": 0x4F8, "Desktop": 0xB8, "WindowStation": 0xA8,
        "EtwRegistration": 0x60, "KeyedEvent": 0x8, "Callback": 0x48, "DebugObject": 0x60,
        "PowerRequest": 0x58, "Partition": 0x1C0, "Composition": 0x40}
IO_TYPE_DEVICE, IO_TYPE_DRIVER, IO_TYPE_FILE = 3, 4, 5
KEY_BODY_TYPE = 0x6B793032          # 'ky02'


class Catalog:
    """Creates objects of every kind with their names where Windows keeps them."""

    def __init__(self, L: Layout, kmem: KernelMemory, om: ObjectManager, rng: random.Random):
        self.L, self.kmem, self.om, self.rng = L, kmem, om, rng
        self.dirs: dict[str, KObject] = {}
        self.kcbs: dict[str, int] = {}
        self.devices: dict[str, KObject] = {}
        self.named: dict[tuple[str, str], KObject] = {}

    def _info(self) -> int:
        """Optional headers besides the name, varied as Windows varies them per creator."""
        r = self.rng.random()
        return QUOTA if r < 0.3 else CREATOR if r < 0.4 else QUOTA | HANDLE if r < 0.5 else 0

    def directory(self, path: str) -> KObject:
        """An object directory, named by its last component; the root is named "\\" and has no
        parent directory, as on Windows."""
        if path in self.dirs:
            return self.dirs[path]
        if path == "\\":
            obj = self.om.create("Directory", BODY["Directory"], name="\\", pool="paged", flags=0x12)
        else:
            parent, _, leaf = path.rpartition("\\")
            pdir = self.directory(parent or "\\")
            obj = self.om.create("Directory", BODY["Directory"], name=leaf, directory=pdir.body,
                                 pool="paged", flags=0x12)
        self.dirs[path] = obj
        return obj

    def generic(self, type_name: str, name: str | None = None, where: str | None = None,
                size: int | None = None) -> KObject:
        """An object of any type; named ones live in directory `where` and are shared by name."""
        if name is not None and (type_name, f"{where}\\{name}") in self.named:
            return self.named[(type_name, f"{where}\\{name}")]
        d = self.directory(where).body if name is not None else 0
        pool = "paged" if type_name in ("Section", "Token", "SymbolicLink", "Key") else "nonpaged"
        obj = self.om.create(type_name, size or BODY.get(type_name, 0x40), name=name, directory=d,
                             info=self._info(), pool=pool)
        if type_name in DISPATCH:
            hdr = bytearray(0x18)
            hdr[0] = DISPATCH[type_name] | (self.rng.randrange(2) if type_name == "Event" else 0)
            hdr[2] = (obj_size := BODY[type_name]) // 4
            struct.pack_into("<QQ", hdr, 8, obj.body + 8, obj.body + 8)
            if type_name == "Semaphore":
                struct.pack_into("<i", hdr, 4, self.rng.randrange(0, 4))
            self.kmem.write(obj.body, bytes(hdr[:min(0x18, obj_size)]))
        if name is not None:
            self.named[(type_name, f"{where}\\{name}")] = obj
        return obj

    def symlink(self, name: str, where: str, target: str) -> KObject:
        obj = self.generic("SymbolicLink", name, where)
        self.kmem.unicode_string(obj.body + 8, self.om.string(target), target)
        return obj

    def device(self, name: str) -> KObject:
        """A named device in \\Device (file objects point at the volume's device)."""
        if name not in self.devices:
            obj = self.om.create("Device", BODY["Device"], name=name,
                                 directory=self.directory("\\Device").body, flags=0x2)
            self.kmem.write(obj.body, struct.pack("<hH", IO_TYPE_DEVICE, BODY["Device"]))
            self.devices[name] = obj
        return self.devices[name]

    def file(self, path: str, device: str = "HarddiskVolume3") -> KObject:
        """A _FILE_OBJECT; its name is the device's path and FileName, as ObQueryNameString gives it
        (\\Device\\HarddiskVolume3\\Windows\\...)."""
        L = self.L
        dev = self.device(device)
        obj = self.om.create("File", L.size("_FILE_OBJECT"), info=self._info() & ~HANDLE,
                             report_name=f"\\Device\\{device}{path}")
        b = obj.body
        self.kmem.write(b, struct.pack("<hh", IO_TYPE_FILE, L.size("_FILE_OBJECT")))
        self.kmem.u64(b + L.off("_FILE_OBJECT", "DeviceObject"), dev.body)
        self.kmem.unicode_string(b + L.off("_FILE_OBJECT", "FileName"),
                                 self.om.string(path, tag=b"IoNm"), path)
        return obj

    def kcb(self, path: str) -> int:
        """Key control blocks up to the REGISTRY root, names compressed (ASCII, upper case)."""
        if path in self.kcbs:
            return self.kcbs[path]
        L = self.L
        parent_path, _, leaf = path.rpartition("\\")
        parent = self.kcb(parent_path) if parent_path else 0
        pool = self.om.pools["paged"]
        K, N = "_CM_KEY_CONTROL_BLOCK", "_CM_NAME_CONTROL_BLOCK"
        raw = leaf.encode("ascii")
        nb = pool.alloc(L.off(N, "Name") + len(raw), b"CMNb")
        nbuf = bytearray(L.off(N, "Name") + len(raw))
        L.put(nbuf, 0, N, "Compressed", 1)
        L.put(nbuf, 0, N, "NameLength", len(raw))
        nbuf[L.off(N, "Name"):] = raw
        self.kmem.write(nb, bytes(nbuf))
        kcb = pool.alloc(L.size(K), b"CMkb")
        kbuf = bytearray(L.size(K))
        struct.pack_into("<I", kbuf, 0, 1 + self.rng.randrange(8))
        L.put(kbuf, 0, K, "ParentKcb", parent)
        L.put(kbuf, 0, K, "NameBlock", nb)
        L.put(kbuf, 0, K, "KeyCell", self.rng.randrange(0x20, 0x7FFFFF) * 8 | 0x20)
        self.kmem.write(kcb, bytes(kbuf))
        self.kcbs[path] = kcb
        return kcb

    def key(self, path: str, pid: int) -> KObject:
        """A key body (one per open handle, as Windows makes them) for \\REGISTRY\\... paths."""
        L = self.L
        path = path.upper()
        assert path.startswith("\\REGISTRY\\")
        kcb = self.kcb(path[1:])
        obj = self.om.create("Key", L.size("_CM_KEY_BODY"), pool="paged", info=QUOTA,
                             report_name=path)
        self.kmem.u32(obj.body + L.off("_CM_KEY_BODY", "Type"), KEY_BODY_TYPE)
        self.kmem.u64(obj.body + L.off("_CM_KEY_BODY", "KeyControlBlock"), kcb)
        return obj

    def token(self, source: str = "User32 ") -> KObject:
        """A _TOKEN; its TokenSource name opens the body as in every build."""
        obj = self.om.create("Token", BODY["Token"], pool="paged", info=QUOTA)
        self.kmem.write(obj.body, source.encode().ljust(8)[:8]
                        + struct.pack("<Q", self.rng.randrange(0x1000, 0x100000)))
        return obj
