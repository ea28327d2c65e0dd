"""Kernel discovery from the guest alone: DTB, kernel base, build, PDB GUID, layout, globals.

Each fact records how it was found (`Kernel.sources`), because a wrong guess is the usual
failure of tools like this one, and `handle info` should show where to look.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from gdbhandles.windows import layouts, pe
from gdbhandles.errors import HandleError, NotWindows, ProfileError
from gdbhandles.windows.kpcr import KPCR_IDT_BASE, KPCR_SELF, vcpu_cpl, vcpu_kpcr
from gdbhandles.windows.memory import PAGE, PFN_MASK, AddressSpace, PhysicalMemory, SizedBackend

KERNEL_PDBS = {"ntkrnlmp.pdb", "ntoskrnl.pdb", "ntkrnlpa.pdb", "ntkrpamp.pdb"}
KUSER_SHARED_DATA = 0xFFFFF78000000000
KUSER_BUILD_NUMBER = 0x260            # Win10+; NtMajorVersion 0x26c, NtMinorVersion 0x270
# Before the layout is known: members at the same place in every x64 build.
LOW_STUB_MASK, LOW_STUB_SIGNATURE = 0xFFFFFFFFFFFF00FF, 0x00000001000600E9
LOW_STUB_ENTRY, LOW_STUB_CR3 = 0x70, 0xA0
LOW_STUB_RANGE = range(0x1000, 0x100000, PAGE)
SCAN_DOWN = 32 << 20                  # how far below a code address the image base may be
LARGE = 2 << 20
KERNEL_REGION = (0xFFFFF80000000000, 0xFFFFF88000000000)   # where every x64 build loads ntoskrnl
IDT_VECTORS = 4
PML4_SCAN_LIMIT = 4 << 30             # physical bytes the last-resort PML4 scan reads
PROGRESS_STEP = 256 << 20


@dataclass(frozen=True)
class Check:
    """One invariant of live data that discovery tested (shown by `handle info`)."""
    name: str
    passed: bool
    detail: str = ""


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
    checks: list[Check] = field(default_factory=list)
    deferred_checks_done: bool = False        # validate.run_deferred ran
    layout_own: bool = False                  # the layout is shipped for this very PDB GUID
    file_check: Check | None = None           # file_check.check's result, once run


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


def self_referencing_pml4s(phys: PhysicalMemory, progress=None):
    """Physical pages with a kernel-half entry pointing back at the page itself, one per
    distinct kernel half (every process's PML4 shares the kernel's). The last resort after
    the vCPUs' CR3 and the start block, so bounded: the first PML4_SCAN_LIMIT bytes (Windows
    keeps the System DTB low), zero runs skipped at once, `progress` told every 256 MiB."""
    if not isinstance(phys.backend, SizedBackend) or not phys.backend.size:
        return
    size = min(phys.backend.size, PML4_SCAN_LIMIT)
    chunk, seen = 1 << 20, set()
    zero = bytes(chunk)
    for start in range(0, size - size % PAGE, chunk):
        if progress and start and not start % PROGRESS_STEP:
            progress(f"scanning physical memory for a page table: {start >> 20} of {size >> 20} MiB")
        try:
            data = phys.scan(start, min(chunk, size - start))
        except HandleError:
            continue
        if data == zero[:len(data)]:
            continue
        for page in _pml4_pages(data, start):
            entries = struct.unpack_from("<256Q", data, page - start + 0x800)
            if sum(1 for e in entries if e & 1) < 2:
                continue
            half = tuple(e for e in entries if e & PFN_MASK != page)
            if half not in seen:
                seen.add(half)
                yield page


def _pml4_pages(data: bytes, start: int):
    """Pages of `data` (read from physical `start`) whose upper half holds a present, writable
    entry with the page's own frame: found with bytes.find of the frame's bytes 2-5."""
    for offset in range(0, len(data) - PAGE + 1, PAGE):
        page = start + offset
        needle, lo = (page >> 16).to_bytes(4, "little"), offset + 0x800
        at = data.find(needle, lo + 2, offset + PAGE)
        while at != -1:
            entry_at = at - 2
            if not (entry_at - lo) % 8:
                entry = int.from_bytes(data[entry_at:entry_at + 8], "little")
                if entry & PFN_MASK == page and entry & 3 == 3:
                    yield page
                    break
            at = data.find(needle, at + 1, offset + PAGE)


def scan_note(phys: PhysicalMemory) -> str:
    """What the PML4 scan left out, for the message when no kernel was found ('' if nothing)."""
    size = getattr(phys.backend, "size", None) or 0
    if size <= PML4_SCAN_LIMIT:
        return ""
    return (f"; the PML4 scan covered the first {PML4_SCAN_LIMIT >> 20} MiB of {size >> 20} MiB "
            "(give the DTB for the rest)")


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
    """The kernel image containing `start` (2 MiB-aligned bases first, then every page), else the
    one found below it: a start block's entry can lie past the image (the test guests' does)."""
    top, below = start & ~(PAGE - 1), None
    for candidates in (range(top & ~(LARGE - 1), top - SCAN_DOWN, -LARGE), range(top, top - SCAN_DOWN, -PAGE)):
        for base in candidates:
            image = _kernel_with_mz(space, base)
            if image is not None and base <= start < base + image.size_of_image:
                return base, image
            below = below or (image and (base, image))
        if below:
            return below
    return None


def _kernel_with_mz(space: AddressSpace, base: int) -> pe.PeImage | None:
    """_kernel_at, after the cheap check for an MZ at `base`."""
    try:
        mz = space.read(base, 2) == b"MZ"
    except HandleError:
        return None
    return _kernel_at(space, base) if mz else None


def _hints(space: AddressSpace, registers: list[dict], stub) -> list[tuple[int, str]]:
    """Code addresses inside the kernel, with what each came from."""
    hints = []
    for index, regs in enumerate(registers):
        rip = regs.get("rip", 0)
        if vcpu_cpl(regs) == 0 and rip >> 47 == 0x1FFFF:
            hints.append((rip, f"RIP of vCPU {index}"))
        kpcr = vcpu_kpcr(regs)
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


def _dtb_candidates(phys: PhysicalMemory, registers: list[dict], dtb: int | None, progress=None):
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
    for page in self_referencing_pml4s(phys, progress):
        if page not in seen:
            yield page, "self-referencing PML4 scan", None


@dataclass(frozen=True)
class Location:
    """Where the running kernel is, and how each part was found."""
    space: AddressSpace          # through the kernel's DTB
    dtb_source: str
    base: int                    # ntoskrnl's image base
    image: pe.PeImage
    base_source: str


def locate(phys: PhysicalMemory, registers: list[dict], dtb: int | None, kernel_base: int | None,
           progress=None) -> Location:
    """The running kernel's DTB and image; NotWindows naming what was tried."""
    tried = []
    for candidate, source, stub in _dtb_candidates(phys, registers, dtb, progress):
        space = AddressSpace(phys, candidate)
        found = _find_base(space, registers, stub, kernel_base)
        if found is not None:
            base, image, base_source = found
            return Location(space, source, base, image, base_source)
        tried.append(f"{candidate:#x} ({source})")
    what = "the given kernel base" if kernel_base is not None else "an ntoskrnl image"
    shown = ", ".join(tried[:4]) + (f" and {len(tried) - 4} more" if len(tried) > 4 else "")
    detail = f"; tried DTBs {shown}" if tried else ": no CR3, start block or PML4 found"
    raise NotWindows(f"not a Windows x64 guest: no DTB maps {what}{detail}{'' if dtb else scan_note(phys)}")


def build_number(space: AddressSpace, base: int, image: pe.PeImage) -> int:
    rva = image.exports.get("NtBuildNumber")
    try:
        if rva is not None:
            return space.u32(base + rva) & 0xFFFF
        return space.u32(KUSER_SHARED_DATA + KUSER_BUILD_NUMBER) & 0xFFFF
    except HandleError:
        raise NotWindows("the kernel's build number is unreadable (NtBuildNumber, KUSER_SHARED_DATA)") from None


def choose_layout(image: pe.PeImage, build: int, isf: str | None,
                  infer: bool = False) -> tuple[layouts.Layout | None, layouts.Layout | None]:
    """(layout for structures, layout whose symbols belong to this exact kernel or None); no
    layout (None) when it must be inferred: asked to, or nothing we have describes the build."""
    data = layouts.read_isf(isf) if isf else None     # a file that is no ISF fails here, always
    made_for = layouts.isf_pdb(data) if data is not None else None
    if made_for is not None and image.guid is not None and made_for != (image.guid, image.age):
        raise ProfileError(f"{isf} is the ISF of ntkrnlmp.pdb {made_for[0]}/{made_for[1]}, not of this "
                           f"kernel ({image.guid}/{image.age})")
    if infer:
        return None, None
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
    return None, None


def name_known(symbols: layouts.Layout, name: str) -> bool:
    """True when the symbol source lists the name, even as absent (null)."""
    return name in symbols.symbols
