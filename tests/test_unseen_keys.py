"""The key control block's ParentKcb/NameBlock on kernels we have never seen, two ways: the walk
up ParentKcb in the code behind CmCallbackGetKeyObjectIDEx (CmCallbackGetKeyObjectID on 7), and
the live keys chaining to \\REGISTRY; on raw memory of built guests (no QEMU)."""
from __future__ import annotations

import random
import subprocess

import capstone
import pytest

from gdbhandles.engine import Windows
from gdbhandles.windows import infer, infer_keys, layouts
from gdbhandles.windows.memory import AddressSpace, DumpFile, PhysicalMemory, UnreadablePage

from test_engine_guests import check_handles, patched_copy, short_names
from winguest.guest import BLOB_BASE, LOW_STUB, build
from winguest.kernel_image import build_kernel_image
from winguest.profiles import FUTURE, Layout, all_profiles, future_profile
from winguest.registry_code import PARENT_FORMS, STRUCTURES

BASE = 0xFFFFF8016E800000
PARENT, NAME_BLOCK = "_CM_KEY_CONTROL_BLOCK.ParentKcb", "_CM_KEY_CONTROL_BLOCK.NameBlock"
EVERY_PROFILE = [p for _, p in all_profiles()] + [future_profile()]


def pair(profile):
    """(ParentKcb, NameBlock) of a test-bed profile."""
    L = Layout(profile)
    return L.off("_CM_KEY_CONTROL_BLOCK", "ParentKcb"), L.off("_CM_KEY_CONTROL_BLOCK", "NameBlock")


def image_walks(image, build_number):
    read = lambda va, size: bytes(image.data[va - BASE:va - BASE + size])   # noqa: E731
    return infer_keys.name_walks(read, BASE, image.exports, infer.nearest_base(build_number))


@pytest.mark.parametrize("profile", EVERY_PROFILE, ids=lambda p: p["version"])
def test_the_key_name_walk_is_read_in_every_variant(profile):
    for seed in range(4):
        image = build_kernel_image(profile, guid="0" * 32, age=1, base=BASE, rng=random.Random(seed),
                                   code_variants=True)
        walks = image_walks(image, profile["build"])
        assert walks and {(w.parent, w.name_block) for w in walks} == {pair(profile)}, image.code_forms
        export = "CmCallbackGetKeyObjectIDEx" if profile["build"] >= 9200 else "CmCallbackGetKeyObjectID"
        assert {w.export for w in walks} == {export}


def test_every_key_name_form_is_drawn_and_read():
    """A call or a tail jump into the walk, the newest builds' direct call, or the older
    CmpConstructName (Windows 7's only form); the parent loaded last, early into a spare register
    (before or after the name block) or in a loop entered at its test."""
    drawn = set()
    profiles = {p["build"]: p for _, p in all_profiles() if p["build"] in (7601, 19041)}
    for profile in (profiles[7601], profiles[19041], future_profile()):
        for seed in range(60):
            image = build_kernel_image(profile, guid="0" * 32, age=1, base=BASE, rng=random.Random(seed),
                                       code_variants=True)
            walks = image_walks(image, profile["build"])
            assert {(w.parent, w.name_block) for w in walks} == {pair(profile)}, image.code_forms
            drawn.add(image.code_forms["CmpConstructName"])
    wanted = {f"{s}+parent-{p}" for s in STRUCTURES for p in PARENT_FORMS}
    wanted |= {f"{s}+parent-early+parent-first" for s in STRUCTURES}
    assert wanted <= drawn, wanted - drawn


class BuiltMemory:
    """A guest built in memory and read as its memory.raw would be (49 guests, none cached on disk)."""

    def __init__(self, built: dict):
        self.size = built["ram"]
        self.parts = [(LOW_STUB, built["lowstub"]), (BLOB_BASE, built["memory.bin"])]

    def read(self, paddr: int, size: int) -> bytes:
        if paddr < 0 or paddr + size > self.size:
            raise UnreadablePage(paddr, "past the end of the guest's RAM", physical=True)
        out = bytearray(size)
        for start, data in self.parts:
            lo, hi = max(paddr, start), min(paddr + size, start + len(data))
            if lo < hi:
                out[lo - paddr:hi - paddr] = data[lo - start:hi - start]
        return bytes(out)


@pytest.mark.parametrize("profile", EVERY_PROFILE, ids=lambda p: p["version"])
def test_both_ways_agree_on_every_profile_with_varied_code(profile):
    name = FUTURE if profile["build"] == future_profile()["build"] else profile["version"]
    built = build(name, "default", 0, "random", (), "random")
    windows = Windows.open(BuiltMemory(built), layout="infer")
    info = windows.info()
    for field, offset in zip((PARENT, NAME_BLOCK), pair(profile)):
        how = info.inferred[field]
        assert how.startswith(f"{offset:#x}: code: CmCallbackGetKeyObjectID") and "; live: the only" in how, how
        assert [passed for check, passed, _ in info.checks if check.startswith(field)] == [True]
    assert all(passed for _, passed, _ in info.checks), info.checks
    assert built["truth"]["code_forms"]["CmpConstructName"]


def parent_loads(windows):
    """Each instruction the code way takes ParentKcb from, with where its displacement byte is."""
    kernel = windows.kernel
    engine = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    engine.detail = True
    out = []
    for at in sorted({w.parent_at for w in infer_keys.name_walks(kernel.space.read, kernel.base,
                                                                 kernel.image.exports, kernel.layout)}):
        insn = next(engine.disasm(kernel.space.read(at, 16), at))
        assert insn.disp_size == 1, insn.op_str
        out.append((at + insn.disp_offset, insn.disp))
    return out


def test_a_patched_parent_load_is_caught_and_live_data_wins(guest_truth, tmp_path):
    directory, truth = guest_truth("19041", guid="random", code_variants="random")
    dump = directory / "memory.raw"
    loads = parent_loads(Windows.open(DumpFile(dump), layout="infer"))
    assert loads and {disp for _, disp in loads} == {0x48}
    space = AddressSpace(PhysicalMemory(DumpFile(dump)), truth["kernel_dtb"])
    copy = patched_copy(dump, tmp_path / "wrongparent.raw", {space.translate(at): b"\x40" for at, _ in loads})
    windows = Windows.open(DumpFile(copy), layout="infer")
    info = windows.info()
    [check] = [c for c in info.checks if c[0].startswith(PARENT)]
    assert not check[1] and "0x40 (code: CmCallbackGetKeyObjectIDEx" in check[2] and "vs 0x48 (live:" in check[2]
    assert info.inferred[PARENT].startswith("0x48: live:")                  # live data wins
    assert [c[1] for c in info.checks if c[0].startswith(NAME_BLOCK)] == [True]
    check_handles(windows, short_names(truth))


def registry_root_name(space, truth, L):
    """Virtual address of the root control block's name ("REGISTRY") above a Key handle."""
    body = next(h["object"] for h in truth["handles"] if h["type"] == "Key")
    kcb = space.u64(body + L.off("_CM_KEY_BODY", "KeyControlBlock"))
    while space.u64(kcb + L.off("_CM_KEY_CONTROL_BLOCK", "ParentKcb")):
        kcb = space.u64(kcb + L.off("_CM_KEY_CONTROL_BLOCK", "ParentKcb"))
    name = space.u64(kcb + L.off("_CM_KEY_CONTROL_BLOCK", "NameBlock")) + L.off("_CM_NAME_CONTROL_BLOCK", "Name")
    assert space.read(name, 8) == b"REGISTRY"
    return name


def without_registry(directory, truth, tmp_path, export=False):
    """A copy of a `future` guest whose root key is named REGISTRX (no key chains to \\REGISTRY),
    and with `export`, the key-name export a bare `ret` too."""
    dump = directory / "memory.raw"
    space = AddressSpace(PhysicalMemory(DumpFile(dump)), truth["kernel_dtb"])
    patches = {space.translate(registry_root_name(space, truth, Layout(future_profile())) + 7): b"X"}
    if export:
        kernel = Windows.open(DumpFile(dump)).kernel
        patches[space.translate(kernel.base + kernel.image.exports["CmCallbackGetKeyObjectIDEx"])] = b"\xC3"
    return patched_copy(dump, tmp_path / "noregistry.raw", patches)


def test_the_code_pair_is_used_and_said_so_when_no_key_chains_to_registry(guest_truth, tmp_path):
    directory, truth = guest_truth("future")
    windows = Windows.open(DumpFile(without_registry(directory, truth, tmp_path)))
    info = windows.info()
    for field, offset in zip((PARENT, NAME_BLOCK), (0x58, 0x60)):
        how = info.inferred[field]
        assert how.startswith(f"{offset:#x}: code: CmCallbackGetKeyObjectIDEx -> ") and "loaded at 0x" in how, how
        assert how.endswith("no single pair chains them to \\REGISTRY: the code's offset used"), how
    failed = [name for name, passed, _ in info.checks if not passed]
    assert failed == ["key control blocks: one ParentKcb/NameBlock pair chains every key to REGISTRY"]
    keys = [r.to_json() for r in windows.walk() if r.type == "Key"]      # their names fail, loudly
    assert keys and all(r["name"] is None and "do not chain up to the root" in r["problems"][0] for r in keys)


def test_the_shipped_pair_is_used_and_said_so_when_neither_way_works(guest_truth, tmp_path):
    directory, truth = guest_truth("future")
    info = Windows.open(DumpFile(without_registry(directory, truth, tmp_path, export=True))).info()
    for field in (PARENT, NAME_BLOCK):
        how = info.inferred[field]
        assert "NOT inferred (code: no walk up ParentKcb found behind CmCallbackGetKeyObjectIDEx" in how, how
        assert "taken from shipped profile 10.0.22631" in how and "key names may be wrong" in how


REAL_FORM = """bits 64
default rel
export:                     ; rdx = key body: the 24H2-like shape, the name built in a callee
    push rbx
    sub rsp, 20h
    mov rbx, [rdx + 8]
    call locking               ; calls with other arguments before it
    lea rcx, [rsp + 10h]
    call locking
    mov rcx, rbx
    lea rdx, [rsp + 18h]
    call build
    add rsp, 20h
    pop rbx
    ret
locking:
    ret
build:                      ; rcx = kcb: layered keys skipped up ParentKcb, then the name copied
    mov [rsp + 8], rbx
    push rsi
    sub rsp, 20h
    mov rsi, rcx
    xor ebx, ebx
.next:
    test rsi, rsi
    jz .done
.layer:
    test dword [rsi + 0B8h], 40000h
    jz .named
    cmp qword [rsi + 48h], 0
    je .named
    mov rsi, [rsi + 48h]
    jmp .layer
.named:
    mov rax, [rsi + 50h]
    movzx edx, word [rax + 18h]
    test dword [rax], 1
    jnz .compressed
    shr edx, 1
.compressed:
    add ebx, edx
    mov rsi, [rsi + 48h]
    jmp .next
.done:
    mov eax, ebx
    mov rbx, [rsp + 30h]
    add rsp, 20h
    pop rsi
    ret
"""


def test_a_real_builds_walk_with_its_inner_loop_over_layered_keys(tmp_path):
    """The loop shape of 1809+ CmpConstructNameFromKcbNameBlocks: a second loop skips layered
    keys through the same ParentKcb, and the chain is tested at the top; both loops give 0x48."""
    (tmp_path / "real.asm").write_text(REAL_FORM)
    subprocess.run(["nasm", "-f", "bin", "-o", "real.bin", "real.asm"], cwd=tmp_path, check=True)
    code = (tmp_path / "real.bin").read_bytes() + b"\xCC" * 0x200
    read = lambda va, size: code[va - BASE:va - BASE + size]   # noqa: E731
    walks = infer_keys.name_walks(read, BASE, {"CmCallbackGetKeyObjectIDEx": 0}, layouts.for_build(19041))
    assert {(w.parent, w.name_block) for w in walks} == {(0x48, 0x50)}
    assert len({w.parent_at for w in walks}) == 2          # the inner loop's load and the outer one's
