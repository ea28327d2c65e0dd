"""PE32+ images as mapped in memory: headers, sections, exports, CodeView RSDS.

Everything is read through `read(rva, size)`, relative to the image base, so the same code
parses a kernel in guest memory or a file's bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from gdbhandles.errors import HandleError, NotWindows

MACHINE_AMD64 = 0x8664
PE32_PLUS = 0x20B
DIR_EXPORT, DIR_RESOURCE, DIR_DEBUG = 0, 2, 6
RT_VERSION = 16
FIXED_FILE_INFO = struct.pack("<I", 0xFEEF04BD)
DEBUG_CODEVIEW = 2
MAX_EXPORTS = 20000

Reader = Callable[[int, int], bytes]


@dataclass
class Section:
    name: str
    rva: int
    size: int
    characteristics: int

    @property
    def executable(self) -> bool:
        return bool(self.characteristics & 0x20000000)


@dataclass
class PeImage:
    size_of_image: int
    image_base: int                           # as linked (a running kernel may sit elsewhere)
    sections: list[Section]
    directories: list[tuple[int, int]]        # (rva, size) of each data directory
    exports: dict[str, int] = field(default_factory=dict)
    export_name: str | None = None
    pdb_name: str | None = None
    guid: str | None = None                   # 32 hex digits, as PDB servers and ISFs print it
    age: int | None = None
    file_version: tuple[int, int, int, int] | None = None   # VS_FIXEDFILEINFO: 10.0.19041.329

    def section_of(self, rva: int) -> Section | None:
        return next((s for s in self.sections if s.rva <= rva < s.rva + max(s.size, 1)), None)


def looks_like_pe(read: Reader) -> bool:
    """A cheap check: MZ, a PE signature, AMD64, PE32+."""
    try:
        dos = read(0, 0x40)
        if dos[:2] != b"MZ":
            return False
        lfanew = struct.unpack_from("<I", dos, 0x3C)[0]
        if not 0x40 <= lfanew < 0x1000 - 0x108:
            return False
        nt = read(lfanew, 0x1A)
    except HandleError:
        return False
    return (nt[:4] == b"PE\0\0" and struct.unpack_from("<H", nt, 4)[0] == MACHINE_AMD64
            and struct.unpack_from("<H", nt, 0x18)[0] == PE32_PLUS)


def parse(read: Reader) -> PeImage:
    """Headers and sections; exports and the RSDS record where their pages are readable."""
    if not looks_like_pe(read):
        raise NotWindows("no PE32+ AMD64 image at the kernel base")
    lfanew = struct.unpack("<I", read(0x3C, 4))[0]
    file_header = read(lfanew + 4, 20)
    sections_count, optional_size = struct.unpack_from("<H", file_header, 2)[0], \
        struct.unpack_from("<H", file_header, 16)[0]
    optional = read(lfanew + 24, optional_size)
    image_base, = struct.unpack_from("<Q", optional, 24)
    size_of_image, = struct.unpack_from("<I", optional, 56)
    count = min(struct.unpack_from("<I", optional, 108)[0], 16)
    directories = [struct.unpack_from("<II", optional, 112 + 8 * i) for i in range(count)]
    table = read(lfanew + 24 + optional_size, 40 * sections_count)
    sections = []
    for i in range(sections_count):
        name, vsize, rva = struct.unpack_from("<8sII", table, 40 * i)
        characteristics, = struct.unpack_from("<I", table, 40 * i + 36)
        sections.append(Section(name.rstrip(b"\0").decode("ascii", "replace"), rva, vsize, characteristics))
    image = PeImage(size_of_image, image_base, sections, directories)
    for reader in (_read_exports, _read_codeview, _read_version):
        try:
            reader(read, image)
        except HandleError:
            pass             # a paged-out directory: what is missing stays None/empty
    return image


def _directory(image: PeImage, index: int) -> tuple[int, int]:
    return image.directories[index] if index < len(image.directories) else (0, 0)


def _cstring(read: Reader, rva: int, limit: int = 256) -> str:
    data = read(rva, limit)
    return data.split(b"\0", 1)[0].decode("ascii", "replace")


def _read_exports(read: Reader, image: PeImage) -> None:
    rva, size = _directory(image, DIR_EXPORT)
    if not rva:
        return
    directory = read(rva, 40)
    name_rva, _base, functions, names, functions_rva, names_rva, ordinals_rva = \
        struct.unpack_from("<IIIIIII", directory, 12)
    functions, names = min(functions, MAX_EXPORTS), min(names, MAX_EXPORTS)
    image.export_name = _cstring(read, name_rva)
    addresses = struct.unpack(f"<{functions}I", read(functions_rva, 4 * functions))
    name_rvas = struct.unpack(f"<{names}I", read(names_rva, 4 * names))
    ordinals = struct.unpack(f"<{names}H", read(ordinals_rva, 2 * names))
    # The name strings usually sit together right after the tables: read them in one go.
    low, high = min(name_rvas, default=0), max(name_rvas, default=0)
    blob = read(low, high - low + 256) if names and high - low < 0x40000 else None
    for name_rva, ordinal in zip(name_rvas, ordinals):
        if blob is not None:
            name = blob[name_rva - low:].split(b"\0", 1)[0].decode("ascii", "replace")
        else:
            name = _cstring(read, name_rva)
        if ordinal < functions:
            target = addresses[ordinal]
            if not rva <= target < rva + size:          # forwarders point into the directory
                image.exports[name] = target


def _read_codeview(read: Reader, image: PeImage) -> None:
    rva, size = _directory(image, DIR_DEBUG)
    if not rva:
        return
    entries = read(rva, min(size, 28 * 16))
    for offset in range(0, len(entries) - 27, 28):
        kind, data_size, data_rva = struct.unpack_from("<III", entries, offset + 12)
        if kind != DEBUG_CODEVIEW or not data_rva:
            continue
        record = read(data_rva, min(data_size, 0x200))
        if record[:4] != b"RSDS":
            continue
        image.guid = format_guid(record[4:20])
        image.age, = struct.unpack_from("<I", record, 20)
        image.pdb_name = record[24:].split(b"\0", 1)[0].decode("ascii", "replace")
        return


def _read_version(read: Reader, image: PeImage) -> None:
    """FileVersion of the RT_VERSION resource (type → first name → first language → data)."""
    root, _size = _directory(image, DIR_RESOURCE)
    if not root:
        return
    offset = 0
    for level in range(3):
        named, ids = struct.unpack("<HH", read(root + offset + 12, 4))
        entries = read(root + offset + 16, 8 * (named + ids))
        pairs = [struct.unpack_from("<II", entries, 8 * i) for i in range(named + ids)]
        if level == 0:
            pairs = [pair for pair in pairs[named:] if pair[0] == RT_VERSION]
        if not pairs or bool(pairs[0][1] & 0x80000000) != (level < 2):
            return
        offset = pairs[0][1] & 0x7FFFFFFF
    data_rva, data_size = struct.unpack("<II", read(root + offset, 8))
    blob = read(data_rva, min(data_size, 0x400))
    at = blob.find(FIXED_FILE_INFO)
    if at >= 0:
        high, low = struct.unpack_from("<II", blob, at + 8)
        image.file_version = (high >> 16, high & 0xFFFF, low >> 16, low & 0xFFFF)


def format_guid(raw: bytes) -> str:
    """A GUID struct (little-endian Data1-3) as the 32 upper-case hex digits PDB tools print."""
    data1, data2, data3 = struct.unpack_from("<IHH", raw)
    return f"{data1:08X}{data2:04X}{data3:04X}{raw[8:16].hex().upper()}"
