"""The workflow queries on the test guests' memory.raw against truth.json: the current
process of each vCPU, who holds an object, PspCidTable, free entries and their free-list
order, and the diff of two sets of records."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gdbhandles import diff, queries
from gdbhandles.engine import Windows
from gdbhandles.errors import BadHandle, HandleError
from gdbhandles.windows.memory import DumpFile


def registers(truth: dict) -> list[dict]:
    """The vCPUs as gdb would report them (CS from the privilege level)."""
    return [{"rip": v["rip"], "cs": 0x33 if v["cpl"] else 0x10, "cr3": v["cr3"], "gs_base": v["gs_base"],
             "k_gs_base": v["k_gs_base"]} for v in truth["vcpus"]]


def problems(windows: Windows) -> list:
    """Warnings other than the note that a layout has no full image names (the extra builds)."""
    return [w for w in windows.warnings if "full image names unknown" not in w.message]


def opened(profile: str, scenario: str, built_guest) -> tuple[Windows, dict]:
    directory = built_guest(profile, scenario)
    truth = json.loads((directory / "truth.json").read_text())
    return Windows.open(DumpFile(directory / "memory.raw"), registers=registers(truth)), truth


@pytest.mark.parametrize("profile,scenario", [("7601", "default"), ("19041", "kpti"), ("22000", "kpti")])
def test_current_process_of_each_vcpu(built_guest, profile, scenario):
    windows, truth = opened(profile, scenario, built_guest)
    for index, vcpu in enumerate(truth["vcpus"]):
        process, note = queries.current_process(windows, index)
        assert process.pid == vcpu["pid"]
        assert f"({vcpu['pid']})" in note and ("KERNEL_GS_BASE" in note) == bool(vcpu["cpl"])


class Patched:
    """A dump with one qword changed (what a guest could hold; the dump file stays as it is)."""

    def __init__(self, path, address: int, value: int):
        self.inner, self.address, self.value = DumpFile(path), address, value.to_bytes(8, "little")

    def read(self, paddr: int, size: int) -> bytes:
        data = bytearray(self.inner.read(paddr, size))
        for i, byte in enumerate(self.value):
            if paddr <= self.address + i < paddr + size:
                data[self.address + i - paddr] = byte
        return bytes(data)


def test_a_current_process_off_the_list_is_named_not_guessed(built_guest):
    windows, truth = opened("19041", "default", built_guest)
    layout, space = windows.kernel.layout, windows.kernel.space
    vcpu = truth["vcpus"][0]
    field = space.translate(vcpu["thread"] + layout.offset("_KTHREAD", "ApcState.Process"))
    stray = truth["processes"][-1]["threads"][0]["ethread"]         # an object that is no process
    directory = built_guest("19041", "default")
    patched = Windows.open(Patched(directory / "memory.raw", field, stray), registers=registers(truth))
    with pytest.raises(HandleError, match=rf"at {stray:#x}, is not on the active process list"):
        queries.current_process(patched)


@pytest.mark.parametrize("profile", ["7601", "9200", "19041", "22000"])
def test_cid_table_names_every_process_and_thread(built_guest, profile):
    windows, truth = opened(profile, "default", built_guest)
    records = queries.cid_all(windows)
    assert problems(windows) == []
    expected = {p["pid"]: ("Process", p["eprocess"], p["pid"], None) for p in truth["processes"]}
    expected.update({t["tid"]: ("Thread", t["ethread"], p["pid"], t["tid"])
                     for p in truth["processes"] for t in p["threads"]})
    assert {r.id: (r.type, r.object, r.pid, r.tid) for r in records} == expected
    names = {p["pid"]: p["name"] for p in truth["processes"]}
    assert all(r.process == names[r.pid] for r in records)
    thread = truth["processes"][-1]["threads"][0]
    assert queries.cid(windows, thread["tid"]).object == thread["ethread"]
    with pytest.raises(BadHandle, match="not in PspCidTable"):
        queries.cid(windows, max(expected) + 4)


@pytest.mark.parametrize("profile", ["7601", "9200", "9600", "19041", "22000"])
def test_free_entries_in_free_list_order(built_guest, profile):
    windows, truth = opened(profile, "default", built_guest)
    free = list(queries.free_entries(windows))
    assert problems(windows) == []
    for process in truth["processes"]:
        mine = [r for r in free if r.pid == process["pid"]]
        ordered = sorted((r for r in mine if r.free_position is not None), key=lambda r: r.free_position)
        assert [r.handle for r in ordered] == process["free_list"]
        assert {r.handle for r in mine} == set(process["free_list"])
    statuses = {(r.pid, r.handle): r.status for r in free}
    for item in truth["invalid"]:
        if item["reason"] in ("free", "never_allocated"):
            assert statuses[item["pid"], item["handle"]] == item["reason"]


def test_find_by_object_and_name(built_guest):
    windows, truth = opened("19041", "default", built_guest)
    pids: dict[int, set] = {}
    for record in truth["handles"]:
        pids.setdefault(record["object"], set()).add(record["pid"])
    shared = max(pids, key=lambda o: len(pids[o]))
    holders = [r for r in truth["handles"] if r["object"] == shared]
    assert len({r["pid"] for r in holders}) > 1
    assert [r.to_json() for r in windows.walk(object=shared)] == holders
    named = [r for r in truth["handles"] if r["type"] == "File" and "pagefile" in (r["name"] or "").lower()]
    assert [r.to_json() for r in windows.walk(type="File", name="PAGEFILE")] == named


def test_diff_reports_by_process():
    before = [{"pid": 8, "process": "a", "handle": 4, "object": 1, "type": "Event", "name": None,
               "granted_access": 1, "attributes": 0},
              {"pid": 12, "process": "b", "handle": 8, "object": 2, "type": "File", "name": "x",
               "granted_access": 1, "attributes": 0}]
    after = [dict(before[0], granted_access=3), dict(before[1], handle=12)]
    found = diff.compare(before, after)
    lines = diff.report(found, by_process=True).splitlines()
    assert [line[0] for line in lines[:-1]] == ["~", "-", "+"]
    assert lines[-1] == "1 added, 1 removed, 1 changed"
    assert diff.to_json(found)["changed"] == [{"old": before[0], "new": after[0]}]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gdbhandles.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_the_shell_has_find_cid_and_free_on_dumps(built_guest):
    directory = built_guest("19041", "default")
    truth = json.loads((directory / "truth.json").read_text())
    dump = str(directory / "memory.raw")
    process = truth["processes"][1]
    found = json.loads(cli("cid", "--dump", dump, str(process["pid"]), "--json").stdout)
    assert [(r["object"], r["type"]) for r in found] == [(process["eprocess"], "Process")]
    free = json.loads(cli("walk", "--dump", dump, str(process["pid"]), "--free", "--json").stdout)
    assert sorted((r for r in free if r["free_position"] is not None), key=lambda r: r["free_position"]) and \
        [r["handle"] for r in sorted(free, key=lambda r: r["free_position"])] == process["free_list"]
    named = [r for r in truth["handles"] if "pagefile" in (r["name"] or "").lower()]
    assert json.loads(cli("find", "--dump", dump, "--name", "PageFile", "--json").stdout) == named
    assert len(json.loads(cli("walk", "--dump", dump, "--json").stdout)) == len(truth["handles"])   # all
    result = cli("walk", "--dump", dump, "--free", "--type", "File")
    assert result.returncode == 2 and "--type and --name do not apply" in result.stderr
    result = cli("lookup", "--dump", dump, "0x4")
    assert result.returncode == 2 and "no current process" in result.stderr and "give a pid" in result.stderr
