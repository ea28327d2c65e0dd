"""KVA shadowing (the Meltdown mitigation): per-process user CR3s that map the user half and
only a small kernel shadow (KVASCODE, GDT/IDT/TSS/KPCR pages, transition stacks)."""
from __future__ import annotations

import struct

from .paging import AddressSpace
from .physmem import PAGE
from .vmem import KernelMemory

IRET_EXIT = bytes.fromhex("0f22d8" "48cf")      # mov cr3, rax; iretq (as KiKernelIretExit ends)


def kvascode_pages(image) -> list[int]:
    out = []
    for s in image.sections:
        if s.name.rstrip("\0") == "KVASCODE":
            out += [image.base + s.rva + off for off in range(0, max(s.vsize, 1), PAGE)]
    return out


def iret_exit(image, kmem: KernelMemory) -> int:
    """VA of `mov cr3, rax; iretq` inside KVASCODE: found, or put into the section's int3 padding."""
    for s in image.sections:
        if s.name.rstrip("\0") != "KVASCODE":
            continue
        code = bytes(image.data[s.rva:s.rva + s.vsize])
        at = code.find(IRET_EXIT)
        if at < 0:
            at = code.rfind(b"\xCC" * 16)
            assert at >= 0, "KVASCODE has no room for the iret exit"
            at = (at + 15) & ~15
            image.data[s.rva + at:s.rva + at + len(IRET_EXIT)] = IRET_EXIT
            kmem.write(image.base + s.rva + at, IRET_EXIT)
        return image.base + s.rva + at
    raise KeyError("no KVASCODE section in the kernel image")


def shadow_kernel(kmem: KernelMemory, code: list[int], data: list[int]) -> AddressSpace:
    """The kernel half every user CR3 shares: the given kernel pages, same frames, not global."""
    shadow = AddressSpace(kmem.phys)
    for va in code:
        shadow.map(va, kmem.pa(va) & ~0xFFF, write=False, execute=True, glob=False)
    for va in data:
        shadow.map(va, kmem.pa(va) & ~0xFFF, write=True, execute=False, glob=False)
    return shadow


def user_space(phys, process_space: AddressSpace, shadow: AddressSpace) -> AddressSpace:
    """A process's UserDirectoryTableBase: its user half plus the shared shadow kernel half."""
    u = AddressSpace(phys)
    for i in range(256):
        u.set_pml4e(i, process_space.pml4e(i))
    for i in range(256, 512):
        u.set_pml4e(i, shadow.pml4e(i))
    return u


def iret_frame(rip: int, rsp: int, cs: int = 0x33, ss: int = 0x2B, rflags: int = 0x246) -> bytes:
    return struct.pack("<5Q", rip, cs, rflags, rsp, ss)
