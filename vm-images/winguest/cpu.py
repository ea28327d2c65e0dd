"""Per-processor state Windows keeps in memory: GDT, TSS, IDT, KPCR/KPRCB, stacks."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .physmem import PAGE
from .profiles import Layout
from .vmem import KernelMemory

# Selectors of the x64 Windows GDT (KGDT64_*).
R0_CODE, R0_DATA, R3_CMCODE, R3_DATA, R3_CODE, SYS_TSS, R3_CMTEB = 0x10, 0x18, 0x20, 0x28, 0x30, 0x40, 0x50
GDT_LIMIT = 0x6F
IDT_LIMIT = 0xFFF
# _KPCR members before Self that every x64 build has at these offsets (NT_TIB union).
KPCR_GDT_BASE, KPCR_TSS_BASE, KPCR_IDT_BASE = 0x0, 0x8, 0x38
KPCR_SIZE_FALLBACK = 0xB080        # 22621/22631 headers truncate _KPCR; 22000's size
# Control registers as a Windows x64 kernel has them (within what QEMU's qemu64 CPU offers).
CR0 = 0x80050033                   # PG AM WP NE ET MP PE
CR4 = 0x6F8                        # OSXMMEXCPT OSFXSR PGE MCE PAE PSE DE
EFER = 0xD01                       # NXE LMA LME SCE (LMA is set by the CPU)
RFLAGS_USER = 0x246


def gdt(tss: int, teb32: int = 0) -> bytes:
    """The GDT as KiInitializeGdt lays it out; TSS descriptor busy (type 0xB), accessed bits set."""
    def seg(base: int, limit: int, access: int, flags: int) -> int:
        return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
                | (((limit >> 16) & 0xF) << 48) | (flags << 52) | (((base >> 24) & 0xFF) << 56))
    e = [0] * (GDT_LIMIT + 1 >> 3)
    e[R0_CODE >> 3] = seg(0, 0, 0x9B, 0x2)
    e[R0_DATA >> 3] = seg(0, 0xFFFFF, 0x93, 0xC)
    e[R3_CMCODE >> 3] = seg(0, 0xFFFFF, 0xFB, 0xC)
    e[R3_DATA >> 3] = seg(0, 0xFFFFF, 0xF3, 0xC)
    e[R3_CODE >> 3] = seg(0, 0, 0xFB, 0x2)
    e[SYS_TSS >> 3] = seg(tss, 0x67, 0x8B, 0x0)
    e[(SYS_TSS >> 3) + 1] = tss >> 32
    e[R3_CMTEB >> 3] = seg(teb32, 0x3C00, 0xF3, 0x4)
    return struct.pack(f"<{len(e)}Q", *e)


def tss(rsp0: int, ists: list[int]) -> bytes:
    b = bytearray(0x68)
    struct.pack_into("<Q", b, 4, rsp0)
    for i, ist in enumerate(ists):
        struct.pack_into("<Q", b, 0x24 + 8 * i, ist)
    struct.pack_into("<H", b, 0x66, 0x68)
    return bytes(b)


def idt(handlers: list[int]) -> bytes:
    """Interrupt gates to the kernel image's handlers; int 3/4/0x29/0x2c/0x2d callable from user."""
    out = bytearray()
    for vec, h in enumerate(handlers):
        dpl = 3 if vec in (3, 4, 0x29, 0x2C, 0x2D) else 0
        ist = {2: 3, 8: 1, 0x12: 2}.get(vec, 0)
        out += struct.pack("<HHBBHIi", h & 0xFFFF, R0_CODE, ist, 0x8E | dpl << 5,
                           (h >> 16) & 0xFFFF, h >> 32 & 0xFFFFFFFF, 0)
    return bytes(out)


@dataclass
class Processor:
    index: int
    kpcr: int
    gdt: int
    idt: int
    tss: int
    stack_top: int
    ists: list[int]
    transition_stack: int          # top of the KVA-shadow transition stack (TSS.Rsp0 then)
    shadow_pages: list[int]        # per-CPU VAs a KVA-shadow user CR3 must map


def build_processor(L: Layout, kmem: KernelMemory, index: int, area: int, stacks: int) -> Processor:
    """Lay out one CPU: [GDT+TSS][IDT][KPCR...][transition stack]; kernel stack + 3 IST stacks."""
    kpcr_size = L.size("_KPCR") or KPCR_SIZE_FALLBACK
    gdt_va = area
    idt_va = area + PAGE
    kpcr = area + 2 * PAGE
    kpcr_pages = -(-kpcr_size // PAGE)
    transition = kpcr + kpcr_pages * PAGE
    kmem.back(area, 3 + kpcr_pages)
    # stacks: guard page (never mapped) below each
    stack_base = stacks + PAGE
    kmem.back(stack_base, 6)
    top = stack_base + 6 * PAGE
    ists = []
    at = top + PAGE
    for _ in range(3):
        kmem.back(at, 1)
        ists.append(at + PAGE)
        at += 2 * PAGE
    return Processor(index, kpcr, gdt_va, idt_va, gdt_va + 0x80, top - 0x30, ists,
                     transition + PAGE, [gdt_va, idt_va, kpcr, transition])


def write_processor(L: Layout, kmem: KernelMemory, cpu: Processor, handlers: list[int],
                    current_thread: int, idle_thread: int, kvashadow: bool) -> None:
    kmem.write(cpu.gdt, gdt(cpu.tss))
    kmem.write(cpu.tss, tss(cpu.transition_stack if kvashadow else cpu.stack_top, cpu.ists))
    kmem.write(cpu.idt, idt(handlers))
    b = bytearray(L.size("_KPCR") or KPCR_SIZE_FALLBACK)
    struct.pack_into("<QQ", b, KPCR_GDT_BASE, cpu.gdt, cpu.tss)
    struct.pack_into("<Q", b, KPCR_IDT_BASE, cpu.idt)
    L.put(b, 0, "_KPCR", "Self", cpu.kpcr)
    prcb = L.off("_KPCR", "Prcb")
    L.put(b, 0, "_KPCR", "CurrentPrcb", cpu.kpcr + prcb)
    L.put(b, prcb, "_KPRCB", "CurrentThread", current_thread)
    L.put(b, prcb, "_KPRCB", "IdleThread", idle_thread)
    kmem.write(cpu.kpcr, bytes(b))
