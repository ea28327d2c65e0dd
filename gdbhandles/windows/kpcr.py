"""_KPCR and _KTHREAD: a vCPU's current thread and the process it runs in.

The KPCR is at GS base in kernel mode and in the swapped-out KERNEL_GS_BASE in user mode.
`Self` and `IdtBase` sit at the same place in every x64 build, so discovery reads them
before any layout is known; the rest comes from the layout.
"""

from __future__ import annotations

from gdbhandles.windows.memory import AddressSpace
from gdbhandles.windows.structure import Struct

__all__ = ["KPCR_SELF", "KPCR_IDT_BASE", "vcpu_cpl", "vcpu_kpcr", "Kpcr", "KThread"]

KPCR_SELF, KPCR_IDT_BASE = 0x18, 0x38      # _KPCR.Self, _KPCR.IdtBase on every x64 build


def vcpu_cpl(registers: dict) -> int:
    """The vCPU's privilege level (CS & 3): 0 kernel, 3 user."""
    return registers.get("cs", 0) & 3


def vcpu_kpcr(registers: dict) -> int | None:
    """The KPCR of a vCPU: GS base in kernel mode, the swapped-out KERNEL_GS_BASE in user mode."""
    kpcr = registers.get("gs_base" if vcpu_cpl(registers) == 0 else "k_gs_base")
    return kpcr if kpcr and kpcr >> 47 == 0x1FFFF else None


class Kpcr(Struct):
    NAME = "_KPCR"

    def current_thread(self, space: AddressSpace, kpcr: int) -> int:
        """`Prcb.CurrentThread`: the _KTHREAD running on this processor."""
        return self.field("Prcb.CurrentThread").read(space.read, kpcr)


class KThread(Struct):
    NAME = "_KTHREAD"

    def process(self, space: AddressSpace, thread: int) -> int:
        """`ApcState.Process`: the process whose address space the thread is attached to."""
        return self.field("ApcState.Process").read(space.read, thread)

    def owner(self, space: AddressSpace, thread: int) -> int:
        """`Process`: the process the thread belongs to (differs from ApcState.Process while
        the thread is attached to another process)."""
        return self.field("Process").read(space.read, thread)
