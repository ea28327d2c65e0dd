"""The per-structure types on the test guests' dumps: full image names and process selection,
a layout without one member (only that member's accessors fail), and the walk's filters
running before any name is read."""
from __future__ import annotations

import json

import pytest

from gdbhandles.engine import Windows
from gdbhandles.errors import ProcessNotFound
from gdbhandles.windows.memory import MAX_PIECES, DumpFile

from test_engine_guests import short_names


def opened(built_guest, profile="19041", scenario="default"):
    directory = built_guest(profile, scenario)
    truth = json.loads((directory / "truth.json").read_text())
    return Windows.open(DumpFile(directory / "memory.raw")), truth, directory


def test_full_image_name_and_selection_by_prefix(built_guest):
    windows, truth, _ = opened(built_guest)
    broker = next(p for p in truth["processes"] if p["name"] == "RuntimeBroker.exe")
    assert broker["image_file_name"] == "RuntimeBroker.e" and broker["image_path"].endswith("\\RuntimeBroker.exe")
    [record] = [r for r in windows.processes() if r.pid == broker["pid"]]
    assert (record.name, record.image_file_name, record.image_path) == \
        ("RuntimeBroker.exe", "RuntimeBroker.e", broker["image_path"])
    mine = [h for h in truth["handles"] if h["pid"] == broker["pid"]]
    assert mine and all(h["process"] == "RuntimeBroker.exe" for h in mine)
    for spelling in ("RuntimeBroker.exe", "runtimebroker.EXE", "RuntimeBroker.e", "runtime", "R"):
        assert [r.to_json() for r in windows.walk(spelling)] == mine, spelling
    with pytest.raises(ProcessNotFound, match="starts 4 image names"):
        windows.walk("s").__next__()             # System, smss.exe, services.exe, svchost.exe
    with pytest.raises(ProcessNotFound, match="give a pid"):
        windows.lookup("svc", 4)                 # one image name, two processes


def isf_without(directory, tmp_path, struct, member=None):
    """The guest's symbols.json with one structure (or one member of it) removed."""
    isf = json.loads((directory / "symbols.json").read_text())
    if member is None:
        del isf["user_types"][struct]
    else:
        del isf["user_types"][struct]["fields"][member]
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(isf))
    return str(path)


def test_a_layout_without_the_key_body_loses_key_names_only(built_guest, tmp_path):
    directory = built_guest("19041", "default", guid="random")
    truth = json.loads((directory / "truth.json").read_text())
    isf = isf_without(directory, tmp_path, "_CM_KEY_BODY")
    windows = Windows.open(DumpFile(directory / "memory.raw"), isf=isf)
    assert [p.pid for p in windows.processes()] == [p["pid"] for p in truth["processes"]]
    records = [r.to_json() for r in windows.walk()]
    gap = "has no _CM_KEY_BODY.KeyControlBlock"
    assert all(gap in r["problems"][0] for r in records if r["type"] == "Key")   # not a bare null name
    want = [{**h, "name": None} if h["type"] == "Key" else h for h in truth["handles"]]
    assert [{k: v for k, v in r.items() if k != "problems"} for r in records] == want
    [warning] = windows.warnings
    assert warning.pid is None and warning.message.startswith("Key names unknown") and "_CM_KEY_BODY" in warning.message


def test_a_layout_without_the_audit_name_shows_15_byte_names(built_guest, tmp_path):
    directory = built_guest("19041", "default", guid="random")
    truth = json.loads((directory / "truth.json").read_text())
    isf = isf_without(directory, tmp_path, "_EPROCESS", "SeAuditProcessCreationInfo")
    windows = Windows.open(DumpFile(directory / "memory.raw"), isf=isf)
    short = short_names(truth)
    assert [r.to_json() for r in windows.walk()] == short["handles"]
    assert [w.message.startswith("full image names unknown") for w in windows.warnings] == [True]
    assert windows.walk("RuntimeBroker.e").__next__().process == "RuntimeBroker.e"


def test_type_filter_reads_a_third_of_the_full_walk(built_guest):
    """Entries, headers and types first, names only for the survivors: beyond the table pages
    that both read, a --type Process walk of the big guest reads at most a third of the bytes of
    the full walk (from the dump). (Table pages included, over a costly wire: the next test.)"""
    directory = built_guest("19041", "big")
    read = {}
    for label, filters in (("full", {}), ("Process", {"type": "Process"})):
        windows = Windows.open(DumpFile(directory / "memory.raw"))
        for process in windows.select(None):         # the table pages, read by both walks
            if process.table:
                list(windows._table(process.table).pages())
        before = windows.kernel.phys.stats.bytes
        records = list(windows.walk(**filters))
        read[label] = (windows.kernel.phys.stats.bytes - before, records)
    truth = json.loads((directory / "truth.json").read_text())
    assert [r.to_json() for r in read["Process"][1]] == [h for h in truth["handles"] if h["type"] == "Process"]
    assert len(read["full"][1]) == len(truth["handles"])
    assert read["Process"][0] * 3 <= read["full"][0], read


class StubPriced(DumpFile):
    """The dump, read as over QEMU's gdbstub: each read request costs a round trip."""
    round_trip_bytes = 512


@pytest.mark.parametrize("scenario", ["big", pytest.param("huge", marks=pytest.mark.slow)])
def test_type_filter_over_a_costly_wire_reads_a_third_in_fewer_trips_than_headers(built_guest, scenario):
    """Where round trips cost, the type pass reads the smallest gaps between headers rather than
    pay a trip for each, within its byte budget: the whole --type Process walk (table pages
    included: a fifth of the full walk on huge) stays within a third of the full walk's bytes,
    in fewer round trips than there are distinct objects."""
    directory = built_guest("19041", scenario)
    truth = json.loads((directory / "truth.json").read_text())
    read = {}
    for label, filters in (("full", {}), ("Process", {"type": "Process"})):
        windows = Windows.open(StubPriced(directory / "memory.raw"))
        windows.processes()
        stats = windows.kernel.phys.stats
        before = (stats.bytes, stats.round_trips)
        records = [r.to_json() for r in windows.walk(**filters)]
        read[label] = (stats.bytes - before[0], stats.round_trips - before[1], records)
        assert len(windows.kernel.phys.pieces) <= MAX_PIECES
    assert read["Process"][2] == [h for h in truth["handles"] if h["type"] == "Process"]
    assert len(read["full"][2]) == len(truth["handles"])
    assert read["Process"][0] * 3 <= read["full"][0], read["Process"][:2]
    objects = len({h["object"] for h in truth["handles"]})
    assert read["Process"][1] < objects, (read["Process"][1], objects)
