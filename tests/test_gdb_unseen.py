"""Kernels we have never seen, in a real gdb on live guests under QEMU: the test-bed build
`future` (no shipped layout, no symbols, its exports in varied encodings) and a shipped build
read with `set handle layout infer`, compared with truth.json."""

from __future__ import annotations

import pytest

from test_engine_guests import short_names
from test_gdb_live import check_every_vcpu, check_pseudo_handles, live_guest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["default", "kpti"])
def future(request):
    with live_guest("future", request.param) as guest:
        yield guest


def test_future_walk_ps_lookup_equal_truth(future):
    check_every_vcpu(future, lookups=6)                     # kpti: the user-mode vCPU selected too
    processes = future.json("handle ps --json")
    assert [(p["pid"], p["name"], p["handle_table"]) for p in processes] == \
        [(p["pid"], p["name"], p["handle_table"]) for p in future.truth["processes"]]
    check_pseudo_handles(future)


def test_future_info_lists_inferred_offsets_and_checks(future):
    text = future.gdb.console("handle info")
    assert "inferred from the kernel's code and live data" in text
    for name in ("_EPROCESS.UniqueProcessId", "_EPROCESS.ObjectTable", "_ETHREAD.Cid", "_KTHREAD.ApcState.Process"):
        assert name in text, name
    assert "FAILED" not in text
    for name in ("_KPCR.Prcb.CurrentThread", "_EPROCESS.Pcb.DirectoryTableBase", "_CM_KEY_CONTROL_BLOCK.ParentKcb",
                 "_CM_KEY_CONTROL_BLOCK.NameBlock"):                                # two ways each, live
        line = next(line for line in text.splitlines() if line.strip().startswith(name))
        assert "code:" in line and "live:" in line, line
    checks = next(line for line in text.splitlines() if line.startswith("checks"))
    passed, total = checks.split()[1], checks.split()[3]
    assert passed == total and int(total) >= 15, checks


def test_shipped_build_with_layout_infer():
    with live_guest("22000", "default") as live:
        live.gdb.console("set handle layout infer")
        assert "infer" in live.gdb.console("show handle layout")
        # an inferred layout has no full image names: the 15-byte ImageFileName, with one note
        assert live.json("handle walk all --json") == short_names(live.truth)["handles"]
        assert "inferred offsets" in live.gdb.console("handle info")
        live.gdb.console("set handle layout auto")
        assert "inferred offsets" not in live.gdb.console("handle info")
