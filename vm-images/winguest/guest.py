"""Builds one test guest: prepared memory, loader, truth; written to a directory."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import cpu as cpumod
from .churn import lay_out as churn_lay_out
from .corrupt import Corruptor, edit_truth
from .leak import lay_out as leak_lay_out, moving as leak_moving
from .handles import HandleTable
from .kernel_image import build_kernel_image
from .isf import build_isf
from .kobjects import Catalog
from .objects import ObjectManager
from .paging import MM_READWRITE, A, D, NX, P, RW, AddressSpace
from .physmem import PAGE, PhysicalMemory
from .processes import Process, ProcessBuilder, Thread
from .profiles import Layout, find_profile
from .scenarios import SCENARIOS, Population
from .truth import make_truth
from .shared_data import KERNEL_VA as KUSER_KERNEL, kuser_shared_data
from .kvashadow import iret_exit, iret_frame, kvascode_pages, shadow_kernel, user_space
from .vmem import KernelMemory, Pool, choose_regions

HERE = Path(__file__).resolve().parent
BLOB_BASE = 0x120000            # above the multiboot loader (1 MiB) and its info pages
LOW_STUB = 0x1000               # processor start block
DTB_WINDOW = (0x150000, 0x2A0000)   # where volatility3 looks for the kernel's PML4
SEABIOS_TOP = 64 << 20          # SeaBIOS keeps its tables in the top of RAM
SCENARIO_NAMES = tuple(SCENARIOS)


@dataclass
class World:
    """Everything the scenario code touches while the guest is being assembled."""
    L: Layout
    rng: random.Random
    kmem: KernelMemory
    om: ObjectManager
    cat: Catalog
    pb: ProcessBuilder
    pools: dict[str, Pool]
    kvashadow: bool
    tables: list[HandleTable] = field(default_factory=list)
    churn: tuple | None = None          # (process, its table's state B) in the churn scenario
    leak: list | None = None            # the leak routine's operations in the leak scenario

    def process(self, name: str, pid: int, ppid: int, exiting: bool = False) -> Process:
        p = self.pb.create(name, pid, ppid, system=pid == 4, exiting=exiting)
        p.token = self.cat.token("*SYSTEM*" if pid == 4 else "User32 ")
        if not exiting:
            p.table = HandleTable(self.L, self.rng, pid, 0 if pid == 4 else p.eprocess)
            self.tables.append(p.table)
        return p

    def thread(self, p: Process) -> Thread:
        return self.pb.add_thread(p, self.pb.new_id(p.pid + 4 * self.rng.randrange(1, 60)))

    def handle(self, p: Process, obj, access: int, attributes: int, index: int | None = None) -> int:
        return p.table.add(obj, access, attributes, index)


def build(spec: str, scenario: str, seed: int = 0, guid: str | None = None, corrupt: tuple = (),
          code_variants: str | None = None) -> dict:
    """Assemble a guest in memory (damaged by each kind in `corrupt`); returns the files' contents.
    code_variants="random": the exported functions tools disassemble in equivalent encodings drawn
    per guest."""
    return GuestBuilder(spec, scenario, seed, guid, tuple(corrupt), code_variants).run()


class GuestBuilder:
    """The stages of one build, in the order their data depend on each other."""

    def __init__(self, spec: str, scenario: str, seed: int, guid: str | None, corrupt: tuple = (),
                 code_variants: str | None = None):
        self.corrupt = corrupt
        self.file_key, self.profile = find_profile(spec)
        self.L = Layout(self.profile)
        self.scenario, self.seed = scenario, seed
        self.code_variants = code_variants == "random" or self.file_key == "future"   # always varied
        tail = "|variants" if self.code_variants else ""
        self.rng = random.Random(f"{self.profile['version']}|{scenario}|{seed}|{guid}{tail}")
        real_guid = self.profile["pdb"]["guid"]
        if guid == "random" or real_guid is None:
            self.guid, self.age, self.guid_mode = "%032X" % self.rng.getrandbits(128), self.rng.randrange(1, 4), "random"
        else:
            self.guid, self.age, self.guid_mode = real_guid, self.profile["pdb"]["age"], "real"
        self.ncpu = 2 if scenario == "kpti" else 1
        self.ram = {"big": 512, "level2": 512, "huge": 2048}.get(scenario, 256) << 20
        self.kvashadow = self.L.has_kpti
        self.regions = choose_regions(self.L.build, self.rng)
        self.image_names = IMAGE_NAMES
        self.runtime_pages: list[int] = []
        self.extra_truth: dict = {}

    def run(self) -> dict:
        self.memory()
        self.object_namespace()
        self.procs = SCENARIOS[self.scenario](Population(self.world, self.rng))
        self.system = self.procs[0]
        self.handle_tables()
        if self.world.churn:
            self.extra_truth["churn"] = churn_lay_out(self, *self.world.churn)
        if self.world.leak:
            self.extra_truth["leak"] = leak_lay_out(self, self.world.leak)
        self.processors()
        for p in self.procs:
            self.pb.write(p, self.kvashadow)
        self.pb.link_list(self.image.va("PsActiveProcessHead"))
        self.globals()
        self.address_spaces()
        self.paged_out()
        corruptor = Corruptor(self, self.seed)
        self.damages = [corruptor.apply(kind) for kind in self.corrupt]
        return self.outputs()

    def memory(self) -> None:
        """Physical blob, System PML4 in volatility's window, kernel image, pools, shared page."""
        rng, glob = self.rng, not self.kvashadow
        self.phys = PhysicalMemory(BLOB_BASE, self.ram - SEABIOS_TOP)
        self.dtb = self.phys.reserve(rng.randrange(DTB_WINDOW[0], DTB_WINDOW[1]) & ~0xFFF)
        self.space = AddressSpace(self.phys, self.dtb)
        self.kmem = KernelMemory(self.phys, self.space, glob=glob)
        self.image = build_kernel_image(self.profile, guid=self.guid, age=self.age,
                                        base=self.regions.kernel_base, rng=rng,
                                        code_variants=self.code_variants)
        map_image(self.image, self.phys, self.space, self.kvashadow)
        self.pools = {"nonpaged": Pool(self.kmem, self.regions.nonpaged, 0, rng),
                      "paged": Pool(self.kmem, self.regions.paged, 1, rng)}
        self.kuser_pa = self.phys.alloc()
        self.space.map(KUSER_KERNEL, self.kuser_pa, write=True, glob=glob)

    def object_namespace(self) -> None:
        L, rng = self.L, self.rng
        self.om = ObjectManager(L, self.kmem, self.pools, rng)
        self.cat = Catalog(L, self.kmem, self.om, rng)
        self.pb = ProcessBuilder(L, self.kmem, self.om, rng)
        self.pb.kuser_pa = self.kuser_pa
        self.world = World(L, rng, self.kmem, self.om, self.cat, self.pb, self.pools, self.kvashadow)
        self.root = self.cat.directory("\\")
        self.om.make_types(self.cat.directory("\\ObjectTypes").body)
        for d in ("\\BaseNamedObjects", "\\Sessions\\1\\BaseNamedObjects", "\\KnownDlls", "\\RPC Control",
                  "\\Device", "\\Driver", "\\GLOBAL??", "\\Callback", "\\KernelObjects"):
            self.cat.directory(d)

    def handle_tables(self) -> None:
        """PspCidTable (process/thread bodies by id), every process table, HandleTableList."""
        L, kmem, pools = self.L, self.kmem, self.pools
        self.cid = HandleTable(L, self.rng, 0, cid=True)
        for p in self.procs:
            self.cid.add(p.obj, 0, index=p.pid // 4)
            for t in p.threads:
                self.cid.add(t.obj, 0, index=t.tid // 4)
        self.cid.layout_in(kmem, pools["paged"])
        tables = self.world.tables
        for t in tables:
            t.layout_in(kmem, pools["paged"])
        head = pools["nonpaged"].alloc(16, b"ObHT")      # HandleTableListHead
        ring = [head] + tables
        for i, t in enumerate(tables):
            t.link(kmem, ring[i], ring[(i + 2) % len(ring)])
        off = L.off("_HANDLE_TABLE", "HandleTableList")
        kmem.list_entry(head, tables[0].va + off, tables[-1].va + off)
        self.om.finish()

    def processors(self) -> None:
        """Per-CPU areas after the image (the low stub's kernel alias first); current threads."""
        image, kmem = self.image, self.kmem
        area = image.base + ((len(image.data) + 0x3FFFFF) & ~0x1FFFFF)
        self.stub_alias = area
        self.space.map(area, LOW_STUB, write=False, execute=True, glob=not self.kvashadow)
        self.cpus = [cpumod.build_processor(self.L, kmem, i, area + 0x10000 + i * 0x20000,
                                            self.regions.stacks + i * 0x20000) for i in range(self.ncpu)]
        handlers = idt_handlers(image, self.kvashadow)
        self.current = [self.system.threads[1]]
        if self.ncpu > 1:
            self.user_proc = next(p for p in self.procs if p.name == "explorer.exe")
            self.current.append(self.user_proc.threads[0])
            self.user_entry = self.pb.user_code(self.user_proc)
        for c, t in zip(self.cpus, self.current):
            cpumod.write_processor(self.L, kmem, c, handlers, t.ethread, self.system.threads[0].ethread,
                                   self.kvashadow)

    def globals(self) -> None:
        """The kernel's global variables the tools look for."""
        image, kmem, om = self.image, self.kmem, self.om

        def put(name: str, data: bytes) -> None:
            image.put(name, data)
            kmem.write(image.va(name), data)
        put("PsInitialSystemProcess", struct.pack("<Q", self.system.eprocess))
        put("PspCidTable", struct.pack("<Q", self.cid.va))
        put("ObpKernelHandleTable", struct.pack("<Q", self.system.table.va))
        put("ObTypeIndexTable", om.type_index_table())
        put("ObpInfoMaskToOffset", om.info_mask_to_offset())
        put("NtBuildNumber", struct.pack("<I", 0xF0000000 | self.L.build))
        if om.cookie is not None:
            put("ObHeaderCookie", bytes([om.cookie]))
        if "KiKvaShadow" in image.symbols:
            put("KiKvaShadow", bytes([1 if self.kvashadow else 0]))
        for name, value in (("ObpRootDirectoryObject", self.root.body),
                            ("ObpTypeObjectType", om.type_objects["Type"])):
            if name in image.symbols:
                put(name, struct.pack("<Q", value))
        systime = 0x01D9_0000_0000_0000 + self.rng.randrange(1 << 40)
        self.phys.write(self.kuser_pa, kuser_shared_data(self.L.build, self.ram // PAGE, systime, self.ncpu))

    def address_spaces(self) -> None:
        """Kernel half shared by every PML4, a self-reference in each; KVA-shadow user CR3s."""
        kernel_half = [self.space.pml4e(i) for i in range(256, 512)]
        entry = lambda pml4: pml4 | P | RW | A | D | NX
        for p in self.procs:
            if p.pid != 4:
                for i, e in enumerate(kernel_half):
                    p.space.set_pml4e(256 + i, e)
            p.space.set_pml4e(self.regions.self_ref, entry(p.space.pml4))
        if not self.kvashadow:
            return
        data = [va for c in self.cpus for va in c.shadow_pages]
        shadow = shadow_kernel(self.kmem, kvascode_pages(self.image), data)
        for p in self.procs[1:]:
            p.user_space = user_space(self.phys, p.space, shadow)
            at = p.eprocess + self.L.off("_EPROCESS", "Pcb.UserDirectoryTableBase")
            self.kmem.u64(at, p.user_dtb)

    def paged_out(self) -> None:
        """Paged-pool pages on the standby list (transition PTEs: data still there, tools must
        follow them) and a few paged out to the page file (nothing references those)."""
        rng, kmem = self.rng, self.kmem
        moving = {self.world.churn[0].pid} if self.world.churn else set()
        moving |= leak_moving(self.world.leak) if self.world.leak else set()
        users = [p for p in self.procs[1:] if p.table is not None and p.pid not in moving]
        picks = {users[len(users) // 2].table.pages[0]}
        named = [e.obj for p in users for _, e in p.table.used if e.obj.type == "Key"]
        if named:
            kcb_page = kmem.read(rng.choice(named).body + self.L.off("_CM_KEY_BODY", "KeyControlBlock"), 8)
            picks.add(int.from_bytes(kcb_page, "little") & ~0xFFF)
        for va in sorted(picks):
            kmem.make_transition(va)
        pool = self.pools["paged"]
        for i in range(3):
            va = pool.next_page + (i + 1) * PAGE
            self.space.set_pte(va, (rng.randrange(1, 1 << 20) << 32) | (1 << 12) | (MM_READWRITE << 5))

    def vcpu_records(self) -> list[dict]:
        out = []
        entry = self.image.va(IMAGE_NAMES[self.scenario if self.scenario in ("churn", "leak") else "idle"])
        for c, t in zip(self.cpus, self.current):
            owner = next(p for p in self.procs if t in p.threads)
            v = {"index": c.index, "cpl": 0, "cr3": owner.dtb, "gs_base": c.kpcr, "k_gs_base": 0,
                 "kpcr": c.kpcr, "thread": t.ethread, "tid": t.tid, "pid": owner.pid, "rip": entry,
                 "rsp": c.stack_top}
            if c.index == 1:
                rip, rsp = self.user_entry
                v.update(cpl=3, cr3=owner.user_dtb or owner.dtb, gs_base=t.teb, k_gs_base=c.kpcr,
                         rip=rip, rsp=rsp)
            out.append(v)
        return out

    def outputs(self) -> dict:
        image = self.image
        vcpus = self.vcpu_records()
        boot = []
        for c, v in zip(self.cpus, vcpus):
            b = {"gdt": c.gdt, "idt": c.idt, "gs": v["gs_base"], "kgs": v["k_gs_base"], "cr3": v["cr3"],
                 "rsp": v["rsp"], "rip": v["rip"], "mode": 0, "exit": 0}
            if v["cpl"] == 3:
                frame = c.transition_stack - 0x28
                self.kmem.write(frame, iret_frame(v["rip"], v["rsp"]))
                b.update(rsp=frame, mode=1, exit=iret_exit(image, self.kmem))
            boot.append(b)
        loader, lowstub = assemble_loader(boot, self.dtb, self.stub_alias, image, self.kvashadow)
        truth = make_truth(self.file_key, self.profile, self.scenario, self.seed, self.guid_mode, self.guid,
                           self.age, image, self.dtb, self.procs, self.world, self.om, vcpus, self.system,
                           self.cid, self.L, {"transition_pages": self.kmem.transition, **self.extra_truth,
                                              "code_forms": image.code_forms})
        if self.damages:
            edit_truth(truth, self.damages)
        ranges = [[image.base, image.base + len(image.data)]]
        guest_json = {"format": 1, "ram_mib": self.ram >> 20, "smp": self.ncpu, "blob_base": BLOB_BASE,
                      "files": {"kernel": "loader.bin", "blob": "memory.bin", "disk": "disk.qcow2"},
                      "low_stub": LOW_STUB, "runtime_pages": sorted(set(self.runtime_pages)),
                      "vcpus": [{"cpl": v["cpl"], "rip_range": ranges[0] if v["cpl"] == 0
                                 else [v["rip"] & ~0xFFF, (v["rip"] & ~0xFFF) + PAGE]} for v in vcpus]}
        return {"loader.bin": loader, "memory.bin": bytes(self.phys.data), "lowstub": lowstub,
                "ram": self.ram, "truth": truth, "guest": guest_json,
                "symbols": build_isf(self.profile, image, self.guid, self.age)}


# Names of the kernel image's symbols the guest runs or fills (besides the real globals).
IMAGE_NAMES = {"idle": "KiIdleLoop", "churn": "KiGuestChurn", "churn_params": "KiGuestChurnParameters",
               "leak": "KiGuestLeak", "leak_params": "KiGuestLeakParameters", "leak_step": "KiGuestLeakStep",
               "idt": "KiIdtHandler{:02X}"}


def idt_handlers(image, kvashadow: bool) -> list[int]:
    """With KVA shadowing the IDT points into KVASCODE (mapped in every user CR3), as on Windows."""
    name = IMAGE_NAMES["idt"] + ("Shadow" if kvashadow else "")
    return [image.va(name.format(i)) for i in range(256)]


def map_image(image, phys: PhysicalMemory, space: AddressSpace, kvashadow: bool) -> int:
    """Map ntoskrnl: 2 MiB pages where a whole chunk has one protection, else 4 KiB PTEs."""
    size = len(image.data)
    npages = -(-size // PAGE)
    base_pa = phys.alloc(npages, align=0x200000)
    prot = []
    for i in range(npages):
        rva = i * PAGE
        sec = next((s for s in image.sections if s.rva <= rva < s.rva + max(s.vsize, 1)), None)
        ch = sec.characteristics if sec else 0x40000040
        prot.append((bool(ch & 0x80000000), bool(ch & 0x20000000)))
    glob = not kvashadow
    for chunk in range(0, npages, 512):
        pages = prot[chunk:chunk + 512]
        if len(pages) == 512 and len(set(pages)) == 1:
            w, x = pages[0]
            space.map_large(image.base + chunk * PAGE, base_pa + chunk * PAGE, write=w, execute=x, glob=glob)
            continue
        for j, (w, x) in enumerate(pages):
            space.map(image.base + (chunk + j) * PAGE, base_pa + (chunk + j) * PAGE, write=w, execute=x,
                      glob=glob)
    phys.write(base_pa, bytes(image.data))
    return base_pa


def assemble_loader(cpus: list[dict], dtb: int, stub_alias: int, image, kvashadow: bool) -> tuple[bytes, bytes]:
    """nasm loader.asm with this guest's values; returns loader.bin and its low-stub page."""
    syscall = "KiSystemCall64Shadow" if kvashadow and "KiSystemCall64Shadow" in image.symbols else "KiSystemCall64"
    lstar = image.va(syscall) if syscall in image.symbols else 0
    lines = [f"%define KERNEL_CR3 {dtb:#x}", f"%define SMP {len(cpus)}",
             f"%define LSTAR {lstar:#x}", f"%define VAL_CR0 {cpumod.CR0:#x}",
             f"%define VAL_CR4 {cpumod.CR4:#x}", f"%define VAL_EFER {cpumod.EFER & ~0x400:#x}"]
    for i, c in enumerate(cpus):
        vals = dict(c, gdt_limit=cpumod.GDT_LIMIT, idt_limit=cpumod.IDT_LIMIT)
        lines += [f"%define CPU{i}_{k.upper()} {val:#x}" for k, val in vals.items()]
    lines.append(f"%define STUB_ALIAS {stub_alias:#x}")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        shutil.copy(HERE / "loader.asm", t / "loader.asm")
        (t / "params.inc").write_text("\n".join(lines) + "\n")
        subprocess.run(["nasm", "-f", "bin", "-o", "loader.bin", "loader.asm"], cwd=t, check=True)
        data = (t / "loader.bin").read_bytes()
    return data, data[0x1000:0x2000]


def _write_sparse(f, offset: int, data: bytes) -> None:
    """`data` at `offset` of a file already truncated to size, zero pages left as holes (a third
    of a guest's blob is zero: the cache stays that much smaller on disk)."""
    view, zero = memoryview(data), bytes(PAGE)
    for at in range(0, len(data), PAGE):
        page = view[at:at + PAGE]
        if page != zero[:len(page)]:
            f.seek(offset + at)
            f.write(page)


def write(out: Path, g: dict) -> None:
    """The guest's files; memory.bin and memory.raw (the whole RAM as the booted guest holds it)
    are sparse."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader.bin").write_bytes(g["loader.bin"])
    with open(out / "memory.bin", "wb") as f:
        f.truncate(len(g["memory.bin"]))
        _write_sparse(f, 0, g["memory.bin"])
    with open(out / "memory.raw", "wb") as f:
        f.truncate(g["ram"])
        f.seek(LOW_STUB)
        f.write(g["lowstub"])
        _write_sparse(f, BLOB_BASE, g["memory.bin"])
    dump = lambda obj: json.dumps(obj, indent=1, sort_keys=False) + "\n"
    (out / "truth.json").write_text(dump(g["truth"]))
    (out / "guest.json").write_text(dump(g["guest"]))
    (out / "symbols.json").write_text(json.dumps(g["symbols"], sort_keys=True) + "\n")
    disk = out / "disk.qcow2"
    disk.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
