"""The guests' ntoskrnl.exe, read back with plain struct parsing and capstone (not the engine's
PE reader): a valid PE32+, RSDS, exports, sections that fit the symbols, and exported code whose
RIP-relative operands name the unexported globals."""
import random
import struct

import capstone
import pytest
from capstone import x86

from winguest.kernel_image import build_kernel_image
from winguest.profiles import all_profiles

BASE = 0xFFFFF8016E800000
PROFILES = all_profiles()
GUID = "0123456789ABCDEF0123456789ABCDEF"


def build(profile, seed=1):
    guid = profile["pdb"]["guid"] or GUID
    return build_kernel_image(profile, guid=guid, age=2, base=BASE, rng=random.Random(seed))


@pytest.fixture(scope="module", params=PROFILES, ids=[p["version"] for _, p in PROFILES])
def kernel(request):
    profile = request.param[1]
    return profile, build(profile)


def headers(data):
    assert data[:2] == b"MZ"
    lfanew, = struct.unpack_from("<I", data, 0x3C)
    assert data[lfanew:lfanew + 4] == b"PE\0\0"
    machine, count, _, _, _, optional_size, _ = struct.unpack_from("<HHIIIHH", data, lfanew + 4)
    optional = lfanew + 24
    magic, = struct.unpack_from("<H", data, optional)
    entry, = struct.unpack_from("<I", data, optional + 16)
    image_base, = struct.unpack_from("<Q", data, optional + 24)
    size_of_image, = struct.unpack_from("<I", data, optional + 56)
    dirs = [struct.unpack_from("<II", data, optional + 112 + 8 * i) for i in range(16)]
    sections = []
    for i in range(count):
        name, vsize, rva, *_, ch = struct.unpack_from("<8sIIIIIIHHI", data, optional + optional_size + 40 * i)
        sections.append((name.rstrip(b"\0").decode(), rva, vsize, ch))
    return dict(machine=machine, magic=magic, entry=entry, image_base=image_base, size=size_of_image,
                dirs=dirs, sections=sections)


def section_of(h, rva):
    return next(s for s in h["sections"] if s[1] <= rva < s[1] + s[2])


def test_pe_headers_and_sections(kernel):
    profile, image = kernel
    data = bytes(image.data)
    h = headers(data)
    assert (h["machine"], h["magic"]) == (0x8664, 0x20B)
    assert h["image_base"] == BASE and h["size"] == len(data) and len(data) % 0x1000 == 0
    assert len(data) >= (0xA00000 if profile["build"] >= 9200 else 0x500000)     # a realistic size
    rvas = [(s[1], s[2]) for s in h["sections"]]
    assert rvas[0][0] == 0x1000
    for (rva, vsize), (next_rva, _) in zip(rvas, rvas[1:]):
        assert rva + vsize == next_rva                                         # adjacent, ascending
    assert rvas[-1][0] + rvas[-1][1] == len(data)
    names = {s[0] for s in h["sections"]}
    assert {".text", ".rdata", ".data", ".pdata", ".rsrc", "INIT"} <= names
    assert ("KVASCODE" in names) == ("KiSystemCall64Shadow" in image.symbols)
    assert section_of(h, h["entry"])[0] == "INIT" and h["entry"] == image.symbols["KiSystemStartup"]


def test_symbols_sit_at_the_profile_rvas_in_fitting_sections(kernel):
    profile, image = kernel
    h = headers(bytes(image.data))
    if profile["symbols"]:
        for name, value in profile["symbols"].items():
            if value:
                assert image.symbols[name] == value["rva"], name
    for name, rva in image.symbols.items():
        ch = section_of(h, rva)[3]
        code = name.startswith(("Ps", "Ob", "Ki", "Ke", "Io", "Ex", "Cm")) and name not in (
            "PsActiveProcessHead", "PspCidTable", "ObpKernelHandleTable", "ObTypeIndexTable", "ObHeaderCookie",
            "ObpInfoMaskToOffset", "PsInitialSystemProcess", "KiKvaShadow", "ObpRootDirectoryObject",
            "ObpTypeObjectType", "PsLoadedModuleList", "KiGuestChurnParameters", "KiGuestLeakParameters")
        if code:
            assert ch & 0x20000000 and not ch & 0x80000000, name                 # executable, not writable
        elif name != "NtBuildNumber":
            assert ch & 0x80000000 and not ch & 0x20000000, name                 # writable data


def test_codeview_record(kernel):
    profile, image = kernel
    data = bytes(image.data)
    rva, size = headers(data)["dirs"][6]
    kind, data_size, data_rva = struct.unpack_from("<III", data, rva + 12)
    assert kind == 2 and data_rva < 0x400000                 # volatility3 scans 4 MiB from MZ
    record = data[data_rva:data_rva + data_size]
    d1, d2, d3 = struct.unpack_from("<IHH", record, 4)
    guid = f"{d1:08X}{d2:04X}{d3:04X}{record[12:20].hex().upper()}"
    assert record[:4] == b"RSDS" and guid == (profile["pdb"]["guid"] or GUID)
    assert struct.unpack_from("<I", record, 20)[0] == 2 and record[24:] == b"ntkrnlmp.pdb\0"


def test_version_resource(kernel):
    profile, image = kernel
    data = bytes(image.data)
    rva, _ = headers(data)["dirs"][2]
    at = data.find(struct.pack("<I", 0xFEEF04BD), rva)
    ms, ls = struct.unpack_from("<II", data, at + 8)
    assert f"{ms >> 16}.{ms & 0xFFFF}.{ls >> 16}.{ls & 0xFFFF}" == profile["version"]


def exports(data):
    rva, size = headers(data)["dirs"][0]
    name_rva, _, functions, names, functions_rva, names_rva, ordinals_rva = struct.unpack_from("<IIIIIII", data,
                                                                                                rva + 12)
    cstr = lambda at: data[at:data.index(b"\0", at)].decode()  # noqa: E731
    out = []
    for i in range(names):
        name = cstr(struct.unpack_from("<I", data, names_rva + 4 * i)[0])
        ordinal, = struct.unpack_from("<H", data, ordinals_rva + 2 * i)
        out.append((name, struct.unpack_from("<I", data, functions_rva + 4 * ordinal)[0]))
    return cstr(name_rva), out


def test_exports(kernel):
    _, image = kernel
    module, pairs = exports(bytes(image.data))
    names = [n for n, _ in pairs]
    assert module == "ntoskrnl.exe" and names == sorted(names)
    assert {"PsInitialSystemProcess", "NtBuildNumber", "PsLookupProcessByProcessId", "ObGetObjectType",
            "ObReferenceObjectByHandle", "PsGetProcessId", "ObQueryNameString", "KeBugCheckEx"} <= set(names)
    for name, rva in pairs:
        assert image.symbols[name] == rva


CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
CS.detail = True


def disassemble(image, name):
    """Instructions of a function up to its first ret (following one call or tail jump)."""
    rva = image.symbols[name]
    out = []
    for insn in CS.disasm(bytes(image.data[rva:rva + 0x200]), BASE + rva):
        out.append(insn)
        if insn.mnemonic == "ret" or insn.mnemonic == "int3":
            break
    return out


def rip_targets(insns, mnemonic, size):
    return [i.address + i.size + op.mem.disp for i in insns if i.mnemonic == mnemonic
            for op in i.operands if op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP and op.size == size]


def callees(image, insns):
    return [i.operands[0].imm & (2**64 - 1) for i in insns if i.mnemonic in ("call", "jmp") and i.operands[0].type == x86.X86_OP_IMM]


def test_exported_code_names_the_globals(kernel):
    profile, image = kernel
    va = lambda name: BASE + image.symbols[name]  # noqa: E731
    lookup = disassemble(image, "PsLookupProcessByProcessId")
    assert rip_targets(lookup, "mov", 8)[0] == va("PspCidTable")
    assert any(image.symbols.get("ExpLookupHandleTableEntry") == t - BASE for t in callees(image, lookup))
    get_type = disassemble(image, "ObGetObjectType")
    assert rip_targets(get_type, "lea", 8) == [va("ObTypeIndexTable")]
    cookies = rip_targets(get_type, "movzx", 1)
    assert cookies == ([va("ObHeaderCookie")] if "ObHeaderCookie" in image.symbols else [])
    assert get_type[-1].mnemonic == "ret"
    reference = disassemble(image, "ObReferenceObjectByHandle")
    starts = {BASE + rva: name for name, rva in image.symbols.items()}
    for target in callees(image, reference):
        if target in starts:                                   # a call, or a tail jump to a function
            reference += disassemble(image, starts[target])
    assert va("ObpKernelHandleTable") in rip_targets(reference, "mov", 8)
    query = disassemble(image, "ObQueryNameString")
    query += disassemble(image, "ObQueryNameStringMode")
    assert va("ObpInfoMaskToOffset") in rip_targets(query, "lea", 8)
    pid = disassemble(image, "PsGetProcessId")
    assert [i.mnemonic for i in pid] == ["mov", "ret"]
    unique = profile["structs"]["_EPROCESS"]["fields"]["UniqueProcessId"]["offset"]
    assert pid[0].operands[1].mem.disp == unique


def test_idt_handlers_and_kvascode(kernel):
    _, image = kernel
    h = headers(bytes(image.data))
    for i in (0, 0x0E, 0x2F, 0xFF):
        assert section_of(h, image.symbols[f"KiIdtHandler{i:02X}"])[0] == ".text"
        assert section_of(h, image.symbols[f"KiIdtHandler{i:02X}Shadow"])[0] == "KVASCODE"
    assert section_of(h, image.symbols["KiKernelIretExit"])[0] == "KVASCODE"


def test_deterministic():
    profile = PROFILES[0][1]
    assert build(profile).data == build(profile).data
    assert build(profile).data != build(profile, seed=2).data       # the link timestamp differs
