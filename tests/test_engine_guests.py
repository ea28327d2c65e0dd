"""The engine on the test guests' memory.raw, from the dump alone, against truth.json.

Every shipped profile (both data files) in the default scenario, the other scenarios on a
few builds, the three ways of finding globals (shipped RVAs, a user's ISF, disassembly),
and errors provoked on damaged copies of real dumps.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from gdbhandles.windows import layouts
from gdbhandles.engine import Windows
from gdbhandles.errors import Advice, BadHandle, NotWindows, ProcessNotFound
from gdbhandles.windows.memory import AddressSpace, DumpFile, PhysicalMemory

PROFILES = [p["version"] for p in layouts.shipped_profiles()]
EXTRA = {p["version"] for p in layouts.shipped_profiles() if p["file"] == "extra"}
PROCESS_FIELDS = ("pid", "name", "image_file_name", "image_path", "eprocess", "dtb", "handle_table",
                  "table_code", "level", "next_handle_needing_pool")


class Guest:
    def __init__(self, directory):
        self.dir = directory
        self.truth = json.loads((directory / "truth.json").read_text())
        self.dump = directory / "memory.raw"

    def open(self, **kw) -> Windows:
        return Windows.open(DumpFile(self.dump), **kw)


@pytest.fixture(scope="module")
def guests(built_guest):
    cache = {}

    def get(profile="19041", scenario="default", seed=0, guid=None) -> Guest:
        key = (profile, scenario, seed, guid)
        if key not in cache:
            cache[key] = Guest(built_guest(profile, scenario, seed, guid))
        return cache[key]
    return get


def check_processes(windows, truth):
    mine = [{k: getattr(r, k) for k in PROCESS_FIELDS} for r in windows.processes()]
    assert mine == [{k: p[k] for k in PROCESS_FIELDS} for p in truth["processes"]]


def short_names(truth):
    """The truth as a layout without SeAuditProcessCreationInfo reads it: 15-byte process names."""
    short = {p["pid"]: p["image_file_name"] for p in truth["processes"]}
    full = {f"{p['name']}({p['pid']})": f"{p['image_file_name']}({p['pid']})" for p in truth["processes"]}
    return {**truth,
            "processes": [{**p, "name": p["image_file_name"], "image_path": None} for p in truth["processes"]],
            "handles": [{**h, "process": short[h["pid"]], "name": full.get(h["name"], h["name"])
                         if h["type"] == "Process" else h["name"]} for h in truth["handles"]]}


def check_handles(windows, truth):
    mine = [r.to_json() for r in windows.walk()]
    assert len(mine) == len(truth["handles"])
    assert mine == truth["handles"]
    if not any(p["image_path"] for p in truth["processes"]):     # a layout without full image names
        [note] = windows.warnings
        assert note.pid is None and "no _EPROCESS.SeAuditProcessCreationInfo.ImageFileName" in note.message
    else:
        assert windows.warnings == []


def check_lookups(windows, truth, every=7):
    for item in truth["invalid"]:
        with pytest.raises(BadHandle) as error:
            windows.lookup(item["pid"], item["handle"])
        assert error.value.record.status == item["reason"], item
    for record in truth["handles"][::every]:
        found = windows.lookup(record["pid"], record["handle"] | 3)      # tag bits ignored
        assert found.to_json() == record
    for record in [h for h in truth["handles"] if h["pid"] == 4][:5]:   # kernel handles, both spellings
        assert windows.lookup(4, record["handle"] | 0x80000000).to_json() == record
        other = truth["processes"][-1]["pid"]
        assert windows.lookup(other, record["handle"] | 0xFFFFFFFF80000000).to_json() == record


def check_discovery(windows, truth):
    info = windows.info()
    assert info.build == truth["profile"]["build"]
    assert (info.guid, info.age) == (truth["profile"]["guid"], truth["profile"]["age"])
    assert info.kernel_base == truth["kernel_base"]
    assert info.dtb == truth["kernel_dtb"]
    for name, address in info.globals.items():
        if address is not None and name in truth["globals"]:
            assert address == truth["globals"][name], name
    assert info.header_cookie == truth["header_cookie"]
    return info


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_default_scenario(guests, profile):
    guest = guests(profile)
    windows = guest.open()
    info = check_discovery(windows, guest.truth)
    how = "disassembly" if profile in EXTRA else "shipped RVA"
    assert how in info.sources["PspCidTable"] and how in info.sources["ObTypeIndexTable"]
    check_processes(windows, guest.truth)
    check_handles(windows, guest.truth)
    check_lookups(windows, guest.truth)


@pytest.mark.parametrize("profile,scenario", [("7601", "level2"), ("19041", "level2"), ("22000", "level2"),
                                              ("19041", "churn"), ("9600", "kpti"), ("19041", "kpti")])
def test_scenarios(guests, profile, scenario):
    guest = guests(profile, scenario)
    windows = guest.open()
    check_discovery(windows, guest.truth)
    check_processes(windows, guest.truth)
    check_handles(windows, guest.truth)
    check_lookups(windows, guest.truth, every=31)
    if scenario == "level2":
        assert max(p["level"] or 0 for p in guest.truth["processes"]) == 2


def test_big(guests):
    guest = guests("19041", "big")
    windows = guest.open()
    assert len(guest.truth["processes"]) >= 200 and len(guest.truth["handles"]) >= 50000
    check_handles(windows, guest.truth)
    stats = windows.info().stats
    # reads gather many objects: far fewer backend reads than handles
    assert stats.round_trips < len(guest.truth["handles"]) / 5


def registers_of(truth):
    """What gdb reports per vCPU, from the truth's record of how the guest was started."""
    return [{"cs": 0x10 if v["cpl"] == 0 else 0x33, "cr3": v["cr3"], "gs_base": v["gs_base"],
             "k_gs_base": v["k_gs_base"], "rip": v.get("rip", 0)} for v in truth["vcpus"]]


@pytest.mark.parametrize("profile", ["19041", "9600", "22000"])
def test_pseudo_handles_for_each_vcpu(guests, profile):
    guest = guests(profile, "kpti")
    truth = guest.truth
    eprocess = {p["pid"]: p for p in truth["processes"]}
    registers = registers_of(truth)
    for selected in range(len(registers)):
        # gdb lists the selected vCPU first
        order = [registers[selected]] + registers[:selected] + registers[selected + 1:]
        windows = guest.open(registers=order)
        assert windows.info().dtb == truth["kernel_dtb"]
        vcpu = truth["vcpus"][selected]
        process = windows.lookup(vcpu["pid"], -1)
        assert process.object == eprocess[vcpu["pid"]]["eprocess"]
        assert process.name == f"{eprocess[vcpu['pid']]['name']}({vcpu['pid']})"
        assert process.pid == vcpu["pid"] and "current process of vCPU 0" in process.note
        thread = windows.lookup(vcpu["pid"], -2)
        assert (thread.object, thread.type, thread.name) == (vcpu["thread"], "Thread", str(vcpu["tid"]))
        other = next(p for p in truth["processes"] if p["pid"] != vcpu["pid"])
        for pseudo in (-1, -2):        # a pid that is not the vCPU's current process is refused
            with pytest.raises(BadHandle, match=f"give pid {vcpu['pid']}"):
                windows.lookup(other["pid"], pseudo)


def test_disassembly_finds_globals_of_an_unknown_guid(guests):
    guest = guests("19041", guid="random")
    windows = guest.open()
    info = check_discovery(windows, guest.truth)
    for name in ("PspCidTable", "ObTypeIndexTable", "ObHeaderCookie", "ObpInfoMaskToOffset"):
        assert "disassembly" in info.sources[name], name
    assert "same build" in info.profile
    check_handles(windows, guest.truth)


def test_user_isf_supplies_symbols(guests):
    guest = guests("19041", guid="random")
    windows = guest.open(isf=str(guest.dir / "symbols.json"))
    info = check_discovery(windows, guest.truth)
    assert info.profile.startswith("ISF")
    for name in ("PspCidTable", "ObTypeIndexTable", "PsActiveProcessHead"):
        assert "ISF" in info.sources[name], name
    check_processes(windows, guest.truth)
    check_handles(windows, guest.truth)


# --- errors, provoked on real dumps -------------------------------------------------------

def patched_copy(source, target, patches):
    """A sparse copy of a dump with {physical address: bytes} written over it."""
    size = source.stat().st_size
    with open(source, "rb") as src, open(target, "wb") as dst:
        for offset in range(0, size, 1 << 20):
            chunk = src.read(1 << 20)
            if chunk.count(0) != len(chunk):
                dst.seek(offset)
                dst.write(chunk)
        dst.truncate(size)
        for address, data in patches.items():
            dst.seek(address)
            dst.write(data)
    return target


def physical(guest, va):
    return AddressSpace(PhysicalMemory(DumpFile(guest.dump)), guest.truth["kernel_dtb"]).translate(va)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "gdbhandles.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_wrong_dtb(guests):
    guest = guests("19041")
    with pytest.raises(NotWindows, match="no DTB maps") as exc:
        guest.open(dtb=guest.truth["kernel_dtb"] + 0x10000)
    assert exc.value.advice is Advice.LOCATE_KERNEL


def test_wiped_kernel_is_not_windows(guests, tmp_path):
    guest = guests("19041")
    base = physical(guest, guest.truth["kernel_base"])
    copy = patched_copy(guest.dump, tmp_path / "wiped.raw", {base: b"\0\0"})
    result = cli("ps", "--dump", str(copy))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not a Windows x64 guest" in result.stderr


def test_unknown_build_is_inferred_or_read_from_a_profile(guests, tmp_path):
    guest = guests("19041", guid="random")
    build = physical(guest, guest.truth["globals"]["NtBuildNumber"])
    copy = patched_copy(guest.dump, tmp_path / "unknown.raw", {build: struct.pack("<I", 0xF0000000 | 12345)})
    windows = Windows.open(DumpFile(copy))
    assert windows.info().profile.startswith("inferred")
    check_handles(windows, short_names(guest.truth))        # SeAuditProcessCreationInfo is not inferred
    windows = Windows.open(DumpFile(copy), isf=str(guest.dir / "symbols.json"))
    assert windows.info().build == 12345
    check_handles(windows, guest.truth)


def test_unreadable_table_page_is_reported_and_the_walk_goes_on(guests, tmp_path):
    guest = guests("19041")
    victim = next(p for p in guest.truth["processes"] if p["level"] == 1 and p["pid"] != 4)
    top = victim["table_code"] & ~3
    # the second low-level page now points at unmapped memory
    copy = patched_copy(guest.dump, tmp_path / "torn.raw",
                        {physical(guest, top + 8): struct.pack("<Q", 0xFFFF8F0000000000)})
    windows = Windows.open(DumpFile(copy))
    records = [r.to_json() for r in windows.walk()]
    lost = [h for h in guest.truth["handles"] if h["pid"] == victim["pid"] and 0x400 <= h["handle"] < 0x800]
    assert lost and records == [h for h in guest.truth["handles"] if h not in lost]
    [warning] = windows.warnings
    assert warning.pid == victim["pid"] and "0xffff8f0000000000" in warning.message


def test_process_errors(guests):
    windows = guests("19041").open()
    with pytest.raises(ProcessNotFound, match="pid 99999"):
        windows.lookup(99999, 4)
    names = [p["name"] for p in guests("19041").truth["processes"]]
    repeated = next(n for n in names if names.count(n) > 1)
    with pytest.raises(ProcessNotFound, match="give a pid"):
        windows.lookup(repeated, 4)


def test_cli_walk_lookup_ps_info(guests):
    guest = guests("19041")
    truth = guest.truth
    result = cli("walk", "--dump", str(guest.dump), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == truth["handles"]
    record = truth["handles"][10]
    result = cli("lookup", "--dump", str(guest.dump), str(record["pid"]), hex(record["handle"]), "--json")
    assert json.loads(result.stdout) == [record]
    name = truth["processes"][1]["name"]
    result = cli("walk", "--dump", str(guest.dump), name, "--type", "File")
    assert result.returncode == 0 and "File" in result.stdout
    result = cli("ps", "--dump", str(guest.dump))
    assert all(p["name"] in result.stdout for p in truth["processes"])
    result = cli("info", "--dump", str(guest.dump))
    assert f"{truth['kernel_base']:#018x}" in result.stdout
    free = next(i for i in truth["invalid"] if i["reason"] == "free")
    result = cli("lookup", "--dump", str(guest.dump), str(free["pid"]), hex(free["handle"]))
    assert result.returncode == 2 and "is free" in result.stderr and result.stderr.count("\n") == 1
