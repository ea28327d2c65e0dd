"""PE32+ parsing and disassembly of exports on a small hand-assembled image."""
import struct
import uuid

from gdbhandles.windows import disasm, pe

TEXT, RDATA, DATA = 0x1000, 0x2000, 0x3000
COOKIE, TYPES, CID, MASKS = DATA, DATA + 0x100, DATA + 0x200, DATA + 0x300
GUID = uuid.UUID("BBED7C29-55FB-E452-2AAA-23F4B8677AD9")


def rip(insn_at, length, target):
    return struct.pack("<i", target - (insn_at + length))


def code():
    """ObGetObjectType (Win10 form), PsLookupProcessByProcessId calling a worker, and
    ObQueryNameString tail-jumping into one, as real kernels shape them."""
    text = bytearray(b"\xCC" * 0x1000)
    at = TEXT                                                        # ObGetObjectType
    body = b"\x48\x8D\x41\xD0" b"\x0F\xB6\x49\xE8" b"\x48\xC1\xE8\x08" b"\x0F\xB6\xC0" b"\x48\x33\xC1"
    body += b"\x0F\xB6\x0D" + rip(at + len(body), 7, COOKIE)
    body += b"\x48\x33\xC1"
    body += b"\x48\x8D\x0D" + rip(at + len(body), 7, TYPES)
    body += b"\x48\x8B\x04\xC1\xC3"
    text[0:len(body)] = body
    at = TEXT + 0x100                                                # PsLookupProcessByProcessId
    body = b"\x48\x83\xEC\x28"
    body += b"\x48\x8B\x0D" + rip(at + len(body), 7, CID)
    body += b"\xE8" + rip(at + len(body), 5, TEXT + 0x200)
    body += b"\x48\x83\xC4\x28\xC3"
    text[0x100:0x100 + len(body)] = body
    text[0x200:0x201] = b"\xC3"
    at = TEXT + 0x300                                                # ObQueryNameString → worker
    text[0x300:0x305] = b"\xE9" + rip(at, 5, TEXT + 0x400)
    at = TEXT + 0x400
    body = b"\x48\x8D\x15" + rip(at, 7, MASKS) + b"\x0F\xB6\x04\x02\xC3"
    text[0x400:0x400 + len(body)] = body
    return text


def image():
    img = bytearray(0x4000)
    img[0:2] = b"MZ"
    struct.pack_into("<I", img, 0x3C, 0x80)
    img[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", img, 0x84, 0x8664, 3, 0, 0, 0, 0xF0, 0x22)
    opt = 0x98
    struct.pack_into("<H", img, opt, 0x20B)
    struct.pack_into("<Q", img, opt + 24, 0xFFFFF80000000000)
    struct.pack_into("<II", img, opt + 56, 0x4000, 0x400)
    struct.pack_into("<I", img, opt + 108, 16)
    struct.pack_into("<II", img, opt + 112, RDATA, 0x100)                # export directory
    struct.pack_into("<II", img, opt + 112 + 6 * 8, RDATA + 0x180, 28)   # debug directory
    for i, (name, rva, flags) in enumerate([(b".text", TEXT, 0x60000020), (b".rdata", RDATA, 0x40000040),
                                           (b".data", DATA, 0xC0000040)]):
        struct.pack_into("<8sII", img, opt + 0xF0 + 40 * i, name, 0x1000, rva)
        struct.pack_into("<I", img, opt + 0xF0 + 40 * i + 36, flags)
    img[TEXT:TEXT + 0x1000] = code()
    names = sorted([b"ObGetObjectType", b"ObQueryNameString", b"PsLookupProcessByProcessId", b"NtBuildNumber"])
    rvas = {b"ObGetObjectType": TEXT, b"PsLookupProcessByProcessId": TEXT + 0x100,
            b"ObQueryNameString": TEXT + 0x300, b"NtBuildNumber": DATA + 0x800}
    strings, name_rvas, at = bytearray(), [], RDATA + 0x80
    for name in names:
        name_rvas.append(at + len(strings))
        strings += name + b"\0"
    module = at + len(strings)
    strings += b"ntoskrnl.exe\0"
    struct.pack_into("<IIIIIII", img, RDATA + 12, module, 1, 4, 4, RDATA + 0x28, RDATA + 0x38, RDATA + 0x48)
    struct.pack_into("<4I", img, RDATA + 0x28, *[rvas[n] for n in names])
    struct.pack_into("<4I", img, RDATA + 0x38, *name_rvas)
    struct.pack_into("<4H", img, RDATA + 0x48, 0, 1, 2, 3)
    img[RDATA + 0x80:RDATA + 0x80 + len(strings)] = strings
    rsrc = RDATA + 0x400                                                 # RT_VERSION → name 1 → 0x409
    struct.pack_into("<II", img, opt + 112 + 2 * 8, rsrc, 0x200)
    struct.pack_into("<12xHHII", img, rsrc, 0, 1, 16, 0x80000018)
    struct.pack_into("<12xHHII", img, rsrc + 0x18, 0, 1, 1, 0x80000030)
    struct.pack_into("<12xHHII", img, rsrc + 0x30, 0, 1, 0x409, 0x48)
    struct.pack_into("<II", img, rsrc + 0x48, rsrc + 0x100, 0x60)
    img[rsrc + 0x100:rsrc + 0x128] = b"\x5c\x03\x34\x00\x00\x00V\0S\0_\0V\0E\0R\0S\0I\0O\0N\0_\0I\0N\0F\0O\0\0\0"[:0x28]
    struct.pack_into("<IIII", img, rsrc + 0x128, 0xFEEF04BD, 0x10000, 10 << 16, 19041 << 16 | 329)
    record = b"RSDS" + GUID.bytes_le + struct.pack("<I", 3) + b"ntkrnlmp.pdb\0"
    struct.pack_into("<IIHHIII", img, RDATA + 0x180, 0, 0, 0, 0, 2, len(record), RDATA + 0x200)
    img[RDATA + 0x200:RDATA + 0x200 + len(record)] = record
    return bytes(img)


IMAGE = image()
BASE = 0xFFFFF80512000000


def read_rva(rva, size):
    return IMAGE[rva:rva + size]


def read_va(va, size):
    return read_rva(va - BASE, size)


def test_headers_sections_exports_and_codeview():
    parsed = pe.parse(read_rva)
    assert parsed.size_of_image == 0x4000
    assert [s.name for s in parsed.sections] == [".text", ".rdata", ".data"]
    assert parsed.section_of(TEXT + 0x10).executable and not parsed.section_of(DATA).executable
    assert parsed.export_name == "ntoskrnl.exe"
    assert parsed.exports == {"NtBuildNumber": DATA + 0x800, "ObGetObjectType": TEXT,
                              "ObQueryNameString": TEXT + 0x300, "PsLookupProcessByProcessId": TEXT + 0x100}
    assert (parsed.guid, parsed.age, parsed.pdb_name) == (GUID.hex.upper(), 3, "ntkrnlmp.pdb")
    assert parsed.guid == "BBED7C2955FBE4522AAA23F4B8677AD9"
    assert parsed.file_version == (10, 0, 19041, 329)


def test_not_a_pe():
    assert not pe.looks_like_pe(lambda rva, size: bytes(size))
    assert not pe.looks_like_pe(lambda rva, size: (b"MZ" + bytes(0x3E))[rva:rva + size].ljust(size, b"\0"))


def addresses(pairs):
    return [address for address, _ in pairs]


def test_globals_from_code():
    get_type = disasm.traces(read_va, BASE + TEXT)
    assert addresses(disasm.indexed_tables(get_type, 8)) == [BASE + TYPES]
    assert addresses(disasm.constant_loads(get_type, 1)) == [BASE + COOKIE]
    assert addresses(disasm.constant_loads(disasm.traces(read_va, BASE + TEXT + 0x100), 8)) == [BASE + CID]
    query = disasm.traces(read_va, BASE + TEXT + 0x300)                      # through the tail jump
    assert addresses(disasm.indexed_tables(query, 1)) == [BASE + MASKS]


def test_win7_object_type_has_no_cookie():
    at = TEXT
    body = b"\x0F\xB6\x41\xE8" + b"\x48\x8D\x0D" + rip(at + 4, 7, TYPES) + b"\x48\x8B\x04\xC1\xC3"
    win7 = IMAGE[:TEXT] + body + IMAGE[TEXT + len(body):]
    reader = lambda va, size: win7[va - BASE:va - BASE + size]  # noqa: E731
    found = disasm.traces(reader, BASE + TEXT)
    assert addresses(disasm.indexed_tables(found, 8)) == [BASE + TYPES]
    assert disasm.constant_loads(found, 1) == []
