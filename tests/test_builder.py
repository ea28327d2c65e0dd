"""The guest builder: deterministic, every profile builds, truth.json matches the memory."""
from __future__ import annotations

import json

import pytest

from guest_check import Guest, Raw, check_guest
from winguest.guest import build, write
from winguest.profiles import all_profiles


@pytest.mark.parametrize("profile", ["7601", "9200", "19041", "22000", "22631"])
def test_default_guest_matches_truth(built_guest, profile):
    d = built_guest(profile)
    check_guest(d / "memory.raw", json.loads((d / "truth.json").read_text()))


@pytest.mark.parametrize("scenario", ["level2", "kpti", "churn", "big", "leak"])
def test_scenarios_match_truth(built_guest, scenario):
    d = built_guest("19041", scenario)
    truth = json.loads((d / "truth.json").read_text())
    check_guest(d / "memory.raw", truth)
    levels = {p["level"] for p in truth["processes"]}
    pids = {p["pid"] for p in truth["processes"]}
    if scenario == "level2":
        assert 2 in levels
        assert max(h["handle"] for h in truth["handles"]) > 131072 * 4
    if scenario == "big":
        assert len(truth["processes"]) >= 200 and len(truth["handles"]) >= 50000
    if scenario == "kpti":
        assert [v["cpl"] for v in truth["vcpus"]] == [0, 3]
        assert all(p["user_dtb"] for p in truth["processes"] if p["pid"] != 4)
    if scenario == "leak":
        check_leak_plan(truth)
        raw = Raw(d / "memory.raw")
        try:
            assert Guest(raw, truth).q(truth["leak"]["done"]) == 0
        finally:
            raw.close()
    if scenario == "churn":
        c = truth["churn"]
        assert c["pid"] in pids and c["states"]["A"] != c["states"]["B"]
        raw = Raw(d / "memory.raw")
        try:
            g = Guest(raw, truth)
            proc = next(p for p in truth["processes"] if p["pid"] == c["pid"])
            assert g.page_handles(proc, c["state_a"]) == c["states"]["A"]
            assert g.page_handles(proc, c["state_b"]) == c["states"]["B"]
            assert g.q(c["counter"]) == 0
            assert [h for h in truth["handles"] if h["pid"] == c["pid"]] == c["states"]["A"]
        finally:
            raw.close()


@pytest.mark.slow
def test_huge_scenario_has_the_scale_it_promises(built_guest):
    d = built_guest("19041", "huge")
    truth = json.loads((d / "truth.json").read_text())
    assert json.loads((d / "guest.json").read_text())["ram_mib"] == 2048
    assert len(truth["processes"]) >= 400 and len(truth["handles"]) >= 250000
    assert sum(p["level"] == 2 for p in truth["processes"]) >= 3
    check_guest(d / "memory.raw", truth)


def apply(records: list[dict], operations: list[dict]) -> dict:
    """The handles after `operations` (truth["leak"]), by (pid, handle)."""
    state = {(r["pid"], r["handle"]): r for r in records}
    for op in operations:
        if op["op"] == "open":
            key = op["record"]["pid"], op["record"]["handle"]
            assert key not in state, key
            state[key] = op["record"]
        else:
            del state[op["pid"], op["handle"]]
    return state


def check_leak_plan(truth):
    """leaky.exe only gains; every other process ends where it started plus at most one."""
    leak, start = truth["leak"], truth["handles"]
    end = apply(start, leak["operations"])
    count = lambda records, pid: sum(1 for r in records if r["pid"] == pid)
    gained = count(end.values(), leak["pid"]) - count(start, leak["pid"])
    assert gained == sum(1 for op in leak["operations"] if op["op"] == "open"
                         and op["record"]["pid"] == leak["pid"]) >= 100
    others = {r["pid"] for r in start} - {leak["pid"]}
    assert sorted(count(end.values(), pid) - count(start, pid) for pid in others)[-1] == 1
    assert sum(count(end.values(), pid) - count(start, pid) for pid in others) == 1


def test_same_inputs_same_bytes():
    a, b = build("19041", "default", 3), build("19041", "default", 3)
    for name in ("loader.bin", "memory.bin", "lowstub", "truth", "guest", "symbols"):
        assert a[name] == b[name], name
    c = build("19041", "default", 4)
    assert c["memory.bin"] != a["memory.bin"]
    assert c["truth"]["kernel_base"] != a["truth"]["kernel_base"]


@pytest.mark.parametrize("version", [p["version"] for _, p in all_profiles()])
def test_every_profile_builds(tmp_path, version):
    g = build(version, "default")
    write(tmp_path, g)
    check_guest(tmp_path / "memory.raw", g["truth"])


def test_each_damage_kind_changes_one_page_and_says_so():
    """--corrupt spoils one page of the guest it starts from (amplify adds two table pages,
    optional-header one object page);
    truth.json lists the damage and drops or marks exactly the records it touches."""
    from winguest.corrupt import KINDS
    clean = {s: build("19041", s) for s in ("default", "level2")}
    for kind in KINDS:
        scenario = "level2" if kind.startswith("mid-") else "default"
        base, damaged = clean[scenario], build("19041", scenario, corrupt=(kind,))
        a, b = base["memory.bin"], damaged["memory.bin"]
        added = NEW_PAGES.get(kind, 0)
        assert len(b) - len(a) == added * 4096, kind
        changed_pages = sum(a[i:i + 4096] != b[i:i + 4096] for i in range(0, len(a), 4096))
        assert changed_pages == (2 if added else 1), kind        # new pages: and the PTEs that map them
        [damage] = damaged["truth"]["damage"]
        assert damage["kind"] == kind and damage["words"] and damage["lines"] >= 1
        before = {(h["pid"], h["handle"]): h for h in base["truth"]["handles"]}
        after = {(h["pid"], h["handle"]): h for h in damaged["truth"]["handles"]}
        assert set(before) - set(after) == {(damage["pid"], v) for v in damage["lost"]}
        changed = {k for k in after if after[k] != before[k]}
        assert changed <= {tuple(m) for m in damage["marked"]}
        assert bool(damage["lost"]) or bool(damage["marked"]) or kind in NOTHING_LOST, kind


NEW_PAGES = {"amplify": 2, "optional-header": 1}
NOTHING_LOST = {"bound-past-table", "amplify", "process-loop", "process-dangling"}


def test_every_option_of_build_and_boot_is_described():
    import boot
    import build as build_script
    for script in (build_script, boot):
        actions = script.parser()._actions
        assert len(actions) > 3
        for action in actions:
            assert action.help and len(action.help) > 10, (script.__name__, action.dest)


def test_guest_cache_is_bounded_least_recently_used_first(tmp_path, monkeypatch):
    import os
    import time
    from winguest import cache
    monkeypatch.setattr(cache, "CACHE", tmp_path)
    monkeypatch.setattr(cache, "LIMIT_MIB", 2)
    now = time.time()
    ages = {"old": 3000, "older": 4000, "recent": 60, "busy": 5, "stale": 9000}
    for name, age in ages.items():
        d = tmp_path / name
        d.mkdir()
        (d / "memory.bin").write_bytes(os.urandom(1 << 20))          # 1 MiB each, 5 MiB in all
        (d / "done").write_text("stale-digest" if name == "stale" else "digest")
        os.utime(d / "done", (now - age, now - age))
    cache.prune("digest")
    # other sources go first; then the least recently used idle guests until 2 MiB remain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "recent"]
    monkeypatch.setattr(cache, "LIMIT_MIB", 0)
    cache.prune("digest")                   # guests used in the last IDLE seconds are never removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "recent"]
