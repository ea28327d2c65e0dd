"""Inferred offsets the processor itself uses: _KPROCESS.DirectoryTableBase (what attaching to a
process writes to CR3) and _KPCR.Prcb.CurrentThread (where gs: finds the running thread).

Code: KeStackAttachProcess -> KiAttachProcess -> KiSwapProcess loads [process+DirectoryTableBase]
and writes it to CR3; KeGetCurrentThread / PsGetCurrentThread return gs:[Prcb.CurrentThread]
(PsGetCurrentProcess reads through it: infer_threads). When no code writes CR3, the offset every
shipped layout gives stands in for the code. Live data: System's slot is a page-table root that
maps the kernel image as the kernel's own does, and every process's slot is a distinct root that
maps it too; in each vCPU's KPCR, the slot pointing to a thread (dispatcher type 6) whose
ApcState.Process is on the process list.
"""

from __future__ import annotations

from gdbhandles.errors import HandleError
from gdbhandles.windows import disasm, layouts
from gdbhandles.windows.infer import InferredLayout, agree, exported_code, qwords
from gdbhandles.windows.eprocess import linked
from gdbhandles.windows.kernel import Kernel
from gdbhandles.windows.kpcr import vcpu_kpcr
from gdbhandles.windows.memory import PFN_MASK

__all__ = ["dtb_written", "dtb_first_way", "check_dtb", "check_current_thread"]

DTB_SCAN = 0x100            # bytes of _KPROCESS searched: DirectoryTableBase is in its header part
KPCR_SCAN = 0x400           # bytes of _KPCR searched: Prcb.CurrentThread is near Prcb's start
MAX_PROCESSES = 256         # processes the DirectoryTableBase invariant is checked on
THREAD_OBJECT = 6           # _DISPATCHER_HEADER.Type of a thread
CURRENT_THREAD_CODE = ("KeGetCurrentThread", "PsGetCurrentThread")


def dtb_written(found: list[disasm.Trace]) -> tuple[int, int, bool] | None:
    """(displacement, CR3 write's address, whether flag bits were set on the way) of the first CR3
    write whose value was loaded from a field of an argument (the process), in the header part of
    _KPROCESS; writes of anything else (the Prcb's kernel root under KVA shadowing) are skipped."""
    for value, at in disasm.cr3_writes(found):
        bits = False
        while value and value[0] == "bits":
            value, bits = value[1], True
        if value and value[0] == "load" and value[1][0] == "arg" and 0 <= value[2] < DTB_SCAN:
            return value[2], at, bits
    return None


def dtb_first_way(kernel: Kernel) -> tuple[int, str] | None:
    """DirectoryTableBase from the code that writes it to CR3, else from every shipped layout."""
    for function, found in exported_code(kernel, "KeStackAttachProcess", "KeAttachProcess", depth=2):
        written = dtb_written(found)
        if written:
            disp, at, bits = written
            return disp, (f"code: {function} -> CR3 written at {at:#x} from [process+{disp:#x}]"
                          + (" with flag bits set" if bits else ""))
    offsets = {layouts.ProfileLayout(p, "", None).offset("_EPROCESS", "Pcb.DirectoryTableBase")
               for p in layouts.shipped_profiles()}
    if len(offsets) == 1:
        return offsets.pop(), f"shipped layouts: the same offset in all {len(layouts.shipped_profiles())} profiles"
    return None


def _words(kernel: Kernel, addresses: list[int], size: int) -> list[list[int]]:
    """`size` bytes of each readable structure among `addresses`, as qwords."""
    out = []
    for address in addresses:
        try:
            out.append(qwords(kernel, address, size))
        except HandleError:
            continue
    return out


def _dtb_live(kernel: Kernel, first: int | None) -> tuple[int, str] | None:
    """The KPROCESS slot that, in System and in every listed process, holds a distinct page-table
    root mapping the kernel image as the kernel's page tables do (of several, `first` if it is one)."""
    slot = 8 * ((kernel.base >> 39) & 511)
    want = kernel.phys.read(kernel.space.dtb + slot, 8)
    processes = [kernel.system_process] + [p for p in linked(kernel, MAX_PROCESSES) if p != kernel.system_process]

    def maps(value: int) -> bool:
        try:
            return bool(value & PFN_MASK) and kernel.phys.read((value & PFN_MASK) + slot, 8) == want
        except HandleError:
            return False

    words = _words(kernel, processes, DTB_SCAN)
    found = [8 * i for i in range(DTB_SCAN // 8)
             if all(maps(w[i]) for w in words) and len({w[i] & PFN_MASK for w in words}) == len(words)]
    if not found:
        return None
    return (first if first in found else found[0]), (
        f"live: the only slot holding, in System and {len(words) - 1} other processes, distinct page-table roots "
        "that map the kernel" if len(found) == 1 else
        f"live: one of {len(found)} slots holding, in every process, distinct page-table roots that map the kernel")


def check_dtb(kernel: Kernel, layout: InferredLayout) -> None:
    """DirectoryTableBase by its first way (put early: nothing before the process list needs it)
    against the live invariant, once PsActiveProcessHead is known."""
    first = dtb_first_way(kernel)
    live = _dtb_live(kernel, first[0] if first else None) if kernel.globals.get("PsActiveProcessHead") else None
    if first or live:
        offset, how = agree(kernel, "_EPROCESS.Pcb.DirectoryTableBase", first, live)
        layout.put("_EPROCESS", "Pcb.DirectoryTableBase", offset, 8, how)


def _current_thread_code(kernel: Kernel, layout: InferredLayout) -> tuple[int, str] | None:
    known = layout.fields.get(("_KPCR", "Prcb.CurrentThread"))
    if known is not None:
        return known.offset, layout.how["_KPCR.Prcb.CurrentThread"]
    for function, found in exported_code(kernel, *CURRENT_THREAD_CODE):
        for value in found[0].returns:
            if value and value[0] == "gs":
                return value[1], f"code: {function} returns gs:[{value[1]:#x}]"
    return None


def _current_thread_live(kernel: Kernel, registers: list[dict], code: int | None) -> tuple[int, str] | None:
    """The KPCR slot that, on every vCPU, points to a thread whose ApcState.Process is listed (the
    idle thread's slot may too: then the code's slot when it is one of them, else the first)."""
    apc = kernel.layout.offset("_KTHREAD", "ApcState.Process")
    listed = set(linked(kernel, MAX_PROCESSES)) | {kernel.system_process}
    kpcrs = _words(kernel, [k for k in (vcpu_kpcr(r) for r in registers) if k is not None], KPCR_SCAN)
    found = None
    for words in kpcrs:
        here = set()
        for i, value in enumerate(words):
            try:
                if value >> 47 == 0x1FFFF and kernel.space.u8(value) == THREAD_OBJECT \
                        and kernel.space.u64(value + apc) in listed:
                    here.add(8 * i)
            except HandleError:
                continue
        found = here if found is None else found & here
    if not found:
        return None
    chosen = code if code in found else min(found)
    return chosen, (f"live: in {len(kpcrs)} vCPU(s)' KPCR, {'one' if len(found) > 1 else 'the only one'} of "
                    f"{len(found)} slot(s) pointing to a thread (type 6) whose ApcState.Process is on the process list")


def check_current_thread(kernel: Kernel, layout: InferredLayout, registers: list[dict]) -> None:
    """Prcb.CurrentThread by code against the vCPUs' KPCRs (only a live guest has registers)."""
    code = _current_thread_code(kernel, layout)
    live = None
    if registers and kernel.globals.get("PsActiveProcessHead") and layout.fields.get(("_KTHREAD", "ApcState.Process")):
        live = _current_thread_live(kernel, registers, code[0] if code else None)
    if code or live:
        offset, how = agree(kernel, "_KPCR.Prcb.CurrentThread", code, live)
        layout.put("_KPCR", "Prcb.CurrentThread", offset, 8, how)
