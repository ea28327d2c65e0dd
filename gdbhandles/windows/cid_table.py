"""PspCidTable: the kernel's table of process and thread objects by id (PsLookupProcessByProcessId).

It has the _HANDLE_TABLE format of a process's table, but an entry holds the object's BODY
(the _EPROCESS or _ETHREAD itself; no object header in front of the pointer) and no access
bits. Process and thread ids share the one table: id = handle value.
"""

from __future__ import annotations

from dataclasses import dataclass

from gdbhandles.errors import MissingGlobal
from gdbhandles.windows.eprocess import read_process
from gdbhandles.windows.handle_table import EntryFormat, HandleTable
from gdbhandles.windows.kernel import Kernel

__all__ = ["cid_table", "Identity", "identity"]


def cid_table(kernel: Kernel, entry_format: EntryFormat) -> HandleTable:
    """The _HANDLE_TABLE that the global PspCidTable points to."""
    pointer = kernel.globals.get("PspCidTable")
    if not pointer:
        raise MissingGlobal("PspCidTable was not found (`handle info` says how globals were looked for)")
    return HandleTable(kernel, kernel.space.u64(pointer), entry_format)


@dataclass
class Identity:
    """Who an _EPROCESS or _ETHREAD body is: its process (and thread) id and image name."""
    pid: int
    tid: int | None
    process: str
    eprocess: int


def identity(kernel: Kernel, body: int, type_name: str | None) -> Identity | None:
    """Process: its own id and name. Thread: _ETHREAD.Cid and the owning process
    (_KTHREAD.Process). None for any other type."""
    layout, space = kernel.layout, kernel.space
    if type_name == "Process":
        process = read_process(kernel, body)
        return Identity(process.pid, None, process.name, body)
    if type_name == "Thread":
        cid = body + layout.offset("_ETHREAD", "Cid")
        tid = space.u64(cid + layout.offset("_CLIENT_ID", "UniqueThread"))
        owner = space.u64(body + layout.offset("_KTHREAD", "Process"))
        process = read_process(kernel, owner)
        return Identity(process.pid, tid, process.name, owner)
    return None
