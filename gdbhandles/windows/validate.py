"""Invariants of live data checked before discovery's facts are used; `handle info` lists them.

Each check can fail: a wrong layout, global or cookie shows here first, instead of as
plausible-looking garbage in a walk. Discovery runs the cheap ones (a few reads); those that
read every process or every type (hundreds of reads on a busy guest, more than a lookup
itself) run when `handle info` first asks (`run_deferred`).
"""

from __future__ import annotations

from gdbhandles.errors import HandleError
from gdbhandles.windows import file_check, object_types
from gdbhandles.windows.eprocess import EProcess
from gdbhandles.windows.kernel import Check, Kernel
from gdbhandles.windows.memory import PFN_MASK
from gdbhandles.windows.object_header import Headers

MAX_PROCESSES = 1 << 16
MAX_HANDLE_BOUND = 1 << 26
SYSTEM_PID = 4


def run(kernel: Kernel) -> None:
    _run(kernel, (_system, _cookie, _kernel_table))


def run_deferred(kernel: Kernel) -> None:
    """The whole-list checks, once per kernel."""
    if not kernel.deferred_checks_done:
        kernel.deferred_checks_done = True
        _run(kernel, (_process_list, _types, _page_tables))
        file_check.check(kernel, Headers(kernel))     # adds itself, once, unless the layout is the kernel's own


def _run(kernel: Kernel, checks) -> None:
    for check in checks:
        try:
            kernel.checks.append(check(kernel))
        except HandleError as exc:
            kernel.checks.append(Check(check.__doc__.split(":")[0], False, f"unreadable: {exc}"))


def _system(kernel: Kernel) -> Check:
    """System's EPROCESS: pid 4, ImageFileName "System" """
    layout, system = kernel.layout, kernel.system_process
    pid = layout.field("_EPROCESS", "UniqueProcessId").read(kernel.space.read, system)
    name = EProcess.of(layout).read_image_file_name(kernel.space, system)
    return Check("System's EPROCESS: pid 4, ImageFileName \"System\"", pid == SYSTEM_PID and name == "System",
                 f"pid {pid}, name {name!r} at {system:#x}")


def _process_list(kernel: Kernel) -> Check:
    """process list: circular, every Blink->Flink returns"""
    head, space = kernel.globals["PsActiveProcessHead"], kernel.space
    entry, count, good = space.u64(head), 0, True
    previous = head
    while entry != head and count < MAX_PROCESSES:
        good = good and space.u64(entry + 8) == previous
        previous, entry, count = entry, space.u64(entry), count + 1
    good = good and entry == head and space.u64(head + 8) == previous
    return Check("process list circular, every Blink->Flink returns", good, f"{count} processes")


def _types(kernel: Kernel) -> Check:
    """type table: _OBJECT_TYPEs whose Index is their slot and whose headers decode to "Type" """
    table = kernel.globals["ObTypeIndexTable"]
    types = object_types.read_table(kernel, table)
    bodies = object_types.type_objects(kernel, table)
    wrong = [hex(b) for b in bodies
             if object_types.decoded_type(kernel, types, b, kernel.header_cookie) != "Type"]
    return Check("type table: _OBJECT_TYPEs with matching Index, headers decode to \"Type\"",
                 bool(types) and not wrong, f"{len(types)} types" + (f"; not Type: {', '.join(wrong[:3])}"
                                                                     if wrong else ""))


def _cookie(kernel: Kernel) -> Check:
    """header cookie: System's header decodes to "Process" """
    body, cookie = kernel.system_process, kernel.header_cookie
    stored = object_types.stored_index(kernel, body)
    index = stored if cookie is None else stored ^ cookie ^ object_types.address_byte(kernel, body)
    found = object_types.type_name_at(kernel, kernel.globals["ObTypeIndexTable"], index)
    cookie = "none" if kernel.header_cookie is None else f"{kernel.header_cookie:#04x}"
    return Check("header cookie: System's header decodes to \"Process\"", found == "Process",
                 f"cookie {cookie}: {found}")


def _kernel_table(kernel: Kernel) -> Check:
    """kernel handle table: level bits and NextHandleNeedingPool in range"""
    layout, table = kernel.layout, kernel.kernel_table
    code = layout.field("_HANDLE_TABLE", "TableCode").read(kernel.space.read, table)
    bound = layout.field("_HANDLE_TABLE", "NextHandleNeedingPool").read(kernel.space.read, table)
    good = code & 3 < 3 and code >> 47 == 0x1FFFF and 0 < bound <= MAX_HANDLE_BOUND and bound % 4 == 0
    return Check("kernel handle table: level bits and NextHandleNeedingPool in range", good,
                 f"TableCode {code:#x}, NextHandleNeedingPool {bound:#x}")


def _page_tables(kernel: Kernel) -> Check:
    """process page tables: each DirectoryTableBase maps the kernel image as the kernel's does"""
    links = kernel.layout.offset("_EPROCESS", "ActiveProcessLinks")
    dtb_field = kernel.layout.field("_EPROCESS", "Pcb.DirectoryTableBase")
    slot = 8 * ((kernel.base >> 39) & 511)
    want = kernel.phys.read(kernel.space.dtb + slot, 8)
    head, space, count, wrong = kernel.globals["PsActiveProcessHead"], kernel.space, 0, []
    entry = space.u64(head)
    while entry != head and count < MAX_PROCESSES:
        dtb = dtb_field.read(space.read, entry - links) & PFN_MASK
        if kernel.phys.read(dtb + slot, 8) != want:
            wrong.append(hex(entry - links))
        entry, count = space.u64(entry), count + 1
    return Check("process page tables: each DirectoryTableBase maps the kernel", not wrong,
                 f"{count} processes" + (f"; wrong: {', '.join(wrong[:3])}" if wrong else ""))
