"""`handle walk all --type Process` over QEMU's real gdbstub, in a real gdb, on `big` and `huge`:
at most a third of the full walk's bytes (issue 13's target), by the walk's own summary and by
`handle info`'s statistics of the whole command after a fresh stop, and the same records as
truth.json. Counts of reads and bytes are asserted; times never."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

from boot import booted                       # vm-images/, put on sys.path by conftest.py
from gdbhandles.automation.mi import Gdb
from winguest.cache import guest as cached_guest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GDBINIT = Path(__file__).resolve().parents[1] / "gdbinit.py"
SUMMARY = re.compile(r"(\d+) memory reads, (\d+) bytes, \d+ cache hits")


def walked(gdb: Gdb, output: Path, extra: str = "") -> tuple[list[dict], dict]:
    """One walk from a cold cache (the guest ran a moment and stopped): its records, and the
    round trips and bytes of the walk (its summary) and of the whole command (`handle info`)."""
    gdb.cont()
    gdb.interrupt()
    result = gdb.console_result(f"handle walk all --json --output {output}{extra}", timeout=900)
    reads, size = map(int, SUMMARY.findall(result.log)[-1])
    stats = gdb.json("handle info --json", timeout=600)["stats"]
    return json.loads(output.read_text()), {"walk": (reads, size), "command": (stats["round_trips"], stats["bytes"])}


@pytest.mark.parametrize("scenario", ["big", "huge"])
def test_type_filter_over_the_gdbstub_reads_a_third_of_the_full_walk(scenario):
    directory = cached_guest("19041", scenario)
    truth = json.loads((directory / "truth.json").read_text())
    with booted(directory) as vm, Gdb(timeout=120) as gdb, tempfile.TemporaryDirectory() as work:
        gdb.source(str(GDBINIT))
        gdb.connect(vm.gdb)
        gdb.console("set handle fast-path off")
        output = Path(work) / "walk.json"
        full, full_reads = walked(gdb, output)
        only, only_reads = walked(gdb, output, " --type Process")
        info = gdb.console("handle info")
    assert "QEMU physical mode" in info and "fast path not used: set handle fast-path off" in info, info
    key = lambda record: (record["pid"], record["handle"])      # noqa: E731
    assert sorted(full, key=key) == sorted(truth["handles"], key=key)
    assert only == [h for h in truth["handles"] if h["type"] == "Process"] and only
    for measure in ("walk", "command"):
        assert only_reads[measure][1] * 3 <= full_reads[measure][1], (measure, only_reads, full_reads)
    # the type pass bridges the cheapest gaps between object headers: fewer round trips than headers
    objects = len({h["object"] for h in truth["handles"]})
    assert only_reads["walk"][0] < objects, (only_reads, objects)
