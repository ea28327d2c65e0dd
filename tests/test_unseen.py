"""Kernels we have never seen: disassembly of varied code, layouts inferred from the kernel,
invariants checked before use, against truth.json (no QEMU).

The builder's `--code-variants random` draws, per guest, one of several equivalent encodings of
each exported function the engine reads (registers, cookie as xor/movzx/mov memory operand,
RIP-relative or through a `lea` register, reordering, chunks reached by a jump, a worker behind
a call and a tail jump, decoy loads, KiSwapProcess's CR3 write in six forms).
"""
from __future__ import annotations

import copy
import json
import random

import pytest

from gdbhandles import render
from gdbhandles.engine import Windows
from gdbhandles.windows import disasm, file_check, infer, infer_cpu, layouts
from gdbhandles.windows.memory import AddressSpace, DumpFile, PhysicalMemory

from test_engine_guests import check_handles, check_lookups, check_processes, cli, patched_copy, short_names
from winguest.kernel_image import build_kernel_image
from winguest.profiles import Layout, all_profiles

BASE = 0xFFFFF8016E800000
PROFILES = [p["version"] for p in layouts.shipped_profiles()]
SEEDS = range(4)
INFERRED = ("_EPROCESS.UniqueProcessId", "_EPROCESS.ActiveProcessLinks", "_EPROCESS.ImageFileName",
            "_EPROCESS.ObjectTable", "_EPROCESS.Pcb.DirectoryTableBase", "_ETHREAD.Cid",
            "_KTHREAD.ApcState.Process", "_KPCR.Prcb.CurrentThread")

BOTH_WAYS_OFFLINE = ("_EPROCESS.UniqueProcessId", "_EPROCESS.ImageFileName", "_EPROCESS.ObjectTable",
                     "_EPROCESS.Pcb.DirectoryTableBase", "_ETHREAD.Cid", "_CM_KEY_CONTROL_BLOCK.ParentKcb",
                     "_CM_KEY_CONTROL_BLOCK.NameBlock")   # + CurrentThread with registers


def image_reader(image):
    return lambda va, size: bytes(image.data[va - BASE:va - BASE + size])


def exported(image, read, name):
    return disasm.traces(read, BASE + image.exports[name])


def first(pairs):
    return [address for address, _ in pairs]


@pytest.mark.parametrize("profile", [p for _, p in all_profiles()], ids=lambda p: p["version"])
def test_disassembly_finds_every_global_in_every_variant(profile):
    forms = set()
    for seed in SEEDS:
        image = build_kernel_image(profile, guid="0" * 32, age=1, base=BASE, rng=random.Random(seed),
                                   code_variants=True)
        read, va = image_reader(image), lambda name: BASE + image.symbols[name]  # noqa: E731
        forms.update(f"{k}={v}" for k, v in image.code_forms.items())
        assert va("PspCidTable") in first(disasm.constant_loads(exported(image, read, "PsLookupProcessByProcessId"), 8))
        get_type = exported(image, read, "ObGetObjectType")
        assert first(disasm.indexed_tables(get_type, 8)) == [va("ObTypeIndexTable")]
        cookies = first(disasm.constant_loads(get_type, 1))
        assert cookies == ([va("ObHeaderCookie")] if Layout(profile).has_cookie else [])
        assert first(disasm.indexed_tables(exported(image, read, "ObQueryNameString"), 1)) == \
            [va("ObpInfoMaskToOffset")]
        assert va("ObpKernelHandleTable") in first(disasm.constant_loads(
            exported(image, read, "ObReferenceObjectByHandle"), 8))
        pid = disasm.field_reads(exported(image, read, "PsGetProcessId")[:1], ("arg", 0), 8)
        assert pid[0][0] == Layout(profile).off("_EPROCESS", "UniqueProcessId")
        assert cr3_written(image, read)[0] == Layout(profile).off("_EPROCESS", "Pcb.DirectoryTableBase")
    assert len(forms) >= 6, forms


def cr3_written(image, read):
    """What the engine reads from KeStackAttachProcess -> KiAttachProcess -> KiSwapProcess."""
    return infer_cpu.dtb_written(disasm.traces(read, BASE + image.exports["KeStackAttachProcess"], 2))


@pytest.mark.parametrize("profile", PROFILES)
def test_infer_mode_equals_truth_on_every_profile(guest_truth, profile):
    directory, truth = guest_truth(profile)
    windows = Windows.open(DumpFile(directory / "memory.raw"), layout="infer")
    info = windows.info()
    assert info.profile.startswith("inferred")
    assert set(INFERRED) <= set(info.inferred), info.inferred
    assert all("code:" in info.inferred[f] and "live:" in info.inferred[f] for f in BOTH_WAYS_OFFLINE), info.inferred
    truth = short_names(truth)          # SeAuditProcessCreationInfo is not inferred
    check_processes(windows, truth)
    check_handles(windows, truth)
    check_lookups(windows, truth, every=29)
    failed = [c for c in info.checks if not c[1]]
    assert not failed and len(info.checks) >= 10, info.checks
    assert file_check_ran(info)


def file_check_ran(info):
    """The _FILE_OBJECT check ran on live File objects (a layout not shipped for this GUID)."""
    [(_, passed, detail)] = [c for c in info.checks if c[0] == file_check.CHECK_NAME]
    return passed and detail.startswith("16 File objects (the first at 0xffff") and \
        "), 16 with a name at FileName (+0x58)" in detail


@pytest.mark.parametrize("profile", ["7601", "9200", "9600", "10586", "14393", "17763", "19041", "22000",
                                     "22631"])
@pytest.mark.parametrize("layout", ["auto", "infer"])
def test_varied_code_guests_equal_truth(guest_truth, profile, layout):
    directory, truth = guest_truth(profile, guid="random", code_variants="random")
    assert truth["code_forms"]
    windows = Windows.open(DumpFile(directory / "memory.raw"), layout=layout)
    info = windows.info()
    for name in ("PspCidTable", "ObTypeIndexTable", "ObpKernelHandleTable"):
        assert info.globals[name] == truth["globals"][name], name
        assert "checked" in info.sources[name]
    assert info.header_cookie == truth["header_cookie"]
    if layout == "infer":               # SeAuditProcessCreationInfo is not inferred
        truth = short_names(truth)
        how = info.inferred["_EPROCESS.Pcb.DirectoryTableBase"]
        assert how.startswith("0x28: code: KeStackAttachProcess") and "live:" in how, truth["code_forms"]
    check_processes(windows, truth)
    check_handles(windows, truth)
    assert all(passed for _, passed, _ in info.checks), info.checks
    assert file_check_ran(info)


def test_future_build_is_read_by_inference_alone(guest_truth):
    directory, truth = guest_truth("future")
    assert truth["profile"]["build"] > max(p["build"] for p in layouts.shipped_profiles())
    assert layouts.for_guid(truth["profile"]["guid"], truth["profile"]["age"]) is None
    assert truth["code_forms"]                                  # its exports in varied encodings
    windows = Windows.open(DumpFile(directory / "memory.raw"))  # auto: nothing shipped fits, so inferred
    info = windows.info()
    assert info.profile.startswith("inferred") and "22631" in info.profile
    assert set(INFERRED) <= set(info.inferred)
    assert all("code:" in info.inferred[f] and "live:" in info.inferred[f] for f in BOTH_WAYS_OFFLINE)
    truth = short_names(truth)          # SeAuditProcessCreationInfo is not inferred
    check_processes(windows, truth)
    check_handles(windows, truth)
    check_lookups(windows, truth)
    assert all(passed for _, passed, _ in info.checks) and len(info.checks) >= 14, info.checks
    assert file_check_ran(info)
    text = render.info_text(info)
    assert f"checks       {len(info.checks)} of {len(info.checks)} passed" in text
    assert "_CM_KEY_CONTROL_BLOCK.ParentKcb" in text and "\\REGISTRY" in text


def instruction_reading_the_cookie(windows):
    kernel = windows.kernel
    found = disasm.traces(kernel.space.read, kernel.base + kernel.image.exports["ObGetObjectType"])
    access = next(a for t in found for a in t.accesses if a.size == 1 and a.constant is not None)
    size = next(len(i.bytes) for i in disasm._engine.disasm(kernel.space.read(access.at, 16), access.at))
    return access.at, size


def test_cookie_found_by_trial_when_the_code_reads_none(guest_truth, tmp_path):
    directory, truth = guest_truth("19041", guid="random", code_variants="random")
    dump = directory / "memory.raw"
    at, size = instruction_reading_the_cookie(Windows.open(DumpFile(dump)))
    space = AddressSpace(PhysicalMemory(DumpFile(dump)), truth["kernel_dtb"])
    copy = patched_copy(dump, tmp_path / "nocookie.raw", {space.translate(at): b"\x90" * size})
    windows = Windows.open(DumpFile(copy))
    info = windows.info()
    assert info.header_cookie == truth["header_cookie"]
    assert info.globals["ObHeaderCookie"] is None and "trying all 256" in info.sources["ObHeaderCookie"]
    check_handles(windows, truth)


def test_a_wrong_cookie_fails_its_check_and_the_walk_says_so_once(guest_truth, tmp_path):
    directory, truth = guest_truth("19041")                           # real GUID: the cookie's address is shipped
    dump = directory / "memory.raw"
    space = AddressSpace(PhysicalMemory(DumpFile(dump)), truth["kernel_dtb"])
    wrong = (truth["header_cookie"] ^ 0x5A).to_bytes(1, "little")
    copy = patched_copy(dump, tmp_path / "badcookie.raw", {space.translate(truth["globals"]["ObHeaderCookie"]): wrong})
    windows = Windows.open(DumpFile(copy))
    failed = [name for name, passed, _ in windows.info().checks if not passed]
    assert any("cookie" in name for name in failed) and any("Type" in name for name in failed)
    records = [r.to_json() for r in windows.walk()]
    untyped = [r for r in records if r["type"] is None]
    assert len(untyped) > len(records) // 2 and all(r["problems"] for r in untyped)
    [warning] = [w for w in windows.warnings if "no known object type" in w.message]
    assert "set handle profile" in warning.message and "cookie" in warning.message


def test_cli_layout_infer(guest_truth):
    directory, truth = guest_truth("9600")
    result = cli("walk", "--dump", str(directory / "memory.raw"), "--layout", "infer", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == short_names(truth)["handles"]     # no full image names inferred
    result = cli("info", "--dump", str(directory / "memory.raw"), "--layout", "infer")
    assert "inferred offsets" in result.stdout and "_EPROCESS.ObjectTable" in result.stdout
    assert "checks       " in result.stdout and "FAILED" not in result.stdout


def test_a_global_not_located_is_named_with_its_cost(guest_truth, tmp_path):
    directory, truth = guest_truth("19041", guid="random", code_variants="random")
    dump = directory / "memory.raw"
    windows = Windows.open(DumpFile(dump))
    kernel = windows.kernel
    lookup = kernel.base + kernel.image.exports["PsLookupProcessByProcessId"]
    space = AddressSpace(PhysicalMemory(DumpFile(dump)), truth["kernel_dtb"])
    copy = patched_copy(dump, tmp_path / "nocid.raw", {space.translate(lookup): b"\xC3"})   # ret: no code
    windows = Windows.open(DumpFile(copy))
    info = windows.info()
    assert info.globals["PspCidTable"] is None and "no id lookups" in info.sources["PspCidTable"]
    check_handles(windows, truth)


def test_every_encoding_is_drawn_and_read():
    """Over enough seeds every form of every function appears, and each one is read right."""
    from winguest.code_variants import COOKIE_FORMS, SWAP_FORMS
    profile = next(p for _, p in all_profiles() if p["build"] == 19041)
    drawn = set()
    for seed in range(40):
        image = build_kernel_image(profile, guid="0" * 32, age=1, base=BASE, rng=random.Random(seed),
                                   code_variants=True)
        read = image_reader(image)
        get_type = exported(image, read, "ObGetObjectType")
        assert first(disasm.constant_loads(get_type, 1)) == [BASE + image.symbols["ObHeaderCookie"]]
        assert first(disasm.indexed_tables(get_type, 8)) == [BASE + image.symbols["ObTypeIndexTable"]]
        disp, at, bits = cr3_written(image, read)
        assert disp == 0x28 and bits == image.code_forms["KiSwapProcess"].startswith("kpti"), image.code_forms
        drawn.update(f"{k}={v}" for k, v in image.code_forms.items())
    swaps = [form.split("=")[1].split("+") for form in drawn if form.startswith("KiSwapProcess=")]
    assert {parts[0] for parts in swaps} == set(SWAP_FORMS)
    assert {part for parts in swaps for part in parts[1:]} == {"chunk", "inverted", "tail-jump"}
    drawn = {form for form in drawn if not form.startswith("KiSwapProcess=")}
    shared = {form for form in drawn if form.endswith("+shared-epilogue")}
    assert {form.split("=")[0] for form in shared} == {"PspCidTable", "ObpKernelHandleTable"}
    drawn |= {form.removesuffix("+shared-epilogue") for form in shared}
    wanted = {f"ObGetObjectType={form}{chunk}" for form in COOKIE_FORMS for chunk in ("", "+chunk")}
    wanted |= {f"PspCidTable={form}" for form in ("rip", "copy", "lea", "rip+decoy", "copy+decoy", "lea+decoy",
                                                   "worker")}
    wanted |= {"ObpKernelHandleTable=rip", "ObpKernelHandleTable=lea", "ObpKernelHandleTable=copy",
               "ObpInfoMaskToOffset=base-first", "ObpInfoMaskToOffset=index-first"}
    assert wanted <= drawn, wanted - drawn


def isf_moved(directory, tmp_path, struct, member, delta):
    """The guest's symbols.json with one member moved by `delta` bytes (a layout that does not fit)."""
    isf = json.loads((directory / "symbols.json").read_text())
    isf["user_types"][struct]["fields"][member]["offset"] += delta
    path = tmp_path / "moved.json"
    path.write_text(json.dumps(isf))
    return str(path)


@pytest.mark.parametrize("struct, member, types", [
    ("_OBJECT_HEADER_NAME_INFO", "Name", {"File", "Event"}),
    ("_CM_KEY_BODY", "KeyControlBlock", {"Key"}),
    ("_CM_KEY_CONTROL_BLOCK", "NameBlock", {"Key"})])
def test_names_that_fail_give_one_summary_line(guest_truth, tmp_path, struct, member, types):
    directory, truth = guest_truth("19041", guid="random")
    windows = Windows.open(DumpFile(directory / "memory.raw"), isf=isf_moved(directory, tmp_path, struct, member, 8))
    records = [r.to_json() for r in windows.walk()]
    wanted = {(h["pid"], h["handle"]): h["name"] for h in truth["handles"]}
    lost = [r for r in records if r["name"] is None and wanted[(r["pid"], r["handle"])] is not None]
    assert {r["type"] for r in lost} >= types and len(lost) > len(records) // 20
    assert all(any("unknown" in p for p in r["problems"]) for r in lost)      # never a bare null name
    [summary] = [w.message for w in windows.warnings if "object names could not be decoded" in w.message]
    assert summary.startswith(f"{len(lost)} of ") and "set handle profile FILE" in summary
    assert "--profile FILE" in summary and all(t in summary for t in types)
    one_by_one = [w for w in windows.warnings if w.message.startswith("name of ")]
    assert len(one_by_one) == 8 and "not listed one by one" in summary


@pytest.mark.parametrize("member, delta", [("FileName", 0x10), ("FileName", 8), ("DeviceObject", 8)])
def test_a_file_object_layout_that_does_not_fit_fails_its_check_and_no_file_is_named(guest_truth, tmp_path,
                                                                                     member, delta):
    """FileName on CurrentByteOffset (zeros: every name empty, only the device path left), on the
    Buffer pointer's bytes (ill-formed strings), DeviceObject on Vpb (no device): caught on live
    File objects, said in one line, and every File record says why its name is null."""
    directory, truth = guest_truth("19041", guid="random")
    windows = Windows.open(DumpFile(directory / "memory.raw"),
                           isf=isf_moved(directory, tmp_path, "_FILE_OBJECT", member, delta))
    records = [r.to_json() for r in windows.walk()]
    files = [r for r in records if r["type"] == "File"]
    assert files and all(r["name"] is None and "_FILE_OBJECT of the layout" in r["problems"][0] for r in files)
    others = [{k: v for k, v in r.items() if k != "problems"} for r in records if r["type"] != "File"]
    assert others == [h for h in truth["handles"] if h["type"] != "File"]
    [warning] = windows.warnings
    assert warning.message.startswith("File names unknown: _FILE_OBJECT of the layout (") and \
        "does not fit this kernel: 16 File objects (the first at 0xffff" in warning.message
    assert f"with a name at FileName (+{0x58 + delta if member == 'FileName' else 0x58:#x})" in warning.message
    assert "set handle profile FILE" in warning.message and "--profile FILE" in warning.message
    [check] = [c for c in windows.info().checks if c[0] == file_check.CHECK_NAME]
    assert not check[1] and check[2] in warning.message, check


def test_an_inferred_layout_whose_file_object_does_not_fit_is_caught(guest_truth, monkeypatch):
    """`future`: the _FILE_OBJECT the inference borrows from the nearest shipped layout, with
    FileName moved onto CurrentByteOffset, is caught on live data like a user's ISF is."""
    directory, truth = guest_truth("future")
    nearest = infer.nearest_base

    def moved(build):
        base = nearest(build)
        profile = copy.deepcopy(base.profile)
        profile["structs"]["_FILE_OBJECT"]["fields"]["FileName"]["offset"] += 0x10
        return layouts.ProfileLayout(profile, base.source, None)
    monkeypatch.setattr(infer, "nearest_base", moved)
    windows = Windows.open(DumpFile(directory / "memory.raw"))
    info = windows.info()
    assert info.profile.startswith("inferred")
    [check] = [c for c in info.checks if c[0] == file_check.CHECK_NAME]
    assert not check[1] and "0 with a name at FileName (+0x68)" in check[2]
    files = [r.to_json() for r in windows.walk() if r.type == "File"]
    assert files and all(r["name"] is None and r["problems"] for r in files)
    [warning] = [w.message for w in windows.warnings if w.message.startswith("File names unknown")]
    assert "_FILE_OBJECT of the layout (inferred" in warning and "set handle profile FILE" in warning


def test_the_file_object_check_runs_only_when_the_layout_is_not_the_kernels_own(guest_truth):
    directory, truth = guest_truth("19041")               # its PDB GUID is shipped: no check, no reads for it
    windows = Windows.open(DumpFile(directory / "memory.raw"))
    assert not [c for c in windows.info().checks if c[0] == file_check.CHECK_NAME]
    directory, truth = guest_truth("19041", guid="random")        # the same build's layout, another GUID
    windows = Windows.open(DumpFile(directory / "memory.raw"))
    check_handles(windows, truth)
    assert file_check_ran(windows.info())


def test_a_few_damaged_names_give_no_summary(guest_truth):
    directory, truth = guest_truth("19041", corrupt=("name-odd",))
    windows = Windows.open(DumpFile(directory / "memory.raw"))
    list(windows.walk())
    assert [w for w in windows.warnings if w.message.startswith("name of ")]
    assert not [w for w in windows.warnings if "object names could not be decoded" in w.message]


def vcpu_registers(truth):
    """What gdb gives per vCPU, as far as finding its KPCR needs (GS bases and CS)."""
    return [{"gs_base": v["gs_base"], "k_gs_base": v["k_gs_base"], "cs": 0x10 if v["cpl"] == 0 else 0x33}
            for v in truth["vcpus"]]


def dtb_load(windows):
    """(address, length) of the instruction loading [process+DirectoryTableBase] on
    KeStackAttachProcess's path to CR3 (in whichever form the guest drew)."""
    kernel = windows.kernel
    found = disasm.traces(kernel.space.read, kernel.base + kernel.image.exports["KeStackAttachProcess"], 2)
    at = next(a.at for t in found if t.cr3 for a in t.accesses
              if a.base and a.base[0] == "arg" and a.disp == 0x28 and not a.lea)
    return at, next(len(i.bytes) for i in disasm._engine.disasm(kernel.space.read(at, 16), at))


def test_directory_table_base_two_ways_and_their_disagreement(guest_truth, tmp_path):
    directory, truth = guest_truth("19041", guid="random", code_variants="random")
    dump = directory / "memory.raw"
    windows = Windows.open(DumpFile(dump), layout="infer")
    how = windows.info().inferred["_EPROCESS.Pcb.DirectoryTableBase"]
    assert how.startswith("0x28: code: KeStackAttachProcess -> CR3 written at") and "live: the only slot" in how
    space = AddressSpace(PhysicalMemory(DumpFile(dump)), truth["kernel_dtb"])
    at, size = dtb_load(windows)                    # mov rax, [rcx+28h] (or another form): disp8 made 30h
    assert space.read(at + size - 1, 1) == b"\x28"
    copy = patched_copy(dump, tmp_path / "wrongdtb.raw", {space.translate(at + size - 1): b"\x30"})
    windows = Windows.open(DumpFile(copy), layout="infer")
    info = windows.info()
    [check] = [c for c in info.checks if c[0].startswith("_EPROCESS.Pcb.DirectoryTableBase")]
    assert not check[1] and "0x30 (code: KeStackAttachProcess" in check[2] and "vs 0x28 (live:" in check[2]
    assert info.inferred["_EPROCESS.Pcb.DirectoryTableBase"].startswith("0x28: live:")     # live data wins
    check_processes(windows, short_names(truth))


def test_current_thread_two_ways_on_every_vcpu(guest_truth):
    directory, truth = guest_truth("future", scenario="kpti")
    assert len(truth["vcpus"]) == 2
    windows = Windows.open(DumpFile(directory / "memory.raw"), vcpu_registers(truth))
    info = windows.info()
    how = info.inferred["_KPCR.Prcb.CurrentThread"]
    assert how.startswith("0x188: code: PsGetCurrentProcess") and "live: in 2 vCPU(s)' KPCR" in how
    assert [c[1] for c in info.checks if c[0].startswith("_KPCR.Prcb.CurrentThread")] == [True]
    for index, vcpu in enumerate(truth["vcpus"]):
        record = windows.lookup(vcpu["pid"], -2, vcpu=index)
        assert record.object == vcpu["thread"] and record.type == "Thread"


def test_current_thread_from_ke_get_current_thread_when_ps_get_current_process_is_gone(guest_truth, tmp_path):
    directory, truth = guest_truth("future")
    dump = directory / "memory.raw"
    kernel = Windows.open(DumpFile(dump)).kernel
    space = AddressSpace(PhysicalMemory(DumpFile(dump)), truth["kernel_dtb"])
    gone = {space.translate(kernel.base + kernel.image.exports[name]): b"\xC3"      # ret: no code to read
            for name in ("PsGetCurrentProcess", "IoGetCurrentProcess")}
    windows = Windows.open(DumpFile(patched_copy(dump, tmp_path / "nocurrent.raw", gone)), vcpu_registers(truth))
    info = windows.info()
    assert info.inferred["_KPCR.Prcb.CurrentThread"].startswith("0x188: code: KeGetCurrentThread returns gs:[0x188]")
    assert "live: in 1 vCPU(s)' KPCR" in info.inferred["_KPCR.Prcb.CurrentThread"]
    assert info.inferred["_KTHREAD.ApcState.Process"].startswith(f"{0xb8:#x}: live:")
    assert all(passed for _, passed, _ in info.checks), info.checks
    vcpu = truth["vcpus"][0]
    assert windows.lookup(vcpu["pid"], -1).object == next(p["eprocess"] for p in truth["processes"]
                                                          if p["pid"] == vcpu["pid"])


def test_directory_table_base_from_shipped_layouts_when_no_code_writes_cr3(guest_truth, tmp_path):
    directory, truth = guest_truth("future")
    dump = directory / "memory.raw"
    kernel = Windows.open(DumpFile(dump)).kernel
    space = AddressSpace(PhysicalMemory(DumpFile(dump)), truth["kernel_dtb"])
    attach = space.translate(kernel.base + kernel.image.exports["KeStackAttachProcess"])
    windows = Windows.open(DumpFile(patched_copy(dump, tmp_path / "noattach.raw", {attach: b"\xC3"})))
    info = windows.info()
    how = info.inferred["_EPROCESS.Pcb.DirectoryTableBase"]
    assert how.startswith(f"0x28: shipped layouts: the same offset in all {len(PROFILES)} profiles; live:"), how
    assert all(passed for _, passed, _ in info.checks), info.checks
    check_processes(windows, short_names(truth))


def test_a_wrong_current_thread_read_is_caught_by_the_kpcrs(guest_truth, tmp_path):
    directory, truth = guest_truth("future", scenario="kpti")
    dump = directory / "memory.raw"
    kernel = Windows.open(DumpFile(dump)).kernel
    space = AddressSpace(PhysicalMemory(DumpFile(dump)), truth["kernel_dtb"])
    at = kernel.base + kernel.image.exports["PsGetCurrentProcess"]
    assert space.read(at, 9) == bytes.fromhex("65488b042588010000")      # mov rax, gs:[188h]
    copy = patched_copy(dump, tmp_path / "wrongcurrent.raw", {space.translate(at + 5): b"\x90"})   # gs:[190h]
    windows = Windows.open(DumpFile(copy), vcpu_registers(truth))
    info = windows.info()
    [check] = [c for c in info.checks if c[0].startswith("_KPCR.Prcb.CurrentThread")]
    assert not check[1] and check[2].startswith("0x190 (code: PsGetCurrentProcess") and "vs 0x188 (live:" in check[2]
    assert info.inferred["_KPCR.Prcb.CurrentThread"].startswith("0x188: live:")
    for index, vcpu in enumerate(truth["vcpus"]):
        assert windows.lookup(vcpu["pid"], -2, vcpu=index).object == vcpu["thread"]


@pytest.mark.parametrize("kind", ["process-loop", "process-dangling"])
def test_inference_survives_a_damaged_process_list(guest_truth, kind):
    directory, truth = guest_truth("19041", corrupt=(kind,))
    windows = Windows.open(DumpFile(directory / "memory.raw"), vcpu_registers(truth), layout="infer")
    info = windows.info()
    failed = [name for name, passed, _ in info.checks if not passed]
    assert any(name.startswith("process list") for name in failed), info.checks
    assert not [name for name in failed if "agree" in name], info.checks      # both ways still agree
    assert "live:" in info.inferred["_EPROCESS.Pcb.DirectoryTableBase"]
    assert "live:" in info.inferred["_KPCR.Prcb.CurrentThread"]
    assert list(windows.walk())
