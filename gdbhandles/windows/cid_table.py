"""PspCidTable: the kernel's table of process and thread objects by id (PsLookupProcessByProcessId).

It has the _HANDLE_TABLE format of a process's table, but an entry holds the object's BODY
(the _EPROCESS or _ETHREAD itself; no object header in front of the pointer) and no access
bits. Process and thread ids share the one table: id = handle value.
"""

from __future__ import annotations

from dataclasses import dataclass

from gdbhandles.errors import MissingGlobal
from gdbhandles.windows.eprocess import read_process
from gdbhandles.windows.ethread import EThread
from gdbhandles.windows.handle_table import HandleTable
from gdbhandles.windows.kernel import Kernel
from gdbhandles.windows.kpcr import KThread

__all__ = ["cid_table", "Identity", "identity"]


def cid_table(kernel: Kernel) -> HandleTable:
    """The _HANDLE_TABLE that the global PspCidTable points to."""
    pointer = kernel.globals.get("PspCidTable")
    if not pointer:
        raise MissingGlobal("PspCidTable was not found (`handle info` says how globals were looked for)")
    return HandleTable(kernel.space, kernel.layout, kernel.space.u64(pointer))


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
        tid = EThread.of(layout).thread_id(space, body)
        owner = KThread.of(layout).owner(space, body)
        process = read_process(kernel, owner)
        return Identity(process.pid, tid, process.name, owner)
    return None
