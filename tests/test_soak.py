"""A soak on the `churn` guest with auto-pause: 1,000 lookups and 50 walks in one gdb while the
guest keeps rewriting one handle table page under a seqlock counter.

Every result must be consistent with the guest: a record is one that state A or B holds at
that handle, and whenever the counter read in the same pause is even, the whole walk is
exactly the state the counter names. gdb's memory may not grow without bound, and the VM is
running at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from boot import booted
from gdbhandles.automation.mi import Gdb
from winguest.cache import guest as cached_guest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GDBINIT = Path(__file__).resolve().parents[1] / "gdbinit.py"
LOOKUPS, WALKS = 1000, 50
GROWTH_LIMIT = 64 << 20          # bytes of gdb RSS growth allowed after warm-up

SAMPLE = """
import json
from gdbhandles.gdb import commands
with commands.session.open() as windows:
    counter = windows.kernel.space.u64({counter})
    records = [record.to_json() for record in windows.walk({pid})]
print(json.dumps({{"counter": counter, "records": records}}))
"""


def key(record: dict) -> tuple[int, str]:
    return record["handle"], json.dumps(record, sort_keys=True)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def vm_running(gdb: Gdb) -> bool:
    return gdb.console("handle vmstatus").strip().startswith("QEMU: running")


def test_soak_of_auto_paused_lookups_and_walks(tmp_path):
    directory = cached_guest("19041", "churn")
    churn = json.loads((directory / "truth.json").read_text())["churn"]
    states = [sorted(churn["states"][name], key=key) for name in ("A", "B")]
    known = {key(r) for state in states for r in state}
    # handles both states hold (one only A holds is rightly "free" while B is there)
    handles = sorted({r["handle"] for r in states[0]} & {r["handle"] for r in states[1]})
    script = tmp_path / "sample.py"
    script.write_text(SAMPLE.format(counter=churn["counter"], pid=churn["pid"]))
    with booted(directory) as vm, Gdb(timeout=120) as gdb:
        gdb.source(str(GDBINIT))
        gdb.connect(vm.gdb)
        gdb.console(f"set handle qmp {vm.qmp}")
        gdb.console("set handle auto-pause on")
        gdb.console("set handle progress off")
        gdb.cont()
        whole = 0
        for i in range(LOOKUPS):
            if i == 100:
                warm = rss(gdb.pid)
            handle = handles[i % len(handles)]
            record, = gdb.json(f"handle lookup {churn['pid']} {handle:#x} --json")
            assert key(record) in known, record
            if i % (LOOKUPS // WALKS) == 0:
                # the last line: gdb may print the SIGINT stop of the previous pause before it
                sample = json.loads(gdb.console(f"source {script}").strip().splitlines()[-1])
                records = sorted(sample["records"], key=key)
                assert {key(r) for r in records} <= known
                if sample["counter"] % 2 == 0:
                    assert records == states[(sample["counter"] // 2) % 2]
                    whole += 1
        grown = rss(gdb.pid) - warm
        assert grown < GROWTH_LIMIT, f"gdb grew by {grown >> 20} MiB over {LOOKUPS - 100} lookups"
        assert whole, "the counter was odd in every sampled pause"
        deadline = time.monotonic() + 30
        while not vm_running(gdb):                 # gdb resumes it once it has taken the last stop
            assert time.monotonic() < deadline, gdb.console("handle vmstatus")
            gdb.drain()
