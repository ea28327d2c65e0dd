"""The workflow commands in a real gdb on live test guests under QEMU, against truth.json:
the current process of each vCPU, handle values from gdb expressions, the $handle_*
functions (also in a breakpoint condition), the Python API, `handle find`, `handle cid`,
`handle walk --free`, and `handle mark`/`handle diff` across stops of the leak guest, whose
kernel opens and closes handles as it runs."""

from __future__ import annotations

import json
import re

import pytest

from gdbhandles import diff
from gdbhandles.windows import layouts
from test_gdb_live import by_pid, key, live_guest, sample

pytestmark = pytest.mark.integration

GUESTS = [("19041", "default"), ("7601", "default"), ("19041", "kpti"), ("19041", "level2"), ("19041", "leak"),
          ("7601", "leak")]


@pytest.fixture(scope="module", params=GUESTS, ids=lambda p: "-".join(p))
def live(request):
    with live_guest(*request.param) as guest:
        guest.scenario = request.param[1]
        yield guest


@pytest.fixture
def leak(live):
    """The live guest if it is the leak guest (only its kernel changes tables as it runs)."""
    if live.scenario != "leak":
        pytest.skip("needs the leak guest")
    return live


def stable(live) -> list[dict]:
    """truth's handles, without the processes the leak routine changes while the guest runs."""
    moving = {op["record"]["pid"] if op["op"] == "open" else op["pid"]
              for op in live.truth.get("leak", {}).get("operations", [])}
    return [r for r in live.truth["handles"] if r["pid"] not in moving]


def vcpus(live):
    """Select each vCPU in turn (gdb thread N); yields its truth record."""
    try:
        for vcpu in live.truth["vcpus"]:
            live.gdb.console(f"thread {vcpu['index'] + 1}")
            yield vcpu
    finally:
        live.gdb.console("thread 1")


# --- where the debugger stopped ------------------------------------------------------------

def test_lookup_and_walk_default_to_the_current_process(live):
    handles = by_pid(live.truth)
    for vcpu in vcpus(live):
        pid = vcpu["pid"]
        record = sample(handles[pid], 3)[1]
        assert live.json(f"handle lookup {record['handle']:#x} --json") == [record]
        text = live.gdb.console(f"handle lookup {record['handle']:#x}")
        mode = "KERNEL_GS_BASE" if vcpu["cpl"] else "GS base"
        assert re.search(rf"current process of vCPU {vcpu['index']} \(.*{mode}\): \S+\({pid}\)", text), text
        if pid not in {r["pid"] for r in stable(live)} and live.scenario == "leak":
            continue
        assert live.json("handle walk --json") == handles[pid]
        assert live.gdb.console("handle walk").startswith(f"current process of vCPU {vcpu['index']} (")


def test_handle_values_from_gdb_expressions(live):
    system = next(p for p in live.truth["processes"] if p["pid"] == 4)
    pid_offset = layouts.for_build(live.truth["profile"]["build"]).offset("_EPROCESS", "UniqueProcessId")
    first = by_pid(live.truth)[4][0]
    # System's UniqueProcessId (4), read from guest memory, times a quarter of System's first handle
    scale = first["handle"] // 4
    expression = f"*(long*)({system['eprocess']:#x}+{pid_offset:#x})*{scale}"
    assert live.json(f"handle lookup 4 {expression} --json") == [first]
    record = stable(live)[-1]
    live.gdb.console(f"set $h = {record['handle'] // 4}")
    assert live.json(f"handle lookup {record['pid']} $h*4 --json") == [record]


# --- convenience functions ---------------------------------------------------------------

def value(live, expression: str) -> str:
    return live.gdb.console(f"output {expression}").strip()


def literal(text: str | None) -> str:
    """A gdb string literal."""
    return '"' + (text or "").replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_convenience_functions(live):
    for record in sample(stable(live), 6, seed=3):
        args = f"{record['handle']:#x}, {record['pid']}"
        assert value(live, f'$_streq($handle_type({args}), "{record["type"]}")') == "1"
        assert value(live, f'$_streq($handle_type({args}), "NoSuchType")') == "0"
        assert int(value(live, f"$handle_object({args})")) == record["object"]
        assert int(value(live, f"$handle_access({args})")) == record["granted_access"]
        assert value(live, f"$_streq($handle_name({args}), {literal(record['name'])})") == "1"
    named = next(r for r in stable(live) if r["process"] in ("lsass.exe", "System"))
    assert int(value(live, f'$handle_access({named["handle"]:#x}, "{named["process"]}")')) == named["granted_access"]
    for item in live.truth["invalid"][:4]:
        message = live.error(f"output $handle_type({item['handle']:#x}, {item['pid']})")
        assert message.startswith("$handle_type: handle") and f"{item['handle'] & ~3:#x}" in message, message
    for vcpu in vcpus(live):
        record = by_pid(live.truth)[vcpu["pid"]][0]
        assert json.loads(value(live, f"$handle_type({record['handle']:#x})")) == record["type"]


def test_python_api(live):
    record = stable(live)[-1]
    script = ("import json; from gdbhandles import api; print(json.dumps([api.walk({pid}), api.lookup({h}, pid={pid}),"
              " api.walk('all'), api.current()]))").format(pid=record["pid"], h=record["handle"])
    walked, looked_up, everything, current = json.loads(live.gdb.console(f"python {script}"))
    assert walked == [r for r in live.truth["handles"] if r["pid"] == record["pid"]]
    assert looked_up == record
    assert {key(r) for r in stable(live)} <= {key(r) for r in everything}
    assert current["pid"] == live.truth["vcpus"][0]["pid"]
    script = ("from gdbhandles import api; from gdbhandles.errors import BadHandle\n"
              f"try:\n api.lookup(0, pid={record['pid']})\nexcept BadHandle as exc:\n print('error:', exc)")
    assert "error: handle 0x0 of" in live.gdb.console(f"python exec({script!r})")
    process = next(p for p in live.truth["processes"] if p["pid"] == record["pid"])
    script = ("import json; from gdbhandles import api; print(json.dumps([api.find(object={o}), api.find(name={n!r}),"
              " api.cid({pid}), len(api.cids()), api.diff([], [{r}])]))").format(
        o=record["object"], n=(record["name"] or "")[-6:], pid=record["pid"], r=repr(record))
    found, named, cid, cids, changed = json.loads(live.gdb.console(f"python {script}"))
    assert record in found and all(r["object"] == record["object"] for r in found)
    assert record in named
    assert (cid["object"], cid["type"], cid["pid"]) == (process["eprocess"], "Process", process["pid"])
    assert cids == len(live.truth["processes"]) + sum(len(p["threads"]) for p in live.truth["processes"])
    assert changed == {"added": [record], "removed": [], "changed": []}


# --- find, cid, free -----------------------------------------------------------------------

def test_find_by_object_and_by_name(live):
    handles = stable(live)
    holders: dict[int, set] = {}
    for record in handles:
        holders.setdefault(record["object"], set()).add(record["pid"])
    shared = max(holders, key=lambda o: (len(holders[o]), o))
    expected = [r for r in handles if r["object"] == shared]
    found = live.json(f"handle find {shared:#x} --json")
    assert sorted([r for r in found if key(r) in {key(h) for h in handles}], key=key) == sorted(expected, key=key)
    text = live.gdb.console(f"handle find {shared:#x}")
    summary = f"{len(found)} handles in {len({r['pid'] for r in found})} processes refer to object {shared:#x}"
    assert text.strip().splitlines()[-1].startswith(summary)
    named = [r for r in handles if r["type"] == "File" and "system32" in (r["name"] or "").lower()]
    found = live.json("handle find --name SYSTEM32 --type File --json")
    assert sorted([r for r in found if key(r) in {key(h) for h in handles}], key=key) == sorted(named, key=key)
    text = live.gdb.console("handle find 0x1234")
    assert "0 handles in 0 processes refer to object 0x1234" in text and "BODY address" in text


def test_cid_table_names_every_process_and_thread(live):
    records = {r["id"]: r for r in live.json("handle cid --all --json")}
    expected = {p["pid"]: ("Process", p["eprocess"], p["pid"], None, p["name"]) for p in live.truth["processes"]}
    expected.update({t["tid"]: ("Thread", t["ethread"], p["pid"], t["tid"], p["name"])
                     for p in live.truth["processes"] for t in p["threads"]})
    assert {i: (r["type"], r["object"], r["pid"], r["tid"], r["process"]) for i, r in records.items()} == expected
    process = live.truth["processes"][-1]
    thread = process["threads"][-1]
    text = live.gdb.console(f"handle cid {thread['tid']}")
    assert f"thread {thread['tid']} of {process['name']} (pid {process['pid']})" in text
    assert f"{thread['ethread']:#x} (Thread)" in text
    assert live.json(f"handle cid {process['pid']:#x} --json")[0]["object"] == process["eprocess"]
    assert "is not in PspCidTable" in live.error(f"handle cid {max(expected) + 4}")


CHECK_FREE = """python
import json
from gdbhandles import api
truth = json.load(open({truth!r}))
for p in truth["processes"]:
    if p["pid"] in {skip!r} or not p["free_list"]:
        continue
    entries = api.free(p["pid"])
    order = sorted((e for e in entries if e["free_position"] is not None), key=lambda e: e["free_position"])
    assert [e["handle"] for e in order] == p["free_list"], p["pid"]
    assert {{e["handle"] for e in entries}} == set(p["free_list"]), p["pid"]
print("free lists:", sum(len(p["free_list"]) for p in truth["processes"] if p["pid"] not in {skip!r}))
end"""


def test_free_entries_in_free_list_order(live, tmp_path):
    moving = sorted({p["pid"] for p in live.truth["processes"]} - {r["pid"] for r in stable(live)}
                    - {p["pid"] for p in live.truth["processes"] if not p["free_list"]})
    script = tmp_path / "check_free.gdb"
    script.write_text(CHECK_FREE.format(truth=str(live.dir / "truth.json"), skip=moving))
    assert "free lists:" in live.gdb.console(f"source {script}", timeout=600)
    pid = stable(live)[0]["pid"]
    process = next(p for p in live.truth["processes"] if p["pid"] == pid)
    rows = live.gdb.console(f"handle walk {pid} --free").strip().splitlines()
    assert rows[0].split() == ["PID", "Process", "Handle", "Entry", "Status", "FreeList#"]
    count = len(process["free_list"])
    assert rows[-1] == f"{count} entries without an object, {count} on the free list"
    statuses = {(e["pid"], e["handle"]) for e in live.truth["invalid"] if e["reason"] in ("free", "never_allocated")}
    mine = {(r["pid"], r["handle"]): r["status"] for r in live.json(f"handle walk {pid} --free --json")}
    for item in live.truth["invalid"]:
        if item["pid"] == pid and (item["pid"], item["handle"]) in statuses:
            assert mine[item["pid"], item["handle"]] == item["reason"]


# --- mark and diff across stops of the leak guest -------------------------------------------

def counters(live) -> tuple[int, int]:
    """The leak routine's own counters: operations done, leaked handles opened."""
    leak = live.truth["leak"]
    return tuple(int(value(live, f"*(unsigned long long*){leak[name]:#x}")) for name in ("done", "leaked"))


def state(live, done: int) -> list[dict]:
    """truth's handles after the first `done` operations of the leak routine."""
    handles = {key(r): r for r in live.truth["handles"]}
    for op in live.truth["leak"]["operations"][:done]:
        if op["op"] == "open":
            handles[key(op["record"])] = op["record"]
        else:
            del handles[op["pid"], op["handle"]]
    return sorted(handles.values(), key=key)


def free_lists(live, done: int) -> dict[int, list[int]]:
    """Each process's free list (handle values, head first) after the first `done` operations:
    an open takes the head, a close puts its slot back at the head."""
    lists = {p["pid"]: list(p["free_list"]) for p in live.truth["processes"]}
    for op in live.truth["leak"]["operations"][:done]:
        if op["op"] == "open":
            pid, handle = op["record"]["pid"], op["record"]["handle"]
            assert lists[pid].pop(0) == handle
        else:
            lists[op["pid"]].insert(0, op["handle"])
    return lists


def run_to_step(live, times: int) -> None:
    """Continue to the leak routine's step breakpoint `times` times (one operation each)."""
    for _ in range(times):
        live.gdb.cont()
        stop = live.gdb.wait_async("stopped", timeout=300)
        assert stop["payload"].get("reason") == "breakpoint-hit", stop


def test_mark_continue_diff_against_the_guest_counters(leak, tmp_path):
    """mark at one stop, nine operations of the guest's own routine, diff: exactly what the
    operations did, and leaky.exe gained as many handles as the guest's leaked counter says."""
    step = leak.truth["leak"]["step"]
    leak.gdb.console(f"break *{step:#x}")
    try:
        run_to_step(leak, 1)
        done, leaked = counters(leak)
        assert done + 12 <= len(leak.truth["leak"]["operations"]), "the leak routine ran out before the test"
        saved = tmp_path / "before.json"
        text = leak.gdb.console(f"handle mark before --save {saved}")
        assert text.startswith(f"mark before: {len(state(leak, done))} handles of every process")
        leak.gdb.console("handle mark leaky leaky.exe")
        run_to_step(leak, 9)
        done_after, leaked_after = counters(leak)
        assert done_after - done == 9
        expected = diff.compare(state(leak, done), state(leak, done_after))
        assert leak.json("handle diff before --json") == diff.to_json(expected)
        assert leak.json(f"handle diff --file {saved} --json") == diff.to_json(expected)
        pid = leak.truth["leak"]["pid"]
        opened = [r for r in expected.added if r["pid"] == pid]
        assert len(opened) == leaked_after - leaked >= 3 and not [r for r in expected.removed if r["pid"] == pid]
        only = leak.json("handle diff leaky --json")
        assert only == diff.to_json(diff.Diff(added=opened))
        lines = leak.gdb.console("handle diff before").strip().splitlines()
        assert lines[0].startswith("since mark before (")
        assert lines[1:] == diff.report(expected, by_process=True).splitlines()
        assert all(line[0] in "+-~" for line in lines[1:-1])
        expected_free = free_lists(leak, done_after)
        for pid in {r["pid"] for r in expected.added + expected.removed}:
            entries = leak.json(f"handle walk {pid} --free --json")
            listed = sorted((e for e in entries if e["free_position"] is not None), key=lambda e: e["free_position"])
            assert [e["handle"] for e in listed] == expected_free[pid], pid
            assert {e["handle"] for e in entries} == set(expected_free[pid]), pid
    finally:
        leak.gdb.console("delete")


def test_breakpoint_condition_with_handle_functions(leak):
    step, done_at = leak.truth["leak"]["step"], leak.truth["leak"]["done"]
    record = by_pid(leak.truth)[4][0]
    done, _ = counters(leak)
    leak.gdb.console(f'break *{step:#x} if $_streq($handle_type({record["handle"]:#x}, 4), "NoSuchType")')
    leak.gdb.console(f'break *{step:#x} if $_streq($handle_type({record["handle"]:#x}, 4), "{record["type"]}") '
                     f"&& *(unsigned long long*){done_at:#x} >= {done + 3}")
    try:
        leak.gdb.cont()
        stop = leak.gdb.wait_async("stopped", timeout=300)
        number = int(stop["payload"]["bkptno"])
        assert stop["payload"]["reason"] == "breakpoint-hit" and number == max(
            int(b["number"]) for b in leak.gdb.mi("-break-list").payload["BreakpointTable"]["body"])
        assert counters(leak)[0] == done + 3
    finally:
        leak.gdb.console("delete")
    assert "is past the end" in leak.error("output $handle_object(0x7ffffff0, 4)")
