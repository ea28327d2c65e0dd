"""EPROCESS/ETHREAD objects, their user address spaces, the process list and PspCidTable."""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from .handles import HandleTable
from .objects import QUOTA, KObject, ObjectManager
from .paging import AddressSpace
from .physmem import PAGE
from .profiles import Layout
from .vmem import KernelMemory

DISPATCHER_PROCESS, DISPATCHER_THREAD = 3, 6
KUSER_USER = 0x7FFE0000
FILETIME_2023 = 133_200_000_000_000_000      # 2023-02-01 in 100 ns units since 1601
AUDIT_NAME = "SeAuditProcessCreationInfo.ImageFileName"
VOLUME = "\\Device\\HarddiskVolume3"
IMAGE_FOLDERS = {"explorer.exe": "\\Windows", "chrome.exe": "\\Program Files\\Google\\Chrome\\Application",
                 "Code.exe": "\\Program Files\\Microsoft VS Code"}
SYSTEM32 = "\\Windows\\System32"


@dataclass
class Thread:
    tid: int
    obj: KObject
    teb: int = 0

    @property
    def ethread(self) -> int:
        return self.obj.body


@dataclass
class Process:
    pid: int
    name: str                                # as Task Manager shows it: the image path's last part
    obj: KObject
    space: AddressSpace
    ppid: int = 0
    peb: int = 0
    user_space: AddressSpace | None = None   # KVA-shadow user CR3
    table: HandleTable | None = None
    threads: list[Thread] = field(default_factory=list)
    token: KObject | None = None
    exiting: bool = False
    user_pages: dict[int, int] = field(default_factory=dict)   # VA -> PA of user pages
    image_path: str | None = None            # SeAuditProcessCreationInfo's NT path (None: System)

    @property
    def image_file_name(self) -> str:
        """_EPROCESS.ImageFileName keeps 15 bytes."""
        return self.name[:15]

    @property
    def eprocess(self) -> int:
        return self.obj.body

    @property
    def dtb(self) -> int:
        return self.space.pml4

    @property
    def user_dtb(self) -> int:
        return self.user_space.pml4 if self.user_space else 0

    @property
    def label(self) -> str:
        return f"{self.name}({self.pid})"


class ProcessBuilder:
    """Creates processes and threads; the engine reads them through the profile's offsets."""

    def __init__(self, layout: Layout, kmem: KernelMemory, om: ObjectManager, rng: random.Random):
        self.L = layout
        self.kmem = kmem
        self.om = om
        self.rng = rng
        self.phys = kmem.phys
        self.processes: list[Process] = []
        self.ids: set[int] = set()
        self.kuser_pa = 0
        self.system_space = kmem.space
        self.user_va = 0x7FFFFFD0000 if layout.build < 9200 else rng.randrange(0x10, 0xF0) << 32

    def new_id(self, near: int) -> int:
        """A pid/tid (multiple of 4) unused in the one CID space both share."""
        cid = max(8, near & ~3)
        while cid in self.ids or (cid // 4) % 256 == 0:
            cid += 4 * self.rng.randrange(1, 6)
        self.ids.add(cid)
        return cid

    def _user_page(self, proc: Process, va: int, *, write=True, execute=False) -> int:
        pa = self.phys.alloc()
        proc.space.map(va, pa, write=write, execute=execute, user=True)
        proc.user_pages[va] = pa
        return pa

    def _user_region(self) -> int:
        if self.L.build < 9200:
            self.user_va -= 0x10000
            return self.user_va
        self.user_va += self.rng.randrange(1, 0x40) << 24
        return self.user_va

    def create(self, name: str, pid: int, ppid: int, *, system=False, exiting=False) -> Process:
        """A process of image `name`; a tool reports its full name only where the profile has
        SeAuditProcessCreationInfo, else the 15-byte ImageFileName."""
        L = self.L
        obj = self.om.create("Process", L.size("_EPROCESS"), info=QUOTA if not system else 0,
                             report_name=None)
        space = self.system_space if system else AddressSpace(self.phys)
        audit = L.has("_EPROCESS", AUDIT_NAME) and not system
        path = f"{VOLUME}{IMAGE_FOLDERS.get(name, SYSTEM32)}\\{name}"
        proc = Process(pid, name if audit else name[:15], obj, space, ppid, exiting=exiting,
                       image_path=path if audit else None)
        obj.name = proc.label
        self.ids.add(pid)
        if not system:
            proc.peb = self._user_region()
            pa = self._user_page(proc, proc.peb)
            peb = bytearray(PAGE)
            struct.pack_into("<Q", peb, 0x10, 0x7FF600000000 + (self.rng.randrange(0x100, 0xFFFF) << 16))
            struct.pack_into("<IIH", peb, 0x118, *self.version_triplet())
            self.phys.write(pa, bytes(peb))
        space.map(KUSER_USER, self.kuser_pa, write=False, user=True)
        self.processes.append(proc)
        return proc

    def user_code(self, proc: Process) -> tuple[int, int]:
        """A code page in the process image (spinning `pause; jmp`) and a stack: (rip, rsp)."""
        image = self.rng.randrange(0x7FF60000, 0x7FF7FFFF) << 16
        code = self._user_page(proc, image + 0x1000, write=False, execute=True)
        at = self.rng.randrange(0x10, 0x800) & ~0xF
        self.phys.write(code + at, bytes.fromhex("f390ebfc"))
        stack = proc.peb - 0x100000
        self._user_page(proc, stack)
        return image + 0x1000 + at, stack + PAGE - 0x48

    def version_triplet(self) -> tuple[int, int, int]:
        b = self.L.build
        major, minor = (6, 1) if b < 9200 else (6, 2) if b < 9600 else (6, 3) if b < 10240 else (10, 0)
        return major, minor, b

    def add_thread(self, proc: Process, tid: int) -> Thread:
        L = self.L
        obj = self.om.create("Thread", L.size("_ETHREAD"), info=QUOTA)
        t = Thread(tid, obj)
        obj.name = str(tid)
        if proc.peb:
            t.teb = proc.peb + PAGE * (1 + len(proc.threads))
            pa = self._user_page(proc, t.teb)
            teb = bytearray(PAGE)
            struct.pack_into("<Q", teb, 0x30, t.teb)
            struct.pack_into("<QQ", teb, 0x40, proc.pid, tid)
            struct.pack_into("<Q", teb, 0x60, proc.peb)
            self.phys.write(pa, bytes(teb))
        proc.threads.append(t)
        return t

    def write(self, proc: Process, kvashadow: bool) -> None:
        """Fill EPROCESS and its ETHREADs once tables, tokens and neighbours are known."""
        L = self.L
        E = "_EPROCESS"
        b = self._dispatcher_object(E, "_KPROCESS", DISPATCHER_PROCESS)
        L.put(b, 0, E, "Pcb.DirectoryTableBase", proc.dtb)
        if L.has(E, "Pcb.UserDirectoryTableBase"):
            L.put(b, 0, E, "Pcb.UserDirectoryTableBase", proc.user_dtb if kvashadow else 0)
        kth = L.off("_KPROCESS", "ThreadListHead")
        L.put(b, 0, E, "UniqueProcessId", proc.pid)
        L.put(b, 0, E, "InheritedFromUniqueProcessId", proc.ppid)
        L.put(b, 0, E, "Peb", proc.peb)
        L.put(b, 0, E, "ObjectTable", 0 if proc.exiting or proc.table is None else proc.table.va)
        if proc.token is not None:
            L.put(b, 0, E, "Token", proc.token.body | self.rng.randrange(1, 16))
        created = FILETIME_2023 + self.rng.randrange(0, 10**13) if proc.pid != 4 else 0
        L.put(b, 0, E, "CreateTime", created)
        name = proc.image_file_name.encode()
        at = L.off(E, "ImageFileName")
        b[at:at + len(name)] = name
        if proc.image_path is not None:
            L.put(b, 0, E, AUDIT_NAME, self._object_name_information(proc.image_path))
        body = proc.eprocess
        struct.pack_into("<QQ", b, kth, body + kth, body + kth)
        head = body + L.off(E, "ThreadListHead")
        links = [t.ethread + L.off("_ETHREAD", "ThreadListEntry") for t in proc.threads]
        ring = [head] + links
        struct.pack_into("<QQ", b, L.off(E, "ThreadListHead"), ring[1 % len(ring)], ring[-1])
        keep = self.kmem.read(body + L.off(E, "ActiveProcessLinks"), 16)
        at = L.off(E, "ActiveProcessLinks")
        b[at:at + 16] = keep
        self.kmem.write(body, bytes(b))
        for i, t in enumerate(proc.threads):
            self._write_thread(proc, t, ring[i], ring[(i + 2) % len(ring)])

    def _object_name_information(self, path: str) -> int:
        """An _OBJECT_NAME_INFORMATION with its buffer right behind it, as
        SeInitializeProcessAuditName allocates it (one paged pool block)."""
        size = self.L.size("_OBJECT_NAME_INFORMATION")
        data = path.encode("utf-16-le") + b"\0\0"
        va = self.om.pools["paged"].alloc(size + len(data), b"SeOn")
        self.kmem.unicode_string(va + self.L.off("_OBJECT_NAME_INFORMATION", "Name"), va + size, path)
        self.kmem.write(va + size, data)
        return va

    def _dispatcher_object(self, name: str, kernel_part: str, kind: int) -> bytearray:
        """A zeroed `name` whose dispatcher header holds `kind` (Header.Type) and the size of its
        `kernel_part` in dwords (Header.Size), as KeInitializeProcess/KeInitializeThread write them."""
        b = bytearray(self.L.size(name))
        b[0] = kind
        b[2] = (self.L.size(kernel_part) // 4) & 0xFF
        return b

    def _write_thread(self, proc: Process, t: Thread, prev: int, nxt: int) -> None:
        L = self.L
        T = "_ETHREAD"
        b = self._dispatcher_object(T, "_KTHREAD", DISPATCHER_THREAD)
        L.put(b, 0, T, "Tcb.Process", proc.eprocess)
        L.put(b, 0, T, "Tcb.ApcState.Process", proc.eprocess)
        L.put(b, 0, "_KTHREAD", "Teb", t.teb)
        cid = L.off(T, "Cid")
        struct.pack_into("<QQ", b, cid, proc.pid, t.tid)
        struct.pack_into("<QQ", b, L.off(T, "ThreadListEntry"), nxt, prev)
        self.kmem.write(t.ethread, bytes(b))

    def link_list(self, head_va: int) -> None:
        """PsActiveProcessHead <-> every EPROCESS.ActiveProcessLinks, System first."""
        off = self.L.off("_EPROCESS", "ActiveProcessLinks")
        ring = [head_va] + [p.eprocess + off for p in self.processes]
        for i, at in enumerate(ring):
            self.kmem.list_entry(at, ring[(i + 1) % len(ring)], ring[i - 1])
