"""The facade every front end uses: Windows.open(phys, registers) → processes, walk, lookup, info.

`phys` is any physical backend (`windows.memory.PhysicalBackend`); `registers` is one dict
per vCPU (rip, cs, cr3, gs_base, k_gs_base …), the selected vCPU first, or None offline.
A walk decodes entry, header and type first, applies the pid and type filters, and reads
names only for the handles that are left (the name filter last): names are most of the
bytes a walk reads.

About 420 lines: the four operations and the warnings each may give (two of them summaries
of a whole walk) belong together; what
they are built from lives in windows/ (one module per structure) and processes.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from gdbhandles.errors import BadHandle, CorruptTable, DamagedChain, HandleError, NoHandleTable, ProfileError, UnknownType
from gdbhandles.records import (HandleRecord, InfoRecord, LookupRecord, ProcessRecord, ReadStats,
                                WalkWarning)
from gdbhandles.windows import access, discovery, kernel as kernel_module, validate
from gdbhandles.processes import ProcessList
from gdbhandles.windows.cid_table import cid_table
from gdbhandles.windows.eprocess import Process, fixed_extent, read_process
from gdbhandles.windows.handle_table import Entry, HandleTable, LookupStatus, Problem
from gdbhandles.windows.kpcr import KThread, Kpcr, vcpu_kpcr
from gdbhandles.windows.memory import MASK64, PhysicalMemory
from gdbhandles.windows.names import Names, NameSource
from gdbhandles.windows.object_header import Header, Headers

__all__ = ["Windows", "Progress"]

CURRENT_PROCESS, CURRENT_THREAD = MASK64, MASK64 - 1
KERNEL_HANDLE_BIT = 0x80000000
TABLE_READS = 4          # a lookup brings its whole table when that costs at most this many reads
UNTYPED_MIN, UNTYPED_SHARE = 8, 20      # warn from 8 untyped objects and more than 1 in 20
UNNAMED_MIN, UNNAMED_SHARE = 8, 20      # the same for names that fail to decode
STATUS_TEXT = {
    LookupStatus.FREE: "is free (closed; its entry holds no object)",
    LookupStatus.NEVER_ALLOCATED: "was never allocated",
    LookupStatus.PAST_END: "is past the end of the table",
    LookupStatus.FIRST_SLOT: "is the first slot of a table page, never a handle",
}

Progress = Callable[[str], None]
Report = Callable[[WalkWarning], None]


@dataclass
class _Walk:
    """One walk's filters and where its warnings go (each layout gap said once per walk)."""
    report: Report
    type: str | None
    name: str | None
    header: int | None = None            # only entries pointing to this object header
    said: set[str] = field(default_factory=set)
    decoded: int = 0                     # headers read, and how many of them named no known type
    untyped: int = 0
    named: int = 0                       # objects with a name to decode, and per type how many failed
    unnamed: dict[str, int] = field(default_factory=dict)
    name_lines: int = 0                  # name failures said one by one, and those left to the summary
    unlisted: int = 0

    def once(self, message: str) -> None:
        if message not in self.said:
            self.said.add(message)
            self.report(WalkWarning(None, None, message))

    def damage(self, process: Process, handle: int, message: str, key: str) -> None:
        """One warning per damaged structure (`key`), however many handles lead to it."""
        if key not in self.said:
            self.said.add(key)
            self.report(WalkWarning(process.pid, process.name, message, handle))

    def name_failure(self, process: Process, handle: int, message: str, key: str) -> None:
        """Said like damage for the first UNNAMED_MIN structures; the rest only in the summary."""
        if key in self.said:
            return
        if self.name_lines < UNNAMED_MIN:
            self.name_lines += 1
            self.damage(process, handle, message, key)
        else:
            self.said.add(key)
            self.unlisted += 1


class Windows:
    """One discovered Windows kernel; caches live as long as this object (one stop of the guest)."""

    def __init__(self, kernel: kernel_module.Kernel, registers: list[dict]):
        self.kernel = kernel
        self.registers = registers
        self.headers = Headers(kernel)
        self.names = Names(kernel, self.headers, lambda eprocess: self.process_at(eprocess).label)
        self.warnings: list[WalkWarning] = []
        self.process_list = ProcessList(kernel)
        self.tables: dict[int, HandleTable] = {}      # per _HANDLE_TABLE address: one per process
        self._noted = False                      # process_list's notes are in self.warnings

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
        listed = self.process_list.all()
        if not self._noted:
            self._noted = True
            self.warnings.extend(self.process_list.notes)
        return listed

    def process_at(self, eprocess: int) -> Process:
        """The process of the _EPROCESS at `eprocess` with its full name (processes.ProcessList.at)."""
        return self.process_list.at(eprocess)

    def select(self, target: int | str | None) -> list[Process]:
        """The processes `target` names: None (all), a pid, an image name or a unique prefix."""
        self._processes()
        return self.process_list.select(target)

    def _one(self, target: int | str) -> Process:
        if isinstance(target, int) and not self._noted:
            found = self._by_cid(target)
            if found is not None:
                return found
        self._processes()
        return self.process_list.one(target)

    def _by_cid(self, pid: int) -> Process | None:
        """The process with id `pid` found as PsLookupProcessByProcessId finds it, through
        PspCidTable (a handful of reads instead of the whole process list); None when the table
        does not lead to a Process object of that id (the caller then reads the list)."""
        try:
            status, entry, _ = cid_table(self.kernel).lookup(pid)
            if status is not LookupStatus.VALID or entry is None:
                return None
            body = entry.header                    # a CID entry holds the object body
            header = body - self.headers.struct.body_offset()
            address, size = fixed_extent(self.kernel, body)
            self.kernel.space.prefetch([(header, address + size - header)])      # header and _EPROCESS: one read
            if self.headers.at_body(body).type != "Process" or read_process(self.kernel, body).pid != pid:
                return None
        except HandleError:
            return None
        return self.process_at(body)

    def _table(self, address: int) -> HandleTable:
        """The _HANDLE_TABLE at `address`, its header read once per stop."""
        table = self.tables.get(address)
        if table is None:
            table = self.tables[address] = HandleTable(self.kernel.space, self.kernel.layout, address)
        return table

    def processes(self) -> list[ProcessRecord]:
        return [self._process_record(p) for p in self._processes()]

    def _process_record(self, process: Process) -> ProcessRecord:
        code = bound = count = 0
        level, problems = None, []
        if process.table:
            try:
                table = self._table(process.table)
                code, level, bound = table.table_code, table.levels, table.next_handle_needing_pool
                count, problems = self._handle_count(process, table)
            except HandleError as exc:
                problems = [str(exc)]
            self.warnings.extend(WalkWarning(process.pid, process.name, p) for p in problems)
        return ProcessRecord(process.pid, process.name, process.eprocess, process.dtb, process.table, code,
                             level, bound, count, process.image_file_name, process.image_path, problems)

    def _handle_count(self, process: Process, table: HandleTable) -> tuple[int, list[str]]:
        """(count, damage met): Windows' own count (one read of the table header) when the
        table's pages look sound (HandleTable.page_problems: a few reads) and the layout has a
        plausible counter; else the table counted entry by entry (bounded like a walk, its damage
        said), so that the count is what a walk lists."""
        if not table.page_problems():
            count = self._kernel_count(process, table)
            if count is not None:
                return count, []
        count, found = table.census()
        return count, [p.message for p in found]

    def _kernel_count(self, process: Process, table: HandleTable) -> int | None:
        """_HANDLE_TABLE.HandleCount; None, with a note saying why, when it cannot be used."""
        try:
            count = table.kernel_count()
        except CorruptTable as exc:
            self.warnings.append(WalkWarning(process.pid, process.name, f"{exc}; counted the entries instead"))
            return None
        if count is None:
            note = WalkWarning(None, None, "this layout has no _HANDLE_TABLE HandleCount: handle counts "
                                           "are counted entry by entry")
            if note not in self.warnings:
                self.warnings.append(note)
        return count

    # --- walk ------------------------------------------------------------------------------

    def walk(self, target: int | str | None = None, type: str | None = None, name: str | None = None,
             progress: Progress | None = None, warn: Report | None = None,
             object: int | None = None) -> Iterator[HandleRecord]:
        """Every handle of one process (pid, image name or a unique prefix of it) or of all, in
        list and handle order. `object` (a body address) keeps only the entries pointing to it,
        before any decoding. Unreadable pages and bad entries become warnings (`warn` or
        `self.warnings`)."""
        chosen = self.select(target)
        if target is not None and len(chosen) == 1 and not chosen[0].table:
            raise NoHandleTable(_no_table(chosen[0]))
        for note in self.process_list.notes if warn else ():
            warn(note)
        walk = _Walk(warn or self.warnings.append, self._type_name(type).lower() if type else None,
                     name.lower() if name else None,
                     None if object is None else object - self.headers.struct.body_offset())
        total = 0
        for number, process in enumerate(chosen, 1):
            if progress:
                progress(f"process {number}/{len(chosen)}: {process.label}, {total} handles so far")
            for record in self._walk_process(process, walk):
                total += 1
                yield record
        self._untyped_share(walk.decoded, walk.untyped, walk.report)
        self._unnamed_share(walk)

    def _walk_process(self, process: Process, walk: _Walk) -> Iterator[HandleRecord]:
        if not process.table:
            return
        try:
            table = self._table(process.table)
        except HandleError as exc:
            walk.report(WalkWarning(process.pid, process.name, str(exc)))
            return
        pid, image, wanted, name_of = process.pid, process.name, walk.name, self._name
        for page in table.pages(used_only=True):
            survivors = self._survivors(process, page, walk)
            self.names.prefetch([header for _, header in survivors], objects=walk.type is not None)
            for entry, header in survivors:
                name, problems = name_of(process, entry.handle, header, walk)
                if wanted is None or wanted in (name or "").lower():
                    yield HandleRecord(pid, image, entry.handle, header.body, header.type, name,
                                       entry.granted_access, entry.attributes, problems)

    def _untyped_share(self, decoded: int, untyped: int, report) -> None:
        """One line when more than a small share of the walk's objects have no known type: then the
        header cookie, the type table or the layout does not fit this kernel, and no row is to be trusted."""
        if untyped < UNTYPED_MIN or untyped * UNTYPED_SHARE <= decoded:
            return
        failed = [c.name for c in self.kernel.checks if not c.passed]
        why = f"failed checks: {'; '.join(failed)}" if failed else "all discovery checks passed"
        report(WalkWarning(None, None, f"{untyped} of {decoded} handles decode to no known object type: the header "
                                      f"cookie or the structure layout does not fit this kernel ({why}); supply "
                                      "this kernel's volatility3 ISF as the profile (set handle profile FILE, "
                                      "CLI: --profile FILE)"))

    def _unnamed_share(self, walk: _Walk) -> None:
        """One line when more than a small share of the walk's names failed to decode (then the
        name structures' layout does not fit this kernel, or they are damaged, and names are not
        to be trusted), or when failures were left unlisted. Layout gaps have their own line."""
        failed = sum(walk.unnamed.values())
        if not walk.unlisted and (failed < UNNAMED_MIN or failed * UNNAMED_SHARE <= walk.named):
            return
        kinds = sorted(walk.unnamed.items(), key=lambda item: -item[1])
        where = ", ".join(f"{count} {kind} ({self.names.source_of(kind).value})" for kind, count in kinds[:4])
        if len(kinds) > 4:
            where += f" and {sum(count for _, count in kinds[4:])} of {len(kinds) - 4} other types"
        if walk.unlisted:
            where += f"; {walk.unlisted} failures beyond the first {UNNAMED_MIN} are not listed one by one"
        checks = [c.name for c in self.kernel.checks if not c.passed]
        why = f"failed checks: {'; '.join(checks)}" if checks else "all discovery checks passed"
        walk.report(WalkWarning(None, None, f"{failed} of {walk.named} object names could not be decoded: {where}; "
                                            f"the name layout ({self.kernel.layout.source}) does not fit this "
                                            f"kernel or those structures are damaged ({why}); supply this "
                                            "kernel's volatility3 ISF as the profile (set handle profile FILE, "
                                            "CLI: --profile FILE)"))

    def _survivors(self, process: Process, page: list, walk: _Walk) -> list[tuple[Entry, Header]]:
        """The page's entries (pages(used_only=True): each holds an object) whose object header is
        readable and of the wanted type."""
        used = [e for e in page if isinstance(e, Entry) and (walk.header is None or e.header == walk.header)]
        if walk.type is None:         # every object will be named: bring all that is read at once
            self.names.prefetch_objects([e.header for e in used])
        else:
            self.headers.prefetch([e.header for e in used], fine=True)
        for problem in (p for p in page if isinstance(p, Problem)):
            walk.report(WalkWarning(process.pid, process.name, problem.message, problem.handle))
        out, read, decoded, untyped = [], self.headers.read, 0, 0
        for entry in used:
            try:
                header = read(entry.header)
            except HandleError as exc:
                walk.report(WalkWarning(process.pid, process.name, f"object header {entry.header:#x}: {exc}",
                                        entry.handle))
                continue
            decoded, untyped = decoded + 1, untyped + (header.type is None)
            if walk.type is None or (header.type or "").lower() == walk.type:
                out.append((entry, header))
        walk.decoded, walk.untyped = walk.decoded + decoded, walk.untyped + untyped
        return out

    def _name(self, process: Process, handle: int, header: Header, walk: _Walk) -> tuple[str | None, list[str]]:
        """The object's name and the damage met decoding the object (each damaged structure
        said once per walk); a layout gap is said once and gives None."""
        problems = [header.problem] if header.problem else []
        for problem in problems:
            walk.damage(process, handle, problem, problem)
        if self.names.source(header) is NameSource.NONE:      # most objects: nothing to read
            return None, problems
        walk.named += 1
        try:
            return self.names.name(header), problems
        except ProfileError as exc:
            walk.once(f"{header.type} names unknown: {exc}")
            return None, problems + [_name_problem(header, exc)]
        except HandleError as exc:
            what = _name_problem(header, exc)
            walk.name_failure(process, handle, what, str(exc) if isinstance(exc, DamagedChain) else what)
            if not isinstance(exc, DamagedChain):     # a damaged shared chain is said once
                kind = header.type or "object"
                walk.unnamed[kind] = walk.unnamed.get(kind, 0) + 1
            return None, problems + [what]

    def type_names(self) -> list[str]:
        """The object type names of this kernel, in ObTypeIndexTable order (index 2 on; the table
        holds at most 256 entries and ends at the first NULL)."""
        names = []
        for index in range(2, 256):
            name = self.headers.type_of_index(index)
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

    # --- lookup ----------------------------------------------------------------------------

    def lookup(self, target: int | str, handle: int, vcpu: int = 0) -> LookupRecord:
        """One handle of a process. Pseudo-handles -1/-2 resolve for vCPU `vcpu` (an index
        into the registers, 0 = the selected one); kernel handles (bit 31, 32- or 64-bit
        spelling) resolve in System's table. BadHandle (with `.record`) unless valid."""
        handle &= MASK64
        process = self._one(target)
        if handle in (CURRENT_PROCESS, CURRENT_THREAD):
            return self._pseudo(process, handle, vcpu)
        process, value, note = self._owner(process, handle)
        if not process.table:
            raise NoHandleTable(_no_table(process))
        table = self._table(process.table)
        table.read_pages(TABLE_READS)
        status, entry, path = table.lookup(value)
        record = LookupRecord(process.pid, process.name, value & ~3, status, table=table.address,
                              levels=table.levels, path=path, entry=entry.address if entry else None,
                              note=note)
        if status is not LookupStatus.VALID:
            detail = STATUS_TEXT[status]
            if status is LookupStatus.PAST_END:
                detail += f" (NextHandleNeedingPool {table.next_handle_needing_pool:#x})"
            raise BadHandle(f"handle {value & ~3:#x} of {process.label} {detail}", record)
        self.names.prefetch_one(entry.header)
        try:
            header = self.headers.read(entry.header)
        except HandleError as exc:
            raise BadHandle(f"handle {value & ~3:#x} of {process.label}: object header {entry.header:#x} "
                            f"unreadable ({exc})", record)
        self._fill(record, header, entry.granted_access, entry.attributes)
        return record

    def _owner(self, process: Process, handle: int) -> tuple[Process, int, str | None]:
        """(process whose table holds `handle`, value in that table, note): kernel handles
        live in the kernel handle table, reported as System's."""
        if not (handle & KERNEL_HANDLE_BIT and handle >> 32 in (0, 0xFFFFFFFF)):
            return process, handle, None
        system = self.process_at(self.kernel.system_process)
        return (replace(system, table=self.kernel.kernel_table), handle & (KERNEL_HANDLE_BIT - 1),
                f"kernel handle {handle:#x}: entry {handle & (KERNEL_HANDLE_BIT - 1):#x} of the kernel handle table")

    def _fill(self, record: LookupRecord, header: Header, granted: int, attributes: int) -> None:
        record.object, record.header, record.type = header.body, header.header, header.type
        record.problems = [header.problem] if header.problem else []
        try:
            record.name = self.names.name(header)
        except HandleError as exc:
            record.problems.append(_name_problem(header, exc))
        record.granted_access, record.attributes = granted, attributes
        record.access_names = access.rights(header.type, granted)
        record.attribute_names = access.attribute_names(attributes)

    def _pseudo(self, process: Process, handle: int, vcpu: int) -> LookupRecord:
        """-1/-2 name the current process/thread of one vCPU, so the pid given must be that of
        the vCPU's current process (_KPCR.Prcb.CurrentThread -> _KTHREAD.ApcState.Process)."""
        pseudo = handle - (1 << 64)
        cpu, thread, current = self._current(vcpu, f"pseudo-handle {pseudo}")
        what = "current process" if handle == CURRENT_PROCESS else "current thread"
        if current.pid != process.pid:
            raise BadHandle(f"pseudo-handle {pseudo} is the {what} of {cpu}, in {current.label}, not in "
                            f"{process.label}: give pid {current.pid}, or select another vCPU")
        header = self.headers.at_body(thread if handle == CURRENT_THREAD else current.eprocess)
        record = LookupRecord(current.pid, current.name, handle, LookupStatus.VALID,
                              note=f"pseudo-handle {pseudo}: the {what} of {cpu}, in {current.label}")
        all_access = access.RIGHTS.get(header.type or "", ({}, {}))[1]
        self._fill(record, header, next(iter(all_access), 0), 0)
        return record

    def _current(self, vcpu: int, what: str) -> tuple[str, int, Process]:
        """(how to name the vCPU, its current _KTHREAD, the process that thread runs in)."""
        if vcpu >= len(self.registers):
            raise BadHandle(f"{what} needs the registers of vCPU {vcpu} (only a live guest has them)")
        registers = self.registers[vcpu]
        cpu = f"the selected vCPU (gdb thread {registers['thread']})" if "thread" in registers and vcpu == 0 \
            else f"vCPU {vcpu}"
        kpcr = vcpu_kpcr(registers)
        if kpcr is None:
            raise BadHandle(f"{what}: {cpu} has no kernel GS base (KPCR)")
        layout, space = self.kernel.layout, self.kernel.space
        thread = Kpcr.of(layout).current_thread(space, kpcr)
        return cpu, thread, self.process_at(KThread.of(layout).process(space, thread))

    # --- info ------------------------------------------------------------------------------

    def stats(self) -> ReadStats:
        """The memory reads so far (a copy)."""
        return ReadStats(**vars(self.kernel.phys.stats))

    def info(self) -> InfoRecord:
        """What discovery found; also runs the checks that read every process (once), after
        taking the read statistics."""
        kernel = self.kernel
        stats = self.stats()
        validate.run_deferred(kernel)
        notes = [f"{name} borrowed from profile {version}" for name, version in kernel.layout.borrowed.items()]
        return InfoRecord(
            build=kernel.build, layout=kernel.layout.version,
            version=".".join(map(str, kernel.image.file_version)) if kernel.image.file_version else None, guid=kernel.image.guid or "", age=kernel.image.age or 0,
            kernel_base=kernel.base, kernel_size=kernel.image.size_of_image, dtb=kernel.space.dtb,
            dtb_source=kernel.dtb_source, kernel_base_source=kernel.base_source, profile=kernel.layout.source,
            globals=dict(kernel.globals), sources=dict(kernel.sources),
            stats=stats, header_cookie=kernel.header_cookie,
            warnings=notes + [str(w) for w in self.warnings],
            checks=[(c.name, c.passed, c.detail) for c in kernel.checks],
            inferred=getattr(kernel.layout, "described", dict)())


def _name_problem(header: Header, exc: HandleError) -> str:
    return f"name of {header.type or 'object'} {header.body:#x} unknown: {exc}"


def _no_table(process: Process) -> str:
    return f"{process.label} has no handle table (ObjectTable is NULL: the process is exiting)"
