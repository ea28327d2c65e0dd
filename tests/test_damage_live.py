"""Damaged guests under QEMU with a real gdb: the walk lists every intact record, each damage is
one warning line, a lookup into the damage is a one-line error, and gdb stays usable after."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from boot import booted                       # vm-images/, put on sys.path by conftest.py
from gdbhandles.automation.mi import Gdb, MiError
from gdbhandles.records import HANDLE_KEYS
from winguest.cache import guest as cached_guest

pytestmark = pytest.mark.integration

GDBINIT = Path(__file__).resolve().parents[1] / "gdbinit.py"
KINDS = ("amplify", "process-loop", "kcb-loop", "low-unmapped", "type-index")


def key(record: dict) -> tuple[int, int]:
    return record["pid"], record["handle"]


@pytest.mark.parametrize("profile", ["19041", "7601"])
def test_damaged_guest_in_gdb(profile):
    directory = cached_guest(profile, "default", 0, None, KINDS)
    truth = json.loads((directory / "truth.json").read_text())
    with booted(directory) as vm, Gdb(timeout=120) as gdb:
        gdb.source(str(GDBINIT))
        gdb.connect(vm.gdb)
        walked = gdb.console_result("handle walk all --json", timeout=600)
        records = json.loads(walked.console[walked.console.index("["):])
        assert sorted(({k: r[k] for k in HANDLE_KEYS} for r in records), key=key) == sorted(truth["handles"], key=key)
        warnings = [text for text in walked.log.splitlines() if text.startswith("warning")]
        for damage in truth["damage"]:
            naming = [text for text in warnings if any(word in text for word in damage["words"])]
            assert len(naming) == damage["lines"], (damage, warnings)
        assert len(warnings) == sum(d["lines"] for d in truth["damage"]), warnings
        marked = {tuple(m) for d in truth["damage"] for m in d["marked"]}
        assert {key(r) for r in records if r.get("problems")} == marked
        for damage in truth["damage"]:
            ask = damage["lookup"]
            if ask is None or ask.get("record"):
                continue
            with pytest.raises(MiError) as error:
                gdb.console(f"handle lookup {ask['pid']} {ask['handle']:#x}", timeout=600)
            assert "Traceback" not in error.value.log
            assert "\n" not in error.value.message.strip()
            assert all(word in error.value.message for word in ask["words"]), error.value.message
        listed = gdb.console_result("handle ps", timeout=600)
        assert any("process list" in text for text in listed.log.splitlines())
        # gdb is still usable: its own commands and ours answer
        assert "rip" in gdb.console("info registers rip")
        sample = truth["handles"][len(truth["handles"]) // 2]
        assert gdb.json(f"handle lookup {sample['pid']} {sample['handle']:#x} --json", timeout=600)[0]["object"] \
            == sample["object"]
