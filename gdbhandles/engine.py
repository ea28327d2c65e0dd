"""The facade every front end uses: Windows.open(phys, registers) → processes, walk, lookup, info.

`phys` is any physical reader (`read(paddr, size) -> bytes`); `registers` is one dict per
vCPU (rip, cs, cr3, gs_base, k_gs_base …), the selected vCPU first, or None offline.
"""

from __future__ import annotations

from typing import Callable, Iterator

from gdbhandles.windows import access, discovery, kernel as kernel_module
from gdbhandles.errors import BadHandle, HandleError, NoHandleTable, ProcessNotFound, UnknownType
from gdbhandles.windows.handle_table import Entry, EntryFormat, HandleTable, Problem
from gdbhandles.windows.memory import PhysicalMemory
from gdbhandles.windows.objects import Objects
from gdbhandles.windows.eprocess import Process, active_processes, read_process
from gdbhandles.records import (HandleRecord, InfoRecord, LookupRecord, ProcessRecord, ReadStats,
                                WalkWarning)

MASK64 = (1 << 64) - 1
CURRENT_PROCESS, CURRENT_THREAD = MASK64, MASK64 - 1
KERNEL_HANDLE_BIT = 0x80000000
SYSTEM_PID = 4
UNTYPED_MIN, UNTYPED_SHARE = 8, 20      # warn from 8 untyped objects and more than 1 in 20
STATUS_TEXT = {
    "free": "is free (closed; its entry holds no object)",
    "never_allocated": "was never allocated",
    "past_end": "is past the end of the table",
    "first_slot": "is the first slot of a table page, never a handle",
}

Progress = Callable[[str], None]


class Windows:
    """One discovered Windows kernel; caches live as long as this object (one stop of the guest)."""

    def __init__(self, kernel: kernel_module.Kernel, registers: list[dict]):
        self.kernel = kernel
        self.registers = registers
        self.objects = Objects(kernel)
        self.format = EntryFormat(kernel)
        self.warnings: list[WalkWarning] = []

    @classmethod
    def open(cls, phys, registers: list[dict] | None = None, dtb: int | None = None,
             kernel_base: int | None = None, isf: str | None = None,
             progress: Progress | None = None, layout: str = "auto") -> "Windows":
        for what, address in (("DTB", dtb), ("kernel base", kernel_base)):
            if address is not None and address & 0xFFF:
                raise HandleError(f"the given {what} {address:#x} is not page-aligned (it must end in 000)")
        memory = phys if isinstance(phys, PhysicalMemory) else PhysicalMemory(phys)
        if progress:
            progress("looking for the Windows kernel")
        return cls(discovery.discover(memory, registers, dtb, kernel_base, isf, layout, progress), registers or [])

    # --- processes -------------------------------------------------------------------------

    def _processes(self) -> list[Process]:
        return active_processes(self.kernel)

    def _select(self, target: int | str | None) -> list[Process]:
        processes = self._processes()
        if target is None:
            return processes
        if isinstance(target, str):
            chosen = [p for p in processes if p.name.lower() == target.lower()]
        else:
            chosen = [p for p in processes if p.pid == target]
        if not chosen:
            what = f"named {target}" if isinstance(target, str) else f"with pid {target} ({target:#x})"
            raise ProcessNotFound(f"no process {what}")
        return chosen

    def _one(self, target: int | str) -> Process:
        chosen = self._select(target)
        if len(chosen) > 1:
            pids = ", ".join(str(p.pid) for p in chosen)
            raise ProcessNotFound(f"{len(chosen)} processes are named {target} (pids {pids}): give a pid")
        return chosen[0]

    def processes(self) -> list[ProcessRecord]:
        records = []
        for process in self._processes():
            code = level = bound = count = 0
            level = None
            if process.table:
                try:
                    table = HandleTable(self.kernel, process.table, self.format)
                    code, level, bound = table.table_code, table.levels, table.next_handle_needing_pool
                    count = table.count()
                except HandleError as exc:
                    self.warnings.append(WalkWarning(process.pid, process.name, str(exc)))
            records.append(ProcessRecord(process.pid, process.name, process.eprocess, process.dtb,
                                         process.table, code, level, bound, count))
        return records

    # --- walk ------------------------------------------------------------------------------

    def walk(self, target: int | str | None = None, type: str | None = None, name: str | None = None,
             progress: Progress | None = None,
             warn: Callable[[WalkWarning], None] | None = None,
             object: int | None = None) -> Iterator[HandleRecord]:
        """Every handle of one process (pid or image name) or of all, in list and handle order.
        `object` (a body address) keeps only the entries pointing to it, before any decoding.
        Unreadable pages and bad entries become warnings (`warn` or `self.warnings`)."""
        report = warn or self.warnings.append
        chosen = self._select(target)
        if target is not None and len(chosen) == 1 and not chosen[0].table:
            raise NoHandleTable(_no_table(chosen[0]))
        wanted_type = self._type_name(type).lower() if type else None
        wanted_name = name.lower() if name else None
        wanted_header = None if object is None else object - self.objects.body_offset
        total, decoded, untyped = 0, 0, 0
        for number, process in enumerate(chosen, 1):
            if progress:
                progress(f"process {number}/{len(chosen)}: {process.name}({process.pid}), {total} handles so far")
            if not process.table:
                continue
            try:
                table = HandleTable(self.kernel, process.table, self.format)
            except HandleError as exc:
                report(WalkWarning(process.pid, process.name, f"handle table {process.table:#x}: {exc}"))
                continue
            for page in table.pages():
                if wanted_header is not None:
                    page = [e for e in page if isinstance(e, Problem) or e.header == wanted_header]
                used = [e for e in page if isinstance(e, Entry) and e.header is not None]
                self.objects.prefetch([e.header for e in used])
                for item in page:
                    if isinstance(item, Problem):
                        report(WalkWarning(process.pid, process.name, item.message, item.handle))
                        continue
                    if item.header is None:
                        continue
                    record = self._record(process, item, report)
                    if record is None:
                        continue
                    decoded, untyped = decoded + 1, untyped + (record.type is None)
                    if wanted_type and (record.type or "").lower() != wanted_type:
                        continue
                    if wanted_name and wanted_name not in (record.name or "").lower():
                        continue
                    total += 1
                    yield record
        self._untyped_share(decoded, untyped, report)

    def _untyped_share(self, decoded: int, untyped: int, report) -> None:
        """One line when more than a small share of the walk's objects have no known type: then the
        header cookie, the type table or the layout does not fit this kernel, and no row is to be trusted."""
        if untyped < UNTYPED_MIN or untyped * UNTYPED_SHARE <= decoded:
            return
        failed = [c.name for c in self.kernel.checks if not c.passed]
        why = f"failed checks: {'; '.join(failed)}" if failed else "all discovery checks passed"
        report(WalkWarning(0, "walk", f"{untyped} of {decoded} handles decode to no known object type: the header "
                                      f"cookie or the structure layout does not fit this kernel ({why}); supply "
                                      "this kernel's volatility3 ISF as the profile (set handle profile FILE, "
                                      "CLI: --profile FILE)"))

    def type_names(self) -> list[str]:
        """The object type names of this kernel, in ObTypeIndexTable order (index 2 on; the table
        holds at most 256 entries and ends at the first NULL)."""
        names = []
        for index in range(2, 256):
            name = self.objects.type_of_index(index)
            if name is None:
                break
            names.append(name)
        return names

    def _type_name(self, wanted: str) -> str:
        names = self.type_names()
        for name in names:
            if name.lower() == wanted.lower():
                return name
        raise UnknownType(f"unknown object type {wanted!r}; this guest's types: {', '.join(sorted(names))}")

    def _record(self, process: Process, entry: Entry, report) -> HandleRecord | None:
        try:
            found = self.objects.decode(entry.header)
        except HandleError as exc:
            report(WalkWarning(process.pid, process.name, f"object header {entry.header:#x}: {exc}",
                               entry.handle))
            return None
        problems = [] if found.type is not None else [f"type: TypeIndex of header {entry.header:#x} names no "
                                                      "object type of this kernel"]
        return HandleRecord(process.pid, process.name, entry.handle, found.body, found.type, found.name,
                            entry.granted_access, entry.attributes, problems)

    # --- lookup ----------------------------------------------------------------------------

    def lookup(self, target: int | str, handle: int, vcpu: int = 0) -> LookupRecord:
        """One handle of a process. Pseudo-handles -1/-2 resolve for vCPU `vcpu` (an index
        into the registers, 0 = the selected one); kernel handles (bit 31, 32- or 64-bit
        spelling) resolve in System's table. BadHandle (with `.record`) unless valid."""
        handle &= MASK64
        process = self._one(target)
        if handle in (CURRENT_PROCESS, CURRENT_THREAD):
            return self._pseudo(process, handle, vcpu)
        note = None
        if handle & KERNEL_HANDLE_BIT and handle >> 32 in (0, 0xFFFFFFFF):
            system = read_process(self.kernel, self.kernel.system_process)
            table_address, value = self.kernel.kernel_table, handle & (KERNEL_HANDLE_BIT - 1)
            process, note = Process(system.pid, system.name, system.eprocess, system.dtb, table_address), \
                f"kernel handle {handle:#x}: entry {value:#x} of the kernel handle table"
        else:
            value = handle
        if not process.table:
            raise NoHandleTable(_no_table(process))
        table = HandleTable(self.kernel, process.table, self.format)
        status, entry, path = table.lookup(value)
        record = LookupRecord(process.pid, process.name, value & ~3, status, table=table.address,
                              levels=table.levels, path=path, entry=entry.address if entry else None,
                              note=note)
        if status != "valid":
            detail = STATUS_TEXT[status]
            if status == "past_end":
                detail += f" (NextHandleNeedingPool {table.next_handle_needing_pool:#x})"
            raise BadHandle(f"handle {value & ~3:#x} of {process.name}({process.pid}) {detail}", record)
        found = self.objects.decode(entry.header)
        self._fill(record, found, entry.granted_access, entry.attributes)
        return record

    def _fill(self, record: LookupRecord, found, granted: int, attributes: int) -> None:
        record.object, record.header, record.type, record.name = found.body, found.header, found.type, found.name
        record.granted_access, record.attributes = granted, attributes
        record.access_names = access.rights(found.type, granted)
        record.attribute_names = access.attribute_names(attributes)

    def _pseudo(self, process: Process, handle: int, vcpu: int) -> LookupRecord:
        """-1/-2 name the current process/thread of one vCPU, so the pid given must be that of
        the vCPU's current process (_KPCR.Prcb.CurrentThread -> _KTHREAD.ApcState.Process)."""
        pseudo = handle - (1 << 64)
        if vcpu >= len(self.registers):
            raise BadHandle(f"pseudo-handle {pseudo} needs the registers of vCPU {vcpu} "
                            "(only a live guest has them)")
        registers = self.registers[vcpu]
        cpu = f"the selected vCPU (gdb thread {registers['thread']})" if "thread" in registers and vcpu == 0 \
            else f"vCPU {vcpu}"
        kpcr = kernel_module.vcpu_kpcr(registers)
        if kpcr is None:
            raise BadHandle(f"pseudo-handle {pseudo}: {cpu} has no kernel GS base (KPCR)")
        layout, space = self.kernel.layout, self.kernel.space
        thread = space.u64(kpcr + layout.offset("_KPCR", "Prcb.CurrentThread"))
        current = read_process(self.kernel, space.u64(thread + layout.offset("_KTHREAD", "ApcState.Process")))
        owner = f"{current.name}({current.pid})"
        what = "current process" if handle == CURRENT_PROCESS else "current thread"
        if current.pid != process.pid:
            raise BadHandle(f"pseudo-handle {pseudo} is the {what} of {cpu}, in {owner}, not in "
                            f"{process.name}({process.pid}): give pid {current.pid}, or select another vCPU")
        body = thread if handle == CURRENT_THREAD else current.eprocess
        found = self.objects.decode(body - self.objects.body_offset)
        record = LookupRecord(current.pid, current.name, handle, "valid",
                              note=f"pseudo-handle {pseudo}: the {what} of {cpu}, in {owner}")
        all_access = access.RIGHTS.get(found.type or "", ({}, {}))[1]
        self._fill(record, found, next(iter(all_access), 0), 0)
        return record

    # --- info ------------------------------------------------------------------------------

    def info(self) -> InfoRecord:
        kernel = self.kernel
        notes = [f"{name} borrowed from profile {version}" for name, version in kernel.layout.borrowed.items()]
        return InfoRecord(
            build=kernel.build, layout=kernel.layout.version,
            version=".".join(map(str, kernel.image.file_version)) if kernel.image.file_version else None, guid=kernel.image.guid or "", age=kernel.image.age or 0,
            kernel_base=kernel.base, kernel_size=kernel.image.size_of_image, dtb=kernel.space.dtb,
            dtb_source=kernel.dtb_source, kernel_base_source=kernel.base_source, profile=kernel.layout.source,
            globals=dict(kernel.globals), sources=dict(kernel.sources),
            stats=ReadStats(**vars(kernel.phys.stats)), header_cookie=kernel.header_cookie,
            warnings=notes + [f"pid {w.pid}: {w.message}" for w in self.warnings],
            checks=[(c.name, c.passed, c.detail) for c in kernel.checks],
            inferred=dict(getattr(kernel.layout, "how", {})))


def _no_table(process: Process) -> str:
    return f"{process.name}({process.pid}) has no handle table (ObjectTable is NULL: the process is exiting)"
