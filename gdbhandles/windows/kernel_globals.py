"""Unexported kernel globals: from symbols when we have them, else from the code that uses them,
every code candidate checked on live data before it is kept.

Disassembly yields candidates (disasm.py); a candidate is kept only when the memory it names
behaves as the global must: PspCidTable finds System's EPROCESS under pid 4, ObTypeIndexTable
holds _OBJECT_TYPEs whose Index is their slot, the cookie makes System's header a Process,
ObpInfoMaskToOffset is additive over the InfoMask bits, ObpKernelHandleTable holds System's
ObjectTable. A global that cannot be located is named with what it costs, never guessed.
"""

from __future__ import annotations

from gdbhandles.errors import HandleError, MissingGlobal
from gdbhandles.windows import disasm, layouts
from gdbhandles.windows.handle_table import HandleTable
from gdbhandles.windows.kernel import Kernel, name_known
from gdbhandles.windows import object_types

GLOBALS = ("PsActiveProcessHead", "PspCidTable", "ObTypeIndexTable", "ObHeaderCookie",
           "ObpInfoMaskToOffset", "ObpKernelHandleTable", "PsInitialSystemProcess")
SYSTEM_PID = 4


def resolve(kernel: Kernel, symbols: layouts.Layout | None) -> None:
    """Fill kernel.globals/sources, the cookie value, the kernel handle table and the info-mask table."""
    if symbols is not None:
        _from_symbols(kernel, symbols)
    found = kernel.globals
    if "PsInitialSystemProcess" not in found:
        _set(kernel, "PsInitialSystemProcess", export(kernel, "PsInitialSystemProcess"), "export")
    kernel.system_process = kernel.space.u64(found["PsInitialSystemProcess"])
    if "PsActiveProcessHead" not in found:
        links = kernel.layout.offset("_EPROCESS", "ActiveProcessLinks")
        _set(kernel, "PsActiveProcessHead", kernel.space.u64(kernel.system_process + links + 8),
             "System's ActiveProcessLinks.Blink (PsInitialSystemProcess)")
    _kernel_table(kernel)
    if "PspCidTable" not in found:
        _cid_table(kernel)
    if "ObTypeIndexTable" not in found:
        _type_table(kernel)
    _cookie(kernel)
    if "ObpInfoMaskToOffset" not in found:
        _info_mask(kernel)
    kernel.info_mask_to_offset = object_types.info_mask_table(kernel)


def _from_symbols(kernel: Kernel, symbols: layouts.Layout) -> None:
    how = "shipped RVA for this PDB GUID" if isinstance(symbols, layouts.ProfileLayout) \
        else f"symbols of {symbols.source}"
    for name in GLOBALS:
        rva = symbols.symbols.get(name)
        if rva is not None:
            _set(kernel, name, kernel.base + rva, how)
    if "ObHeaderCookie" not in kernel.globals and name_known(symbols, "ObHeaderCookie"):
        _set(kernel, "ObHeaderCookie", None, "none in this build (its symbols list it as absent)")


def _set(kernel: Kernel, name: str, address: int | None, how: str) -> None:
    kernel.globals[name], kernel.sources[name] = address, how


def export(kernel: Kernel, name: str) -> int:
    rva = kernel.image.exports.get(name)
    if rva is None:
        raise MissingGlobal(f"the kernel does not export {name}")
    return kernel.base + rva


def _code(kernel: Kernel, function: str) -> list[disasm.Trace]:
    rva = kernel.image.exports.get(function)
    return disasm.traces(kernel.space.read, kernel.base + rva) if rva is not None else []


def _u64(kernel: Kernel, va: int) -> int | None:
    try:
        return kernel.space.u64(va)
    except HandleError:
        return None


def _first(kernel: Kernel, name: str, function: str, candidates, check) -> bool:
    """Keep the first candidate (address, instruction) that passes `check(address)`."""
    for address, at in candidates:
        try:
            good = check(address)
        except HandleError:
            good = False
        if good:
            _set(kernel, name, address, f"disassembly of {function} (instruction at {at:#x}), checked on live data")
            return True
    return False


def _kernel_table(kernel: Kernel) -> None:
    """ObpKernelHandleTable: a qword the ObReferenceObjectByHandle code loads that equals System's
    ObjectTable; without it, System's ObjectTable is the kernel table (the global unnamed)."""
    system_table = kernel.space.u64(kernel.system_process + kernel.layout.offset("_EPROCESS", "ObjectTable"))
    if "ObpKernelHandleTable" in kernel.globals:
        kernel.kernel_table = kernel.space.u64(kernel.globals["ObpKernelHandleTable"])
        return
    kernel.kernel_table = system_table
    for function in ("ObReferenceObjectByHandle", "ObReferenceObjectByHandleWithTag"):
        loads = disasm.constant_loads(_code(kernel, function), 8)
        if _first(kernel, "ObpKernelHandleTable", function, loads,
                  lambda address: _u64(kernel, address) == system_table):
            return
    _set(kernel, "ObpKernelHandleTable", None, "not located; System's ObjectTable serves as the kernel "
                                               "handle table (kernel handles still resolve)")


def _cid_table(kernel: Kernel) -> None:
    def finds_system(address: int) -> bool:
        table = HandleTable(kernel.space, kernel.layout, kernel.space.u64(address))
        status, entry, _ = table.lookup(SYSTEM_PID)
        return status == "valid" and entry.header == kernel.system_process

    loads = disasm.constant_loads(_code(kernel, "PsLookupProcessByProcessId"), 8)
    if not _first(kernel, "PspCidTable", "PsLookupProcessByProcessId", loads, finds_system):
        _set(kernel, "PspCidTable", None, "not located (no qword PsLookupProcessByProcessId loads finds System "
                                          "under pid 4): no id lookups (handle cid), thread offsets not checked")


def _type_table(kernel: Kernel) -> None:
    tables = disasm.indexed_tables(_code(kernel, "ObGetObjectType"), 8)
    if not _first(kernel, "ObTypeIndexTable", "ObGetObjectType", tables,
                  lambda address: len(object_types.read_table(kernel, address)) >= object_types.MIN_TYPES):
        raise MissingGlobal(f"cannot locate ObTypeIndexTable for build {kernel.build}: no object types")


def _cookie(kernel: Kernel) -> None:
    """The cookie from code when its byte makes System's header decode to Process; else the one
    value (of 256, or none) that does, found by trying them all."""
    known = kernel.globals.get("ObHeaderCookie", -1)
    if known is None:                              # the symbols say this build has none
        return
    if known != -1:
        kernel.header_cookie = kernel.space.u8(known)
        return
    types = object_types.read_table(kernel, kernel.globals["ObTypeIndexTable"])
    for address, at in disasm.constant_loads(_code(kernel, "ObGetObjectType"), 1):
        value = kernel.space.u8(address)
        if object_types.decoded_type(kernel, types, kernel.system_process, value) == "Process":
            kernel.header_cookie = value
            _set(kernel, "ObHeaderCookie", address, f"disassembly of ObGetObjectType (instruction at "
                                                    f"{at:#x}), checked: System's header decodes to Process")
            return
    kernel.header_cookie = object_types.cookie_by_trial(kernel, types)
    how = ("absent: System's header decodes to Process without a cookie" if kernel.header_cookie is None
           else f"value {kernel.header_cookie:#04x} found by trying all 256 (the only one under which System's "
                "header is a Process); the variable itself not located")
    _set(kernel, "ObHeaderCookie", None, how)


def _info_mask(kernel: Kernel) -> None:
    tables = disasm.indexed_tables(_code(kernel, "ObQueryNameString"), 1)
    if not _first(kernel, "ObpInfoMaskToOffset", "ObQueryNameString", tables,
                  lambda address: object_types.additive(kernel.space.read(address, 256))):
        _set(kernel, "ObpInfoMaskToOffset", None, "computed from the layout's optional header sizes")
