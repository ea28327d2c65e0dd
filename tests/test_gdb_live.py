"""The `handle` commands in a real gdb on live test guests under QEMU, compared with truth.json.

Each guest boots once per module (module-scoped fixtures) and one gdb serves all its tests.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from boot import booted                       # vm-images/, put on sys.path by conftest.py
from gdbhandles.automation.mi import Gdb, MiError
from winguest.cache import guest as cached_guest

pytestmark = pytest.mark.integration

GDBINIT = Path(__file__).resolve().parents[1] / "gdbinit.py"
KERNEL_BIT = 0x80000000
STATUS_WORDS = {"free": "is free", "never_allocated": "was never allocated",
                "past_end": "is past the end", "first_slot": "first slot"}

# (profile, scenario, guid): every shipped-symbol family, an extra-layout build found only by
# disassembly, and a kernel whose GUID matches no known build.
STANDARD = [("7601", "default", None), ("9600", "default", None), ("14393", "default", None),
            ("19041", "default", None), ("22000", "default", None), ("22621", "default", None),
            ("19041", "default", "random")]


@dataclass
class Live:
    gdb: Gdb
    truth: dict
    dir: Path

    def json(self, command: str):
        return self.gdb.json(command, timeout=600)

    def error(self, command: str) -> str:
        with pytest.raises(MiError) as exc:
            self.gdb.console(command, timeout=600)
        assert "Traceback" not in exc.value.log, exc.value.log
        return exc.value.message


@contextlib.contextmanager
def live_guest(profile: str, scenario: str, guid: str | None = None):
    directory = cached_guest(profile, scenario, 0, guid)
    truth = json.loads((directory / "truth.json").read_text())
    with booted(directory) as vm, Gdb(timeout=120) as gdb:
        gdb.source(str(GDBINIT))
        gdb.connect(vm.gdb)
        yield Live(gdb, truth, directory)


def key(record: dict) -> tuple[int, int]:
    return record["pid"], record["handle"]


def by_pid(truth: dict) -> dict[int, list[dict]]:
    result: dict[int, list[dict]] = {}
    for record in truth["handles"]:
        result.setdefault(record["pid"], []).append(record)
    return result


def sample(records: list[dict], count: int, seed: int = 1) -> list[dict]:
    """The first and last records plus a seeded random choice (the same on every run)."""
    if len(records) <= count:
        return records
    rest = random.Random(seed).sample(records[1:-1], count - 2)
    return [records[0], *rest, records[-1]]


@pytest.fixture(scope="module", params=STANDARD, ids=lambda p: "-".join(x for x in p if x))
def live(request):
    with live_guest(*request.param) as guest:
        yield guest


# --- every standard guest --------------------------------------------------------------------

def test_walk_all_equals_truth(live):
    records = live.json("handle walk all --json")
    assert sorted(records, key=key) == sorted(live.truth["handles"], key=key)


def test_ps_equals_truth(live):
    processes = live.json("handle ps --json")
    counts = {pid: len(records) for pid, records in by_pid(live.truth).items()}
    fields = ("pid", "name", "eprocess", "dtb", "handle_table", "table_code", "level",
              "next_handle_needing_pool")
    assert [{f: p[f] for f in fields} for p in processes] == \
        [{f: p[f] for f in fields} for p in live.truth["processes"]]
    assert {p["pid"]: p["handle_count"] for p in processes if p["handle_count"]} == counts
    assert processes[0]["pid"] == 4 and processes[0]["name"] == "System"


def test_lookups_of_valid_handles(live):
    for record in sample(live.truth["handles"], 25):
        assert live.json(f"handle lookup {record['pid']} {record['handle']:#x} --json") == [record]


def test_lookup_by_name_decimal_and_expression(live):
    counts: dict[str, int] = {}
    for process in live.truth["processes"]:
        counts[process["name"]] = counts.get(process["name"], 0) + 1
    record = next(r for r in live.truth["handles"] if counts[r["process"]] == 1 and r["pid"] != 4)
    assert live.json(f"handle lookup {record['process']} {record['handle']} --json") == [record]
    live.gdb.console(f"set $h = {record['handle']:#x}")
    assert live.json(f"handle lookup {record['pid']:#x} $h --json") == [record]


def test_tag_bits_are_ignored(live):
    record = live.truth["handles"][len(live.truth["handles"]) // 2]
    assert live.json(f"handle lookup {record['pid']} {record['handle'] | 3:#x} --json") == [record]


def test_kernel_handles_in_both_spellings(live):
    system = by_pid(live.truth)[4]
    other = next(p["pid"] for p in live.truth["processes"] if p["pid"] != 4)
    for record in sample(system, 3):
        assert live.json(f"handle lookup 4 {record['handle'] | KERNEL_BIT:#x} --json") == [record]
        spelled = 0xFFFFFFFF00000000 | KERNEL_BIT | record["handle"]
        assert live.json(f"handle lookup {other} {spelled:#x} --json") == [record]


def test_invalid_handles_are_reported_as_such(live):
    reasons = {}
    for entry in live.truth["invalid"]:
        reasons.setdefault(entry["reason"], []).append(entry)
    assert set(reasons) >= {"free", "never_allocated", "past_end", "first_slot"}
    for reason, entries in reasons.items():
        for entry in sample(entries, 3):
            message = live.error(f"handle lookup {entry['pid']} {entry['handle']:#x}")
            assert STATUS_WORDS[reason] in message and f"{entry['handle']:#x}" in message, message


def test_pseudo_handles_on_every_vcpu(live):
    check_pseudo_handles(live)


def check_pseudo_handles(live: Live) -> None:
    """-1/-2 are the current process/thread of the selected vCPU: the note says which, and a pid
    that is not that vCPU's current process is refused with the right one named."""
    processes = {p["pid"]: p for p in live.truth["processes"]}
    names = [p["name"] for p in live.truth["processes"]]
    try:
        for vcpu in live.truth["vcpus"]:
            live.gdb.console(f"thread {vcpu['index'] + 1}")
            owner = processes[vcpu["pid"]]
            thread = live.json(f"handle lookup {owner['pid']} -2 --json")[0]
            assert (thread["object"], thread["type"], thread["name"]) == \
                (vcpu["thread"], "Thread", str(vcpu["tid"])), vcpu
            current = live.json(f"handle lookup {owner['pid']} 0xffffffffffffffff --json")[0]
            assert (current["object"], current["type"], current["name"]) == \
                (owner["eprocess"], "Process", f"{owner['name']}({owner['pid']})"), vcpu
            text = live.gdb.console(f"handle lookup {owner['name'] if names.count(owner['name']) == 1 else owner['pid']} -1")
            assert f"current process of the selected vCPU (gdb thread {vcpu['index'] + 1})" in text, text
            other = next(p for p in live.truth["processes"] if p["pid"] != owner["pid"])
            message = live.error(f"handle lookup {other['pid']} -1")
            assert f"gdb thread {vcpu['index'] + 1}" in message and f"{owner['name']}({owner['pid']})" in message \
                and f"not in {other['name']}({other['pid']})" in message, message
    finally:
        live.gdb.console("thread 1")


def test_walk_filters(live):
    handles = live.truth["handles"]
    kind = handles[-1]["type"]
    try:
        for fast_path in ("auto", "off"):       # over the stub the type pass reads bridged pieces
            live.gdb.console(f"set handle fast-path {fast_path}")
            assert sorted(live.json(f"handle walk all --type {kind} --json"), key=key) == \
                sorted([r for r in handles if r["type"] == kind], key=key), fast_path
    finally:
        live.gdb.console("set handle fast-path auto")
    named = next(r for r in handles if r["name"] and len(r["name"]) > 3)
    part = named["name"][1:4]
    expected = [r for r in handles if r["name"] and part.lower() in r["name"].lower()]
    assert sorted(live.json(f'handle walk all --name "{part}" --json'), key=key) == sorted(expected, key=key)
    pid = handles[-1]["pid"]
    assert live.json(f"handle walk {pid} --json") == [r for r in handles if r["pid"] == pid]


def test_text_output_and_summary(live):
    pid = live.truth["handles"][-1]["pid"]
    count = len(by_pid(live.truth)[pid])
    text = live.gdb.console(f"handle walk {pid}")
    lines = text.strip().splitlines()
    assert lines[0].split() == ["PID", "Process", "Handle", "Object", "Type", "Access", "Attributes", "Name"]
    assert len(lines) == 2 + count + 1
    assert lines[-1].startswith(f"1 processes, {count} handles,")
    record = live.truth["handles"][-1]
    text = live.gdb.console(f"handle lookup {pid} {record['handle']:#x}")
    assert "status       valid" in text and f"{record['object']:#018x}" in text
    assert "PID" in live.gdb.console("handle ps").splitlines()[0]


def test_info_names_what_was_found(live):
    text = live.gdb.console("handle info")
    assert f"{live.truth['kernel_base']:#018x}" in text and f"{live.truth['kernel_dtb']:#x}" in text
    assert "guest RAM" in text and "the fast path" in text          # QEMU runs on this host
    for name in ("PsActiveProcessHead", "PspCidTable", "ObTypeIndexTable"):
        assert name in text
    live.gdb.console("set handle fast-path off")
    try:
        text = live.gdb.console("handle info")
        assert "guest RAM" in text and "Qqemu.PhyMemMode" in text
        assert "fast path not used: set handle fast-path off" in text
    finally:
        live.gdb.console("set handle fast-path auto")


def test_user_errors_are_one_line(live):
    assert live.error("handle lookup 99999 4").startswith("no process with pid 99999")
    assert "no process named nosuch.exe" in live.error("handle walk nosuch.exe")
    assert "not a number or expression" in live.error("handle lookup 4 $nosuch+")


def test_second_command_reuses_discovery_and_drops_memory_after_running(live):
    started = time.monotonic()
    live.gdb.console("handle ps")
    warm = time.monotonic() - started
    assert "discoveries this session: 1" in live.gdb.console("handle info")
    live.gdb.cont()
    live.gdb.interrupt()
    started = time.monotonic()
    processes = live.json("handle ps --json")
    after_run = time.monotonic() - started
    assert [p["pid"] for p in processes] == [p["pid"] for p in live.truth["processes"]]
    assert "discoveries this session: 1" in live.gdb.console("handle info")
    assert warm < 5 and after_run < 10


# --- special scenarios ----------------------------------------------------------------------

THREE = ["7601", "19041", "22000"]          # Windows 7, 10 and 11


@pytest.fixture(scope="module", params=THREE)
def kpti(request):
    with live_guest(request.param, "kpti") as guest:
        yield guest


def test_kpti_every_vcpu_selected_in_turn(kpti):
    vcpus = kpti.truth["vcpus"]
    assert len(vcpus) == 2 and any(v["cpl"] == 3 for v in vcpus)
    check_every_vcpu(kpti, lookups=5)
    check_pseudo_handles(kpti)


def check_every_vcpu(live: Live, lookups: int) -> None:
    """With each vCPU selected in turn (kpti: one stopped in user mode), `walk all` equals truth
    and `lookups` sampled lookups give their records."""
    expected = sorted(live.truth["handles"], key=key)
    try:
        for vcpu in live.truth["vcpus"]:
            live.gdb.console(f"thread {vcpu['index'] + 1}")
            assert sorted(live.json("handle walk all --json"), key=key) == expected
            for record in sample(live.truth["handles"], lookups):
                assert live.json(f"handle lookup {record['pid']} {record['handle']:#x} --json") == [record]
    finally:
        live.gdb.console("thread 1")


@pytest.fixture(scope="module", params=THREE)
def level2(request):
    with live_guest(request.param, "level2") as guest:
        yield guest


def test_level2_table(level2):
    deep = next(p for p in level2.truth["processes"] if p["level"] == 2)
    records = by_pid(level2.truth)[deep["pid"]]
    ps = {p["pid"]: p for p in level2.json("handle ps --json")}
    assert ps[deep["pid"]]["level"] == 2 and ps[deep["pid"]]["handle_count"] == len(records)
    for record in sample(records, 20) + [r for r in records if r["handle"] >= 131072 * 4][:3]:
        assert level2.json(f"handle lookup {deep['pid']} {record['handle']:#x} --json") == [record]
    invalid = [e for e in level2.truth["invalid"] if e["pid"] == deep["pid"]]
    for entry in sample(invalid, 4):
        assert STATUS_WORDS[entry["reason"]] in level2.error(f"handle lookup {deep['pid']} {entry['handle']:#x}")


@pytest.mark.slow
def test_level2_walk_equals_truth(level2):
    deep = next(p for p in level2.truth["processes"] if p["level"] == 2)
    assert level2.json(f"handle walk {deep['pid']} --json") == by_pid(level2.truth)[deep["pid"]]


@pytest.mark.slow
def test_big_guest_counts_sample_and_time():
    with live_guest("19041", "big") as big:
        truth = big.truth
        assert len(truth["processes"]) >= 200 and len(truth["handles"]) >= 50000
        started = time.monotonic()
        processes = big.json("handle ps --json")
        assert len(processes) == len(truth["processes"])
        with tempfile.TemporaryDirectory() as directory:     # JSON to a file: the summary stays beside it
            output = Path(directory) / "walk.json"
            result = big.gdb.console_result(f"handle walk all --json --output {output}", timeout=900)
            elapsed = time.monotonic() - started
            records = json.loads(output.read_text())
        assert len(records) == len(truth["handles"])
        assert sorted(records, key=key) == sorted(truth["handles"], key=key)
        summary = result.log.strip().splitlines()[-1]
        if elapsed > 2:                   # progress lines, throttled to one per 0.5 s
            progress = [line for line in result.log.splitlines() if line.startswith("process ")]
            assert 1 <= len(progress) <= elapsed / 0.5 + 1, result.log[-500:]
        assert f" processes, {len(records)} handles, " in summary, summary
        print(f"big guest: {summary}; ps+walk {elapsed:.1f} s")
