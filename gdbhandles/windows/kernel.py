"""Kernel discovery from the guest alone: DTB, kernel base, build, PDB GUID, layout, globals.

Each fact records how it was found (`Kernel.sources`), because a wrong guess is the usual
failure of tools like this one, and `handle info` should show where to look.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from gdbhandles.windows import disasm, layouts, pe
from gdbhandles.errors import HandleError, MissingGlobal, NotWindows, ProfileError, UnknownBuild
from gdbhandles.windows.memory import PAGE, PFN_MASK, AddressSpace, PhysicalMemory

KERNEL_PDBS = {"ntkrnlmp.pdb", "ntoskrnl.pdb", "ntkrnlpa.pdb", "ntkrpamp.pdb"}
KUSER_SHARED_DATA = 0xFFFFF78000000000
KUSER_BUILD_NUMBER = 0x260            # Win10+; NtMajorVersion 0x26c, NtMinorVersion 0x270
# Before the layout is known: members at the same place in every x64 build.
KPCR_SELF, KPCR_IDT_BASE = 0x18, 0x38
LOW_STUB_MASK, LOW_STUB_SIGNATURE = 0xFFFFFFFFFFFF00FF, 0x00000001000600E9
LOW_STUB_ENTRY, LOW_STUB_CR3 = 0x70, 0xA0
LOW_STUB_RANGE = range(0x1000, 0x100000, PAGE)
SCAN_DOWN = 32 << 20                  # how far below a code address the image base may be
LARGE = 2 << 20
KERNEL_REGION = (0xFFFFF80000000000, 0xFFFFF88000000000)   # where every x64 build loads ntoskrnl
IDT_VECTORS = 4
GLOBALS = ("PsActiveProcessHead", "PspCidTable", "ObTypeIndexTable", "ObHeaderCookie",
           "ObpInfoMaskToOffset", "ObpKernelHandleTable", "PsInitialSystemProcess")
# Optional object headers in InfoMask bit order (0x01 … 0x40): ObpInfoMaskToOffset's basis.
OPTIONAL_HEADERS = (("_OBJECT_HEADER_CREATOR_INFO",), ("_OBJECT_HEADER_NAME_INFO",),
                    ("_OBJECT_HEADER_HANDLE_INFO",), ("_OBJECT_HEADER_QUOTA_INFO",),
                    ("_OBJECT_HEADER_PROCESS_INFO",),
                    ("_OBJECT_HEADER_EXTENDED_INFO", "_OBJECT_HEADER_AUDIT_INFO"),
                    ("_OBJECT_HEADER_PADDING_INFO",))


@dataclass
class Kernel:
    phys: PhysicalMemory
    space: AddressSpace
    dtb_source: str
    base: int
    base_source: str
    image: pe.PeImage
    build: int
    layout: layouts.Layout
    globals: dict[str, int | None] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    header_cookie: int | None = None
    info_mask_to_offset: bytes = b""
    system_process: int = 0
    kernel_table: int = 0

    def va_reader(self):
        return self.space.read


def _vcpu_cpl(registers: dict) -> int:
    return registers.get("cs", 0) & 3


def _kpcr(registers: dict) -> int | None:
    kpcr = registers.get("gs_base" if _vcpu_cpl(registers) == 0 else "k_gs_base")
    return kpcr if kpcr and kpcr >> 47 == 0x1FFFF else None


def vcpu_kpcr(registers: dict) -> int | None:
    """The KPCR of a vCPU: GS base in kernel mode, the swapped-out KERNEL_GS_BASE in user mode."""
    return _kpcr(registers)


def low_stub(phys: PhysicalMemory) -> tuple[int, int, int] | None:
    """(page, kernel CR3, kernel entry) of the low-memory processor start block, if any."""
    for page in LOW_STUB_RANGE:
        try:
            head = phys.read(page, 8)
            if struct.unpack("<Q", head)[0] & LOW_STUB_MASK != LOW_STUB_SIGNATURE:
                continue
            block = phys.read(page, LOW_STUB_CR3 + 8)
        except HandleError:
            continue
        entry, = struct.unpack_from("<Q", block, LOW_STUB_ENTRY)
        cr3, = struct.unpack_from("<Q", block, LOW_STUB_CR3)
        if cr3 & PFN_MASK and entry >> 47 == 0x1FFFF:
            return page, cr3 & PFN_MASK, entry
    return None


def self_referencing_pml4s(phys: PhysicalMemory):
    """Physical pages with a kernel-half entry pointing back at the page itself, one per
    distinct kernel half (every process's PML4 shares the kernel's)."""
    size = getattr(phys.backend, "size", None)
    if not size:
        return
    chunk, seen = 1 << 20, set()
    for start in range(0, size - size % PAGE, chunk):
        try:
            data = phys.scan(start, min(chunk, size - start))
        except HandleError:
            continue
        for offset in range(0, len(data), PAGE):
            page = start + offset
            entries = struct.unpack_from("<256Q", data, offset + 0x800)
            if sum(1 for e in entries if e & 1) < 2:
                continue
            selves = [i for i, e in enumerate(entries) if e & PFN_MASK == page and e & 3 == 3]
            if selves:
                half = tuple(e for i, e in enumerate(entries) if i not in selves)
                if half not in seen:
                    seen.add(half)
                    yield page


def _kernel_at(space: AddressSpace, base: int) -> pe.PeImage | None:
    read = lambda rva, size: space.read(base + rva, size)  # noqa: E731
    if not pe.looks_like_pe(read):
        return None
    try:
        image = pe.parse(read)
    except HandleError:
        return None
    named = (image.pdb_name or "").lower() in KERNEL_PDBS or (image.export_name or "").lower() == "ntoskrnl.exe"
    return image if named else None


def _scan_down(space: AddressSpace, start: int) -> tuple[int, pe.PeImage] | None:
    """The kernel image containing `start`: 2 MiB-aligned bases first, then every page."""
    top = start & ~(PAGE - 1)
    large = [a for a in range(top & ~(LARGE - 1), top - SCAN_DOWN, -LARGE)]
    pages = range(top, top - SCAN_DOWN, -PAGE)
    for candidates in (large, pages):
        for base in candidates:
            image = _kernel_with_mz(space, base)
            if image is not None and base <= start < base + image.size_of_image:
                return base, image
    return None


def _kernel_with_mz(space: AddressSpace, base: int) -> pe.PeImage | None:
    """_kernel_at, after the cheap check for an MZ at `base`."""
    try:
        if space.read(base, 2) != b"MZ":
            return None
    except HandleError:
        return None
    return _kernel_at(space, base)


def _hints(space: AddressSpace, registers: list[dict], stub) -> list[tuple[int, str]]:
    """Code addresses inside the kernel, with what each came from."""
    hints = []
    for index, regs in enumerate(registers):
        rip = regs.get("rip", 0)
        if _vcpu_cpl(regs) == 0 and rip >> 47 == 0x1FFFF:
            hints.append((rip, f"RIP of vCPU {index}"))
        kpcr = _kpcr(regs)
        if kpcr is None:
            continue
        try:
            if space.u64(kpcr + KPCR_SELF) != kpcr:
                continue
            idt = space.read(space.u64(kpcr + KPCR_IDT_BASE), 16 * IDT_VECTORS)
        except HandleError:
            continue
        for vector in range(IDT_VECTORS):
            low, middle, high = struct.unpack_from("<H4xHI", idt, 16 * vector)
            handler = low | middle << 16 | high << 32
            if handler >> 47 == 0x1FFFF:
                hints.append((handler, f"IDT handler {vector} (KPCR of vCPU {index})"))
                break
    if stub is not None:
        hints.append((stub[2], f"kernel entry in the low-memory start block at {stub[0]:#x}"))
    return hints


def _find_base(space: AddressSpace, registers, stub, kernel_base) -> tuple[int, pe.PeImage, str] | None:
    if kernel_base is not None:
        image = _kernel_at(space, kernel_base)
        return (kernel_base, image, "given by the user") if image else None
    for hint, source in _hints(space, registers, stub):
        found = _scan_down(space, hint)
        if found:
            return found[0], found[1], f"MZ below the {source}"
    for va, size in space.mapped_pages(*KERNEL_REGION):
        for base in range(va, va + size, PAGE):
            image = _kernel_with_mz(space, base)
            if image is not None:
                return base, image, "scan of the kernel region for an MZ with ntkrnlmp.pdb"
    return None


def _dtb_candidates(phys: PhysicalMemory, registers: list[dict], dtb: int | None):
    if dtb is not None:
        yield dtb & PFN_MASK, "given by the user", None
        return
    seen = set()
    for index, regs in enumerate(registers):
        cr3 = regs.get("cr3", 0) & PFN_MASK
        if cr3 and cr3 not in seen:
            seen.add(cr3)
            yield cr3, f"CR3 of vCPU {index}", None
    stub = low_stub(phys)
    if stub is not None:
        yield stub[1], f"low-memory processor start block at {stub[0]:#x}", stub
    if stub is not None:
        seen.add(stub[1])
    for page in self_referencing_pml4s(phys):
        if page not in seen:
            yield page, "self-referencing PML4 scan", None


def locate(phys: PhysicalMemory, registers: list[dict], dtb: int | None, kernel_base: int | None):
    """(space, dtb source, base, image, base source) of the running kernel."""
    tried = []
    for candidate, source, stub in _dtb_candidates(phys, registers, dtb):
        space = AddressSpace(phys, candidate)
        found = _find_base(space, registers, stub, kernel_base)
        if found is not None:
            base, image, base_source = found
            return space, source, base, image, base_source
        tried.append(f"{candidate:#x} ({source})")
    what = "the given kernel base" if kernel_base is not None else "an ntoskrnl image"
    shown = ", ".join(tried[:4]) + (f" and {len(tried) - 4} more" if len(tried) > 4 else "")
    detail = f"; tried DTBs {shown}" if tried else ": no CR3, start block or PML4 found"
    raise NotWindows(f"not a Windows x64 guest: no DTB maps {what}{detail}")


def _build_number(space: AddressSpace, base: int, image: pe.PeImage) -> int:
    rva = image.exports.get("NtBuildNumber")
    try:
        if rva is not None:
            return space.u32(base + rva) & 0xFFFF
        return space.u32(KUSER_SHARED_DATA + KUSER_BUILD_NUMBER) & 0xFFFF
    except HandleError:
        raise NotWindows("the kernel's build number is unreadable (NtBuildNumber, KUSER_SHARED_DATA)") from None


def choose_layout(image: pe.PeImage, build: int, isf: str | None) -> tuple[layouts.Layout, layouts.Layout | None]:
    """(layout for structures, layout whose symbols belong to this exact kernel or None)."""
    data = layouts.read_isf(isf) if isf else None     # a file that is no ISF fails here, always
    made_for = layouts.isf_pdb(data) if data is not None else None
    if made_for is not None and image.guid is not None and made_for != (image.guid, image.age):
        raise ProfileError(f"{isf} is the ISF of ntkrnlmp.pdb {made_for[0]}/{made_for[1]}, not of this "
                           f"kernel ({image.guid}/{image.age})")
    exact = layouts.for_guid(image.guid, image.age) if image.guid else None
    if exact is not None:
        return exact, exact
    isf_layout = None
    if data is not None:
        matches = image.guid is not None and made_for == (image.guid, image.age)
        isf_layout = layouts.IsfLayout(data, isf, build, with_symbols=matches)
        if matches:
            return isf_layout, isf_layout
    same_build = layouts.for_build(build, image.file_version[3] if image.file_version else None)
    if same_build is not None:
        return same_build, isf_layout if isf_layout and isf_layout.symbols else None
    if isf_layout is not None:
        return isf_layout, None
    raise UnknownBuild(f"unknown Windows build {build} (ntkrnlmp.pdb {image.guid}/{image.age}): no shipped "
                       "layout")


def discover(phys: PhysicalMemory, registers: list[dict] | None = None, dtb: int | None = None,
             kernel_base: int | None = None, isf: str | None = None) -> Kernel:
    registers = registers or []
    space, dtb_source, base, image, base_source = locate(phys, registers, dtb, kernel_base)
    build = _build_number(space, base, image)
    layout, symbols = choose_layout(image, build, isf)
    kernel = Kernel(phys, space, dtb_source, base, base_source, image, build, layout)
    _resolve_globals(kernel, symbols)
    return kernel


def _export(kernel: Kernel, name: str) -> int:
    rva = kernel.image.exports.get(name)
    if rva is None:
        raise MissingGlobal(f"the kernel does not export {name}")
    return kernel.base + rva


def _resolve_globals(kernel: Kernel, symbols: layouts.Layout | None) -> None:
    found, sources = kernel.globals, kernel.sources
    if symbols is not None:
        how = "shipped RVA for this PDB GUID" if isinstance(symbols, layouts.ProfileLayout) \
            else f"symbols of {symbols.source}"
        for name in GLOBALS:
            rva = symbols.symbols.get(name)
            if rva is not None:
                found[name], sources[name] = kernel.base + rva, how
        if "ObHeaderCookie" not in found and name_known(symbols, "ObHeaderCookie"):
            found["ObHeaderCookie"], sources["ObHeaderCookie"] = None, f"absent from this build ({how})"
    read = kernel.va_reader()
    if "PsInitialSystemProcess" not in found:
        found["PsInitialSystemProcess"] = _export(kernel, "PsInitialSystemProcess")
        sources["PsInitialSystemProcess"] = "export"
    kernel.system_process = _pointer(kernel, "PsInitialSystemProcess")
    if "PspCidTable" not in found:
        _by_disassembly(kernel, "PspCidTable", "PsLookupProcessByProcessId",
                        lambda address: disasm.first_qword_load(read, address))
    if "ObTypeIndexTable" not in found or "ObHeaderCookie" not in found:
        table, cookie = disasm.type_table_and_cookie(read, _export(kernel, "ObGetObjectType"))
        if "ObTypeIndexTable" not in found and table is not None:
            found["ObTypeIndexTable"], sources["ObTypeIndexTable"] = table, "disassembly of ObGetObjectType"
        if "ObHeaderCookie" not in found:
            found["ObHeaderCookie"] = cookie
            sources["ObHeaderCookie"] = ("disassembly of ObGetObjectType" if cookie is not None else
                                         "absent (ObGetObjectType reads no cookie)")
    if "ObpInfoMaskToOffset" not in found:
        try:
            _by_disassembly(kernel, "ObpInfoMaskToOffset", "ObQueryNameString",
                            lambda address: disasm.byte_table(read, address))
        except MissingGlobal:
            found["ObpInfoMaskToOffset"] = None
            sources["ObpInfoMaskToOffset"] = "computed from the layout's optional header sizes"
    if "PsActiveProcessHead" not in found:
        links = kernel.layout.offset("_EPROCESS", "ActiveProcessLinks")
        found["PsActiveProcessHead"] = kernel.space.u64(kernel.system_process + links + 8)
        sources["PsActiveProcessHead"] = "System's ActiveProcessLinks.Blink (PsInitialSystemProcess)"
    table_offset = kernel.layout.offset("_EPROCESS", "ObjectTable")
    if "ObpKernelHandleTable" not in found:
        kernel_table = kernel.space.u64(kernel.system_process + table_offset)
        for candidate in disasm.qword_loads(read, _export(kernel, "ObReferenceObjectByHandle")):
            if _safe_u64(kernel, candidate) == kernel_table:
                found["ObpKernelHandleTable"] = candidate
                sources["ObpKernelHandleTable"] = "disassembly of ObReferenceObjectByHandle (checked " \
                                                  "against System's ObjectTable)"
                break
        else:
            found["ObpKernelHandleTable"] = None
            sources["ObpKernelHandleTable"] = "System's ObjectTable (the global itself not located)"
        kernel.kernel_table = kernel_table
    else:
        kernel.kernel_table = _pointer(kernel, "ObpKernelHandleTable")
    for name in ("PspCidTable", "ObTypeIndexTable"):
        if found.get(name) is None:
            raise MissingGlobal(f"cannot locate {name} for build {kernel.build}")
    cookie = found.get("ObHeaderCookie")
    kernel.header_cookie = kernel.space.u8(cookie) if cookie is not None else None
    kernel.info_mask_to_offset = _info_mask_table(kernel)


def name_known(symbols: layouts.Layout, name: str) -> bool:
    """True when the symbol source lists the name, even as absent (null)."""
    return name in symbols.symbols


def _by_disassembly(kernel: Kernel, name: str, function: str, finder) -> None:
    target = finder(_export(kernel, function))
    if target is None:
        raise MissingGlobal(f"cannot locate {name}: no reference in {function}'s code")
    kernel.globals[name] = target
    kernel.sources[name] = f"disassembly of {function}"


def _pointer(kernel: Kernel, name: str) -> int:
    return kernel.space.u64(kernel.globals[name])


def _safe_u64(kernel: Kernel, va: int) -> int | None:
    try:
        return kernel.space.u64(va)
    except HandleError:
        return None


def _info_mask_table(kernel: Kernel) -> bytes:
    """ObpInfoMaskToOffset as the kernel holds it, or computed as ObpInitInfoBlockOffsets does."""
    address = kernel.globals.get("ObpInfoMaskToOffset")
    if address is not None:
        return kernel.space.read(address, 256)
    sizes = []
    for names in OPTIONAL_HEADERS:
        sizes.append(next((kernel.layout.size(n) for n in names if kernel.layout.size(n)), 0))
    return bytes(sum(size for bit, size in enumerate(sizes) if mask & (1 << bit)) & 0xFF
                 for mask in range(256))
