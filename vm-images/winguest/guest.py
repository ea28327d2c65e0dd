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
from .handles import HandleTable
try:
    from .isf import build_isf
    from .kernel_image import build_kernel_image
except ImportError:     # until the kernel image engineer's modules land
    from .kernel_stand_in import build_isf, build_kernel_image
from .kobjects import Catalog
from .objects import ObjectManager
from .paging import A, D, NX, P, RW, AddressSpace
from .physmem import PAGE, PhysicalMemory
from .processes import Process, ProcessBuilder, Thread
from .profiles import Layout, find_profile
from .scenarios import SCENARIOS, Population
from .truth import make_truth
from .shared_data import KERNEL_VA as KUSER_KERNEL, kuser_shared_data
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


def kernel_pml4_kernel_half(space: AddressSpace) -> list[int]:
    return [space.pml4e(i) for i in range(256, 512)]


def build(spec: str, scenario: str, seed: int = 0, guid: str | None = None) -> dict:
    """Assemble a guest in memory; returns the files' contents by name."""
    file_key, profile = find_profile(spec)
    L = Layout(profile)
    rng = random.Random(f"{profile['version']}|{scenario}|{seed}|{guid}")
    real_guid = profile["pdb"]["guid"]
    if guid == "random" or real_guid is None:
        guid_str, age, guid_mode = "%032X" % rng.getrandbits(128), rng.randrange(1, 4), "random"
    else:
        guid_str, age, guid_mode = real_guid, profile["pdb"]["age"], "real"
    ncpu = 2 if scenario == "kpti" else 1
    ram = (512 if scenario in ("big", "level2") else 256) << 20
    kvashadow = L.has_kpti
    regions = choose_regions(L.build, rng)

    phys = PhysicalMemory(BLOB_BASE, ram - SEABIOS_TOP)
    dtb = phys.reserve(rng.randrange(DTB_WINDOW[0], DTB_WINDOW[1]) & ~0xFFF)
    system_space = AddressSpace(phys, dtb)
    kmem = KernelMemory(phys, system_space, glob=not kvashadow)

    image = build_kernel_image(profile, guid=guid_str, age=age, base=regions.kernel_base, rng=rng)
    image_pa = map_image(image, phys, system_space, kvashadow)

    pools = {"nonpaged": Pool(kmem, regions.nonpaged, 0, rng), "paged": Pool(kmem, regions.paged, 1, rng)}
    kuser_pa = phys.alloc()
    system_space.map(KUSER_KERNEL, kuser_pa, write=True, glob=not kvashadow)

    om = ObjectManager(L, kmem, pools, rng)
    cat = Catalog(L, kmem, om, rng)
    pb = ProcessBuilder(L, kmem, om, rng)
    pb.kuser_pa = kuser_pa
    world = World(L, rng, kmem, om, cat, pb, pools, kvashadow)
    root = cat.directory("\\")
    om.make_types(cat.directory("\\ObjectTypes").body)
    for d in ("\\BaseNamedObjects", "\\Sessions\\1\\BaseNamedObjects", "\\KnownDlls", "\\RPC Control",
              "\\Device", "\\Driver", "\\GLOBAL??", "\\Callback", "\\KernelObjects"):
        cat.directory(d)

    procs = SCENARIOS[scenario](Population(world, rng))
    system = procs[0]

    # PspCidTable: process and thread bodies by id
    cid = HandleTable(L, rng, 0, cid=True)
    for p in procs:
        cid.add(p.obj, 0, index=p.pid // 4)
        for t in p.threads:
            cid.add(t.obj, 0, index=t.tid // 4)
    cid.layout_in(kmem, pools["paged"])

    for t in world.tables:
        t.layout_in(kmem, pools["paged"])
    head = pools["nonpaged"].alloc(16, b"ObHT")      # HandleTableListHead
    ring = [head] + world.tables
    for i, t in enumerate(world.tables):
        t.link(kmem, ring[i], ring[(i + 2) % len(ring)])
    kmem.list_entry(head, world.tables[0].va + L.off("_HANDLE_TABLE", "HandleTableList"),
                    world.tables[-1].va + L.off("_HANDLE_TABLE", "HandleTableList"))
    om.finish()

    # processors: per-CPU area after the image, the low stub's kernel alias before it
    cpu_area = regions.kernel_base + ((len(image.data) + 0x3FFFFF) & ~0x1FFFFF)
    stub_alias = cpu_area
    system_space.map(stub_alias, LOW_STUB, write=False, execute=True, glob=not kvashadow)
    cpus = [cpumod.build_processor(L, kmem, i, cpu_area + 0x10000 + i * 0x20000,
                                   regions.stacks + i * 0x20000) for i in range(ncpu)]
    handlers = idt_handlers(image, kvashadow)
    current = [system.threads[1]] + ([procs[8].threads[0]] if ncpu > 1 else [])
    for c, t in zip(cpus, current):
        cpumod.write_processor(L, kmem, c, handlers, t.ethread, system.threads[0].ethread)

    for p in procs:
        pb.write(p, kvashadow)
    pb.link_list(image.va("PsActiveProcessHead"))

    def put(name: str, data: bytes) -> None:
        image.put(name, data)
        kmem.write(image.va(name), data)
    put("PsInitialSystemProcess", struct.pack("<Q", system.eprocess))
    put("PspCidTable", struct.pack("<Q", cid.va))
    put("ObpKernelHandleTable", struct.pack("<Q", system.table.va))
    put("ObTypeIndexTable", om.type_index_table())
    put("ObpInfoMaskToOffset", om.info_mask_to_offset())
    put("NtBuildNumber", struct.pack("<I", 0xF0000000 | L.build))
    if om.cookie is not None:
        put("ObHeaderCookie", bytes([om.cookie]))
    if "KiKvaShadow" in image.symbols:
        put("KiKvaShadow", bytes([1 if kvashadow else 0]))
    for name, value in (("ObpRootDirectoryObject", root.body), ("ObpTypeObjectType", om.type_objects["Type"])):
        if name in image.symbols:
            put(name, struct.pack("<Q", value))
    phys.write(kuser_pa, kuser_shared_data(L.build, ram // PAGE, 0x01D9_0000_0000_0000 + rng.randrange(1 << 40), ncpu))

    # address spaces: kernel half shared, self-reference per PML4, KVA shadow user CR3s
    self_ref = regions.self_ref
    kernel_half = kernel_pml4_kernel_half(system_space)
    system_space.set_pml4e(self_ref, dtb | P | RW | A | D | NX)
    for p in procs:
        if p.pid == 4:
            continue
        for i, e in enumerate(kernel_half):
            p.space.set_pml4e(256 + i, e)
        p.space.set_pml4e(self_ref, p.space.pml4 | P | RW | A | D | NX)

    vcpus = []
    entry = image.va(entry_symbol(scenario))
    for c, t in zip(cpus, current):
        owner = next(p for p in procs if t in p.threads)
        vcpus.append({"index": c.index, "cpl": 0, "cr3": owner.dtb if c.index == 0 else owner.dtb,
                      "gs_base": c.kpcr, "k_gs_base": 0, "kpcr": c.kpcr, "thread": t.ethread,
                      "tid": t.tid, "pid": owner.pid, "rip": entry, "rsp": c.stack_top,
                      "gdt": c.gdt, "idt": c.idt, "_cpu": c})

    loader, lowstub = assemble_loader(vcpus, dtb, stub_alias, entry, image, kvashadow, L)
    phys_blob = bytes(phys.data)
    truth = make_truth(file_key, profile, scenario, seed, guid_mode, guid_str, age, image, dtb, procs,
                       world, om, vcpus, system, cid, L)
    for v in vcpus:
        v.pop("_cpu")
    guest_json = {"format": 1, "ram_mib": ram >> 20, "smp": ncpu, "blob_base": BLOB_BASE,
                  "files": {"kernel": "loader.bin", "blob": "memory.bin", "disk": "disk.qcow2"},
                  "low_stub": LOW_STUB, "runtime_pages": [],
                  "vcpus": [{"cpl": v["cpl"], "rip_range": [image.base, image.base + len(image.data)]}
                            for v in vcpus]}
    return {"loader.bin": loader, "memory.bin": phys_blob, "lowstub": lowstub, "ram": ram,
            "truth": truth, "guest": guest_json, "symbols": build_isf(profile, image, guid_str, age)}


def entry_symbol(scenario: str) -> str:
    return "KiIdleLoop"


def idt_handlers(image, kvashadow: bool) -> list[int]:
    return [image.va(f"KiIdtHandler{i:02X}") for i in range(256)]


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


def assemble_loader(vcpus, dtb, stub_alias, entry, image, kvashadow, L) -> tuple[bytes, bytes]:
    """nasm loader.asm with this guest's values; returns loader.bin and its low-stub page."""
    lstar = image.va("KiSystemCall64Shadow" if kvashadow and "KiSystemCall64Shadow" in image.symbols
                     else "KiSystemCall64") if "KiSystemCall64" in image.symbols else 0
    lines = [f"%define KERNEL_CR3 {dtb:#x}", f"%define SMP {len(vcpus)}",
             f"%define LSTAR {lstar:#x}", f"%define VAL_CR0 {cpumod.CR0:#x}",
             f"%define VAL_CR4 {cpumod.CR4:#x}", f"%define VAL_EFER {cpumod.EFER & ~0x400:#x}"]
    for v in vcpus:
        c = v["_cpu"]
        i = v["index"]
        vals = {"GDT": c.gdt, "GDT_LIMIT": cpumod.GDT_LIMIT, "IDT": c.idt, "IDT_LIMIT": cpumod.IDT_LIMIT,
                "GS": v["gs_base"], "KGS": v["k_gs_base"], "CR3": v["cr3"], "RSP": v["rsp"],
                "RIP": v["rip"], "MODE": 0, "EXIT": 0}
        lines += [f"%define CPU{i}_{k} {val:#x}" for k, val in vals.items()]
    lines.append(f"%define STUB_ALIAS {stub_alias:#x}")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        shutil.copy(HERE / "loader.asm", t / "loader.asm")
        (t / "params.inc").write_text("\n".join(lines) + "\n")
        subprocess.run(["nasm", "-f", "bin", "-o", "loader.bin", "loader.asm"], cwd=t, check=True)
        data = (t / "loader.bin").read_bytes()
    return data, data[0x1000:0x2000]


def write(out: Path, g: dict) -> None:
    """The guest's files; memory.raw is the whole RAM as the booted guest holds it (sparse)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader.bin").write_bytes(g["loader.bin"])
    (out / "memory.bin").write_bytes(g["memory.bin"])
    with open(out / "memory.raw", "wb") as f:
        f.truncate(g["ram"])
        f.seek(LOW_STUB)
        f.write(g["lowstub"])
        f.seek(BLOB_BASE)
        f.write(g["memory.bin"])
    dump = lambda obj: json.dumps(obj, indent=1, sort_keys=False) + "\n"
    (out / "truth.json").write_text(dump(g["truth"]))
    (out / "guest.json").write_text(dump(g["guest"]))
    (out / "symbols.json").write_text(json.dumps(g["symbols"], sort_keys=True) + "\n")
    disk = out / "disk.qcow2"
    disk.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
