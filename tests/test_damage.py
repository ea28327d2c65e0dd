"""Damaged guests (`build.py --corrupt KIND`), one kind at a time, against their truth.json.

For every kind: the walk lists every intact record exactly, marks the records it could only
partly decode, names the damage in the promised number of one-line warnings (each naming the
damaged object), reads no more than a clean walk of the same guest does (twice over, plus a
little), and `lookup` of a damaged handle is one precise line. Bounds are read counts and
record counts, never time.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gdbhandles.engine import Windows
from gdbhandles.errors import HandleError
from gdbhandles.records import HANDLE_KEYS
from gdbhandles.windows.memory import DumpFile
from winguest.corrupt import KINDS

PROFILES = ("19041", "7601", "22000")
# damage `ps` sees: in the _HANDLE_TABLE itself, and in its pages (checked before Windows' counter
# is believed; a damaged table is counted as a walk lists it)
HEADER_KINDS = {"level3", "bound-past-table", "zero-handle-table"}
PAGE_KINDS = {"amplify", "zero-table-page", *(f"{level}-{how}" for level in ("low", "mid")
                                              for how in ("null", "unmapped", "paged", "alias"))}


def scenario_of(kind: str) -> str:
    return "level2" if kind.startswith("mid-") else "default"


def line(warning) -> str:
    """The one line a front end prints for a warning (pid, process and handle value included)."""
    return str(warning)


def key(record: dict) -> tuple:
    return record["pid"], record["handle"]


def walk(directory):
    """(records as JSON, warning lines, read statistics, the Windows) of a full walk."""
    windows = Windows.open(DumpFile(directory / "memory.raw"))
    warnings = []
    records = [r.to_json() for r in windows.walk(warn=warnings.append)]
    return records, [line(w) for w in warnings], windows.kernel.phys.stats, windows


@pytest.fixture(scope="module")
def clean_reads(built_guest):
    """Bytes read by a full walk of the undamaged guest, per (profile, scenario)."""
    cache = {}

    def get(profile, scenario):
        if (profile, scenario) not in cache:
            cache[profile, scenario] = walk(built_guest(profile, scenario))[2].bytes
        return cache[profile, scenario]
    return get


def check_damage(directory, truth, clean_bytes):
    records, lines, stats, windows = walk(directory)
    expected = truth["handles"]
    # every intact record, exactly, and nothing else
    assert len(records) <= len(expected)
    assert sorted(({k: r[k] for k in HANDLE_KEYS} for r in records), key=key) == sorted(expected, key=key)
    # records decoded only in part say so
    marked = {tuple(m) for d in truth["damage"] for m in d["marked"]}
    for record in records:
        assert bool(record.get("problems")) == (key(record) in marked), record
    # each damage: its lines, each naming the damaged object; no other warning
    for damage in truth["damage"]:
        naming = [text for text in lines if any(word in text for word in damage["words"])]
        assert len(naming) == damage["lines"], (damage, lines)
        assert all(any(word in text for text in naming) for word in damage["words"]), (damage, naming)
    assert len(lines) == sum(d["lines"] for d in truth["damage"]), lines
    assert all("\n" not in text for text in lines)
    # bounded by the guest: no more than twice what a clean walk reads, plus 256 KiB
    assert stats.bytes <= 2 * clean_bytes + (256 << 10)
    return windows


def check_lookup(windows, truth):
    for damage in truth["damage"]:
        ask = damage["lookup"]
        if ask is None:
            continue
        if ask.get("record"):
            record = windows.lookup(ask["pid"], ask["handle"])
            assert record.problems and all(w in " ".join(record.problems) for w in ask["words"])
            continue
        with pytest.raises(HandleError) as error:
            windows.lookup(ask["pid"], ask["handle"])
        message = str(error.value)
        assert "\n" not in message and all(w in message for w in ask["words"]), message


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_of_damage(built_guest, clean_reads, kind):
    scenario = scenario_of(kind)
    directory = built_guest("19041", scenario, corrupt=(kind,))
    truth = json.loads((directory / "truth.json").read_text())
    windows = check_damage(directory, truth, clean_reads("19041", scenario))
    check_lookup(windows, truth)
    # the process list: every process is still found; a table whose header is damaged is marked
    processes = windows.processes()
    assert sorted(p.pid for p in processes) == sorted(p["pid"] for p in truth["processes"])
    damaged_table = {d["pid"] for d in truth["damage"] if d["kind"] in HEADER_KINDS | PAGE_KINDS}
    assert {p.pid for p in processes if p.to_json().get("problems")} == damaged_table
    for process in processes:            # a damaged table is counted as a walk lists it
        if process.pid in damaged_table and truth["damage"][0]["kind"] in PAGE_KINDS:
            assert process.handle_count == sum(h["pid"] == process.pid for h in truth["handles"]), process.pid


@pytest.mark.parametrize("profile", PROFILES[1:])
@pytest.mark.parametrize("kind", ["amplify", "low-alias", "type-index", "name-length", "kcb-loop",
                                  "directory-loop", "zero-table-page", "optional-header", "process-loop"])
def test_damage_on_other_layouts(built_guest, clean_reads, kind, profile):
    directory = built_guest(profile, "default", corrupt=(kind,))
    truth = json.loads((directory / "truth.json").read_text())
    windows = check_damage(directory, truth, clean_reads(profile, "default"))
    check_lookup(windows, truth)


def test_many_kinds_at_once(built_guest, clean_reads):
    kinds = ("mid-alias", "low-null", "amplify", "process-dangling", "kcb-loop", "type-index", "name-buffer",
             "object-unmapped")
    directory = built_guest("19041", "level2", corrupt=kinds)
    truth = json.loads((directory / "truth.json").read_text())
    assert [d["kind"] for d in truth["damage"]] == list(kinds)
    windows = check_damage(directory, truth, clean_reads("19041", "level2"))
    check_lookup(windows, truth)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "gdbhandles.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_ps_and_walk_show_the_damage(built_guest):
    directory = built_guest("19041", "default", corrupt=("amplify", "process-loop"))
    truth = json.loads((directory / "truth.json").read_text())
    dump = str(directory / "memory.raw")
    result = cli("walk", "--dump", dump, "--json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert sorted(({k: r[k] for k in HANDLE_KEYS} for r in records), key=key) == sorted(truth["handles"], key=key)
    warned = result.stderr.strip().splitlines()
    for damage in truth["damage"]:
        assert sum(any(w in text for w in damage["words"]) for text in warned) == damage["lines"], warned
    result = cli("ps", "--dump", dump)
    assert result.returncode == 0, result.stderr
    amplified = next(d for d in truth["damage"] if d["kind"] == "amplify")
    row = next(text for text in result.stdout.splitlines() if text.split()[:1] == [str(amplified["pid"])])
    count = len([h for h in truth["handles"] if h["pid"] == amplified["pid"]])
    assert row.split()[-1] == str(count)             # counted by distinct pages, not 13 million
    assert any("process list" in text for text in result.stderr.splitlines())


def test_cli_ps_says_a_zeroed_table_page_and_counts_what_a_walk_lists(built_guest):
    """ps believes Windows' HandleCount only when the table's pages look sound: a zeroed low-level
    page is one warning line naming the page, the JSON record has `problems`, and the count is
    the handles a walk can list, not Windows' count that includes the lost ones."""
    directory = built_guest("19041", "default", corrupt=("zero-table-page",))
    truth = json.loads((directory / "truth.json").read_text())
    damage = truth["damage"][0]
    listed = sum(h["pid"] == damage["pid"] for h in truth["handles"])
    clean = json.loads((built_guest("19041", "default") / "truth.json").read_text())
    assert sum(h["pid"] == damage["pid"] for h in clean["handles"]) > listed      # handles were lost
    dump = str(directory / "memory.raw")
    text = cli("ps", "--dump", dump)
    assert text.returncode == 0, text.stderr
    warned = [w for w in text.stderr.splitlines() if all(word in w for word in damage["words"])]
    assert len(warned) == 1 and "all zeros" in warned[0] and str(damage["pid"]) in warned[0], text.stderr
    row = next(r for r in text.stdout.splitlines() if r.split()[:1] == [str(damage["pid"])])
    assert row.split()[-1] == str(listed)
    result = cli("ps", "--dump", dump, "--json")
    records = {p["pid"]: p for p in json.loads(result.stdout)}
    assert records[damage["pid"]]["handle_count"] == listed
    assert any("all zeros" in problem for problem in records[damage["pid"]]["problems"])
    assert [pid for pid, p in records.items() if "problems" in p] == [damage["pid"]]
