"""The _FILE_OBJECT layout checked on live File objects, when it is not this kernel's own.

An inferred layout, a shipped layout of the same build but another PDB GUID, or a user's ISF
gives _FILE_OBJECT from elsewhere. A wrong `FileName` offset would decode to a bare device path
or no name at all, and empty file names are common, so nothing else would show it. A sample of
File objects (typed through the header cookie, from the kernel's handle table, then the
processes') is checked: `Type` is IO_TYPE_FILE and `Size` the layout's size, `DeviceObject`'s
header decodes to "Device", `FileName` is a well-formed UNICODE_STRING (even Length within
MaximumLength, Buffer a kernel address), and a share of the names is non-empty and readable
(kernels always hold named files: hives, the paging file, DLLs). A sample object breaking an
invariant may be damage, so up to one in DAMAGED_SHARE may; more means the layout does not fit.
"""

from __future__ import annotations

from gdbhandles.errors import HandleError
from gdbhandles.windows.eprocess import linked
from gdbhandles.windows.file_object import FileObject
from gdbhandles.windows.handle_table import Entry, HandleTable
from gdbhandles.windows.kernel import Check, Kernel
from gdbhandles.windows.object_header import Headers
from gdbhandles.windows.unicode_string import MAX_NAME, UnicodeString

__all__ = ["CHECK_NAME", "failure", "check"]

CHECK_NAME = "_FILE_OBJECT: sampled File objects are IO_TYPE_FILE on a Device with well-formed names"
IO_TYPE_FILE = 5
SAMPLE = 16             # File objects checked
SCAN_PAGES = 2          # low-level handle-table pages searched per table
MAX_TABLES = 16         # tables searched: the kernel's, then the listed processes'
NAMED_SHARE = 4         # at least 1 in 4 sampled names non-empty and readable
DAMAGED_SHARE = 8       # more than 1 in 8 sampled objects breaking an invariant: the layout is wrong


def failure(kernel: Kernel, headers: Headers) -> str | None:
    """Why File names cannot be trusted (the check failed), or None; checks once per kernel."""
    found = check(kernel, headers)
    if found is None or found.passed:
        return None
    return (f"_FILE_OBJECT of the layout ({kernel.layout.source}) does not fit this kernel: {found.detail}; "
            "supply this kernel's volatility3 ISF as the profile (set handle profile FILE, CLI: --profile FILE)")


def check(kernel: Kernel, headers: Headers) -> Check | None:
    """The check (added to `kernel.checks` the first time), None when the layout is this kernel's own."""
    if kernel.layout_own:
        return None
    if kernel.file_check is None:
        try:
            kernel.file_check = _check(kernel, headers)
        except HandleError as exc:
            kernel.file_check = Check(CHECK_NAME, False, f"unreadable: {exc}")
        kernel.checks.append(kernel.file_check)
    return kernel.file_check


def _check(kernel: Kernel, headers: Headers) -> Check:
    files = sample(kernel, headers)
    if not files:
        return Check(CHECK_NAME, False, "no File object found in the handle tables searched")
    broken, named = [], 0
    for body in files:
        wrong, has_name = _violations(kernel, headers, body)
        named += has_name
        if wrong:
            broken.append(f"{body:#x}: {wrong}")
    offset = FileObject.of(kernel.layout).offset("FileName")
    detail = f"{len(files)} File objects (the first at {files[0]:#x}), {named} with a name at FileName (+{offset:#x})"
    short = named * NAMED_SHARE < len(files)
    if short:
        detail += f" (fewer than 1 in {NAMED_SHARE}: FileName is not where the layout says)"
    if broken:
        detail += f"; {len(broken)} break an invariant, first {broken[0]}"
    return Check(CHECK_NAME, not short and len(broken) * DAMAGED_SHARE < len(files), detail)


def sample(kernel: Kernel, headers: Headers) -> list[int]:
    """Bodies of up to SAMPLE File objects from the first pages of the kernel's handle table,
    then of the listed processes' tables."""
    out: list[int] = []
    for table in _tables(kernel):
        try:
            pages = HandleTable(kernel.space, kernel.layout, table).pages(used_only=True)
            for _, page in zip(range(SCAN_PAGES), pages):
                out += _files(headers, page, SAMPLE - len(out))
                if len(out) >= SAMPLE:
                    return out
        except HandleError:
            continue
    return out


def _files(headers: Headers, page: list, wanted: int) -> list[int]:
    out = []
    for entry in page:
        if len(out) >= wanted:
            break
        if isinstance(entry, Entry):
            try:
                header = headers.read(entry.header)
            except HandleError:
                continue
            if header.type == "File" and header.body not in out:
                out.append(header.body)
    return out


def _tables(kernel: Kernel):
    """The kernel handle table, then up to MAX_TABLES - 1 processes' ObjectTables."""
    yield kernel.kernel_table
    table = kernel.layout.field("_EPROCESS", "ObjectTable")
    for eprocess in linked(kernel, MAX_TABLES - 1):
        try:
            found = table.read(kernel.space.read, eprocess)
        except HandleError:
            continue
        if found and found != kernel.kernel_table:
            yield found


def _violations(kernel: Kernel, headers: Headers, body: int) -> tuple[str, bool]:
    """(the invariants the File object at `body` breaks, '' if none; whether its name is
    non-empty and readable)."""
    files = FileObject.of(kernel.layout)
    size = files.size() or 0
    raw = kernel.space.read(body, size)
    wrong = []
    kind, stored = files.field("Type").extract(raw), files.field("Size").extract(raw)
    if kind != IO_TYPE_FILE or stored != size:
        wrong.append(f"Type {kind}, Size {stored:#x} (IO_TYPE_FILE is {IO_TYPE_FILE}, the layout's size {size:#x})")
    device = files.field("DeviceObject").extract(raw)
    try:
        device_type = headers.at_body(device).type if device >> 47 == 0x1FFFF else "no kernel address"
    except HandleError:
        device_type = "unreadable"
    if device_type != "Device":
        wrong.append(f"DeviceObject {device:#x} is no Device ({device_type})")
    name_wrong, named = _file_name(kernel, body + files.offset("FileName"))
    return "; ".join(wrong + name_wrong), named


def _file_name(kernel: Kernel, address: int) -> tuple[list[str], bool]:
    """(what is wrong with the UNICODE_STRING at `address`, whether it is non-empty and readable)."""
    strings = UnicodeString.of(kernel.layout)
    raw = kernel.space.read(address, strings.size() or 16)
    length, buffer = strings.field("Length").extract(raw), strings.field("Buffer").extract(raw)
    maximum = strings.field("MaximumLength").extract(raw)
    if length & 1 or length > maximum:
        return [f"FileName Length {length:#x}, MaximumLength {maximum:#x} (an even Length within it)"], False
    if not length:
        return [], False
    if buffer >> 47 != 0x1FFFF:
        return [f"FileName Buffer {buffer:#x} is no kernel address"], False
    try:
        kernel.space.read(buffer, min(length, MAX_NAME))
    except HandleError:
        return [], False            # a name's buffer may be paged out: only the share counts it
    return [], True
