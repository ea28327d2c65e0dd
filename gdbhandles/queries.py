"""Questions a person stopped in a Windows kernel asks beyond "what is this handle": which
process the vCPU is running, who holds an object, what a process or thread id names
(PspCidTable), and which entries are free. Built on the engine facade (engine.Windows).
"""

from __future__ import annotations

from typing import Iterator

from gdbhandles.engine import STATUS_TEXT, Windows
from gdbhandles.errors import BadHandle, HandleError
from gdbhandles.records import CidRecord, FreeEntryRecord, WalkWarning
from gdbhandles.windows.cid_table import cid_table, identity
from gdbhandles.windows.eprocess import Process
from gdbhandles.windows.free_list import free_list
from gdbhandles.windows.handle_table import Entry, HandleTable, LookupStatus, Problem
from gdbhandles.windows.kpcr import KThread, Kpcr, vcpu_kpcr

__all__ = ["current_process", "cid", "cid_all", "free_entries"]


def current_process(windows: Windows, vcpu: int = 0) -> tuple[Process, str]:
    """The process whose address space vCPU `vcpu` runs in (KPCR -> Prcb.CurrentThread ->
    ApcState.Process), and one line saying how it was found."""
    if vcpu >= len(windows.registers):
        raise HandleError(f"no current process without the registers of vCPU {vcpu} (a dump has none): give a pid")
    registers = windows.registers[vcpu]
    kpcr = vcpu_kpcr(registers)
    if kpcr is None:
        raise HandleError(f"vCPU {vcpu} has no kernel GS base (KPCR), so no current process: give a pid "
                          "(or walk all)")
    kernel = windows.kernel
    layout, space = kernel.layout, kernel.space
    thread = Kpcr.of(layout).current_thread(space, kpcr)
    attached = KThread.of(layout).process(space, thread)
    owner = KThread.of(layout).owner(space, thread)
    process = windows.process_at(attached)
    if all(p.eprocess != attached for p in windows.select(None)):
        raise HandleError(f"the current process of vCPU {vcpu}, {process.name}({process.pid}) at {attached:#x}, is "
                          "not on the active process list (the idle process, or one being created or torn "
                          "down): give a pid")
    mode = "user mode, KPCR from KERNEL_GS_BASE" if registers.get("cs", 0) & 3 else "kernel mode, KPCR from GS base"
    # QEMU's gdbstub numbers vCPU n as thread n + 1; offline there is only the index
    name = f"vCPU {registers['thread'] - 1}" if "thread" in registers else f"vCPU {vcpu}"
    note = f"current process of {name} ({mode}): {process.name}({process.pid}), thread {thread:#x}"
    if owner != attached:
        note += f" of {windows.process_at(owner).name}, attached to this process"
    return process, note


def _cid_record(windows: Windows, entry: Entry) -> CidRecord:
    """The entry's pointer is the object body: its header sits Body bytes below it."""
    body = entry.header
    found = windows.headers.at_body(body)
    who = identity(windows.kernel, body, found.type)
    return CidRecord(entry.handle, body, found.type, who.pid if who else None, who.tid if who else None,
                     windows.process_at(who.eprocess).name if who else None, entry.address)


def cid(windows: Windows, number: int) -> CidRecord:
    """The process or thread with this id, through PspCidTable; BadHandle names why not."""
    table = cid_table(windows.kernel)
    status, entry, _path = table.lookup(number)
    if status is not LookupStatus.VALID:
        raise BadHandle(f"id {number} ({number:#x}) is not in PspCidTable: its entry {STATUS_TEXT[status]}")
    return _cid_record(windows, entry)


def cid_all(windows: Windows) -> list[CidRecord]:
    """Every id in PspCidTable, in id order; bad entries become warnings (windows.warnings)."""
    table = cid_table(windows.kernel)
    records = []
    for item in table.entries():
        if isinstance(item, Problem):
            windows.warnings.append(WalkWarning(0, "PspCidTable", item.message, item.handle))
        elif item.header is not None:
            try:
                records.append(_cid_record(windows, item))
            except HandleError as exc:
                windows.warnings.append(WalkWarning(0, "PspCidTable", f"object {item.header:#x}: {exc}",
                                                    item.handle))
    return records


def free_entries(windows: Windows, target: int | str | None = None, warn=None) -> Iterator[FreeEntryRecord]:
    """Every entry without an object of the chosen processes, with its free-list position."""
    report = warn or windows.warnings.append
    for process in windows.select(target):
        if not process.table:
            continue
        try:
            table = HandleTable(windows.kernel.space, windows.kernel.layout, process.table)
            order = free_list(table)
        except HandleError as exc:
            report(WalkWarning(process.pid, process.name, f"handle table {process.table:#x}: {exc}"))
            continue
        if order.problem:
            report(WalkWarning(process.pid, process.name, f"{order.source}: {order.problem}"))
        entries = []
        for item in table.entries():
            if isinstance(item, Problem):
                report(WalkWarning(process.pid, process.name, item.message, item.handle))
            else:
                entries.append(item)
        highest = max((e.handle for e in entries if e.header is not None), default=0)
        for e in entries:
            if e.header is None:
                status = LookupStatus.NEVER_ALLOCATED if e.empty or e.handle > highest else LookupStatus.FREE
                yield FreeEntryRecord(process.pid, process.name, e.handle, e.address, status,
                                      order.position.get(e.handle))
