"""The EPROCESS list: PsActiveProcessHead through _EPROCESS.ActiveProcessLinks, System first."""

from __future__ import annotations

from dataclasses import dataclass

from gdbhandles.errors import CorruptTable
from gdbhandles.windows.kernel import Kernel

MAX_PROCESSES = 1 << 16
FIELDS = ("UniqueProcessId", "ActiveProcessLinks", "ObjectTable", "ImageFileName", "Pcb.DirectoryTableBase")


@dataclass
class Process:
    pid: int
    name: str
    eprocess: int
    dtb: int
    table: int               # _EPROCESS.ObjectTable (0 while the process exits)


def read_process(kernel: Kernel, eprocess: int) -> Process:
    """The fields we use, read as one span of the EPROCESS."""
    fields = {name: kernel.layout.field("_EPROCESS", name) for name in FIELDS}
    start = min(f.offset for f in fields.values())
    end = max(f.offset + f.size for f in fields.values())
    raw = kernel.space.read(eprocess + start, end - start)
    name_field = fields["ImageFileName"]
    name_at = name_field.offset - start
    name = raw[name_at:name_at + 15].split(b"\0", 1)[0].decode("latin-1")
    return Process(fields["UniqueProcessId"].extract(raw, -start), name, eprocess,
                   fields["Pcb.DirectoryTableBase"].extract(raw, -start),
                   fields["ObjectTable"].extract(raw, -start))


def active_processes(kernel: Kernel) -> list[Process]:
    """Every process on the active list, in list order."""
    head = kernel.globals["PsActiveProcessHead"]
    links = kernel.layout.offset("_EPROCESS", "ActiveProcessLinks")
    result, seen = [], {head}
    entry = kernel.space.u64(head)
    while entry != head:
        if entry in seen or len(result) >= MAX_PROCESSES:
            raise CorruptTable(f"the process list loops at {entry:#x} (PsActiveProcessHead {head:#x})")
        if not entry:
            raise CorruptTable(f"the process list has a NULL link after {len(result)} processes")
        seen.add(entry)
        result.append(read_process(kernel, entry - links))
        entry = kernel.space.u64(entry)
    return result
