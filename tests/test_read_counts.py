"""How many backend reads the common questions cost (counts, never times): a cold lookup with the
vCPU registers a live gdb has, warm lookups, `ps`, which takes each table's handle count
from Windows (HandleCount) instead of walking the tables, and the caches' bounds in a huge walk."""

from __future__ import annotations

import json
import random

import pytest

from gdbhandles.engine import TABLE_READS, Windows
from gdbhandles.windows.memory import LINE, MAX_LINES, MAX_RUN, DumpFile
from gdbhandles.windows.object_header import MAX_DECODED


def registers(truth: dict) -> list[dict]:
    """What gdb reads from each vCPU of the booted guest."""
    return [{"cr3": v["cr3"], "gs_base": v["gs_base"], "k_gs_base": v["k_gs_base"], "rip": v["rip"],
             "rsp": v["rsp"], "cs": 0x10 if v["cpl"] == 0 else 0x33} for v in truth["vcpus"]]


def open_guest(built_guest, scenario="big"):
    directory = built_guest("19041", scenario)
    truth = json.loads((directory / "truth.json").read_text())
    return truth, lambda: Windows.open(DumpFile(directory / "memory.raw"), registers=registers(truth))


def open_big(built_guest):
    return open_guest(built_guest, "big")


def by_process(truth: dict) -> dict[int, list[dict]]:
    handles: dict[int, list[dict]] = {}
    for record in truth["handles"]:
        handles.setdefault(record["pid"], []).append(record)
    return handles


def big_tables(windows: Windows) -> set[int]:
    """Pids whose handle table has more low-level pages than a lookup reads whole (TABLE_READS
    reads of 64 KiB): there a lookup may pay one read for a page no lookup read yet."""
    return {p.pid for p in windows.select(None)
            if p.table and -(-windows._table(p.table).slots // 256) > TABLE_READS * (MAX_RUN // 0x1000)}


@pytest.mark.parametrize("scenario", ["big", "huge"])
def test_cold_lookup_reads_at_most_60(built_guest, scenario):
    """A lookup in a fresh engine (discovery included, with the registers a live gdb has) reads at
    most 60 times, also in the process with the largest table (on huge, one too big to read whole)."""
    truth, fresh = open_guest(built_guest, scenario)
    handles = by_process(truth)
    largest = max(handles, key=lambda pid: max(r["handle"] for r in handles[pid]))
    sample = random.Random(3).sample(truth["handles"], 10) + random.Random(3).sample(handles[largest], 2)
    costs = []
    for record in sample:
        windows = fresh()
        found = windows.lookup(record["pid"], record["handle"])
        assert (found.object, found.name) == (record["object"], record["name"])
        costs.append(windows.stats().round_trips)
        before = windows.stats().round_trips
        assert windows.lookup(record["pid"], record["handle"]).name == record["name"]
        assert windows.stats().round_trips == before          # the same handle again: all cached
    assert max(costs) <= 60, costs


@pytest.mark.parametrize("scenario", ["big", "huge"])
def test_warm_lookups_read_at_most_2(built_guest, scenario):
    """After a first lookup in a process, a lookup of any other of its handles, in the same stop,
    reads at most twice: the object's header page with what its name rule reads there, and the
    name's characters (the whole table, the type names, the process and the page tables met
    stay cached). Three exceptions, each counted and bounded:
    - a Key whose control block, or a File whose device, no lookup of this stop met yet reads
      those chains: at most 3 reads plus 2 per block or directory met anew (each holds the
      pointer the next read needs);
    - an object or name in a 2 MiB region whose page table this stop has not read: 1 more per
      region (page tables are scattered in physical memory, one read each);
    - in a table too big to read whole (huge's five largest), a lookup on a page no lookup read
      yet: 1 more."""
    truth, fresh = open_guest(built_guest, scenario)
    handles, huge_tables = by_process(truth), big_tables(fresh())
    windows = fresh()
    pids = random.Random(5).sample(sorted(handles), 12) + sorted(huge_tables)[:1]
    plain, chains, regions, paged = [], [], [], []
    for pid in pids:
        first, *rest = random.Random(pid).sample(handles[pid], min(31, len(handles[pid])))
        windows.lookup(pid, first["handle"])
        for record in rest:
            met = len(windows.names.paths) + len(windows.names.key_paths)
            tables = len(windows.kernel.space._page_tables)
            before = windows.stats().round_trips
            found = windows.lookup(pid, record["handle"])
            assert (found.object, found.name) == (record["object"], record["name"])
            cost = windows.stats().round_trips - before
            new = len(windows.names.paths) + len(windows.names.key_paths) - met
            region = len(windows.kernel.space._page_tables) - tables
            if new:
                assert record["type"] in ("File", "Key") and cost <= 3 + 2 * new + region, (record, cost, new)
                chains.append(cost)
            elif region:
                assert cost <= 2 + region + (pid in huge_tables), (record, cost, region)
                regions.append(cost)
            elif pid in huge_tables:
                assert cost <= 3, (record, cost)
                paged.append(cost)
            else:
                plain.append(cost)
    total = len(plain) + len(chains) + len(regions) + len(paged)
    assert len(plain) > 250 and max(plain) <= 2, plain
    assert len(chains) <= 0.15 * total and len(regions) <= 0.05 * total, (chains, regions)
    assert scenario == "big" or paged, "huge's largest table was looked up in"


def test_only_tables_too_big_are_read_page_by_page(built_guest):
    """A lookup reads its table whole only when that takes at most TABLE_READS reads: on huge,
    a second lookup in one of the largest tables (level 2, over 500 low-level pages) reads the
    new page it lands on, while one in System's table reads no table page."""
    truth, fresh = open_guest(built_guest, "huge")
    windows, handles = fresh(), by_process(truth)
    huge_tables = big_tables(windows)
    assert 1 <= len(huge_tables) <= 8, huge_tables
    for pid in sorted(huge_tables)[:1] + [4]:
        first, other = handles[pid][-1], handles[pid][len(handles[pid]) // 2]
        assert first["handle"] // 1024 != other["handle"] // 1024
        windows.lookup(pid, first["handle"])
        table = windows._table(next(p.table for p in windows.select(pid)))
        index = other["handle"] // 4
        page = next(page for first, page, _ in table.low_pages() if first == index - index % 256)
        before = windows.stats().round_trips
        windows.kernel.space.read(page, 0x1000)
        assert (windows.stats().round_trips > before) == (pid in huge_tables), pid


def test_ps_counts_from_windows_without_walking_tables(built_guest):
    truth, fresh = open_big(built_guest)
    windows = fresh()
    before = windows.stats()
    processes = windows.processes()
    after = windows.stats()
    counts: dict[int, int] = {}
    for record in truth["handles"]:
        counts[record["pid"]] = counts.get(record["pid"], 0) + 1
    assert {p.pid: p.handle_count for p in processes if p.handle_count} == counts
    # a walk of every table reads ~13 MiB; ps reads each EPROCESS, image name and table header
    assert after.bytes - before.bytes < 2 * 1024 * 1024, after
    assert not windows.warnings


@pytest.mark.parametrize("profile", ["7601", "9200", "9600", "19041", "22000", "22631"])
def test_ps_handle_counts_equal_the_tables_on_every_entry_form(built_guest, profile):
    directory = built_guest(profile)
    truth = json.loads((directory / "truth.json").read_text())
    windows = Windows.open(DumpFile(directory / "memory.raw"))
    counts: dict[int, int] = {}
    for record in truth["handles"]:
        counts[record["pid"]] = counts.get(record["pid"], 0) + 1
    assert {p.pid: p.handle_count for p in windows.processes() if p.handle_count} == counts
    assert not [w for w in windows.warnings if "HandleCount" in w.message]


def test_huge_walk_keeps_its_caches_bounded(built_guest):
    """A walk reading more than the line cache holds (the `huge` guest: 420 processes, 280,000
    handles) keeps every per-stop cache within its bound at every record, and still lists every
    handle: memory in gdb stays flat however large the guest."""
    directory = built_guest("19041", "huge")
    truth = json.loads((directory / "truth.json").read_text())
    windows = Windows.open(DumpFile(directory / "memory.raw"), registers=registers(truth))
    phys, largest, seen = windows.kernel.phys, [0, 0, 0], []
    for record in windows.walk():
        seen.append((record.pid, record.handle, record.object))
        sizes = (len(phys.lines), len(windows.headers.decoded), len(windows.names.decoded))
        largest = [max(a, b) for a, b in zip(largest, sizes)]
    assert phys.stats.bytes > 2 * MAX_LINES * LINE, phys.stats           # the bound was met, more than once
    assert largest[0] <= MAX_LINES and max(largest[1:]) <= MAX_DECODED, largest
    assert sorted(seen) == sorted((r["pid"], r["handle"], r["object"]) for r in truth["handles"])
