"""`gdbhandles snapshot|run|regress` as a CI pipeline uses them: real QEMU, real gdb, the
shell command itself (a subprocess), exit codes and output checked."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from boot import qemu_command
from gdbhandles.automation.regress import compare
from winguest.cache import guest as cached_guest

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "gdbhandles.cli"]


def machine(seed: int, tmp_path: Path) -> tuple[str, dict]:
    """QEMU arguments of a test guest with its own copy of the disk, and its truth."""
    directory = cached_guest("19041", "default", seed)
    cfg = json.loads((directory / "guest.json").read_text())
    disk = tmp_path / f"disk{seed}.qcow2"
    shutil.copy(directory / cfg["files"]["disk"], disk)
    args = qemu_command(directory, cfg, 0, "unused", disk, cfg["smp"], None)[1:]
    for option in ("-gdb", "-qmp"):
        at = args.index(option)
        del args[at:at + 2]
    return shlex.join(args), json.loads((directory / "truth.json").read_text())


def gdbhandles(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1])


def key(records):
    return sorted(records, key=lambda r: (r["pid"], r["handle"]))


def test_snapshot_run_and_regress(tmp_path):
    base, truth = machine(0, tmp_path)
    saved = gdbhandles("snapshot", "--qemu", base, "--name", "base", "--wait", "1")
    assert saved.returncode == 0, saved.stderr
    assert "snapshot base saved in disk0" in saved.stderr

    run = gdbhandles("run", "--qemu", base, "--snapshot", "base", "--", "walk all", "ps")
    assert run.returncode == 0, run.stderr
    walked, processes = json.loads(run.stdout)
    assert key(walked) == key(truth["handles"])
    assert [p["pid"] for p in processes] == [p["pid"] for p in truth["processes"]]

    golden = tmp_path / "golden.json"
    update = gdbhandles("regress", "--qemu", base, "--snapshot", "base", "--expect", str(golden), "--update")
    assert update.returncode == 0, update.stderr
    assert key(json.loads(golden.read_text())) == key(truth["handles"])
    for _ in range(2):                        # the same snapshot, the same answer
        again = gdbhandles("regress", "--qemu", base, "--snapshot", "base", "--expect", str(golden))
        assert (again.returncode, again.stdout) == (0, ""), again.stdout + again.stderr

    other, other_truth = machine(1, tmp_path)        # another guest: other objects, other handles
    assert gdbhandles("snapshot", "--qemu", other, "--name", "base", "--wait", "1").returncode == 0
    changed = gdbhandles("regress", "--qemu", other, "--snapshot", "base", "--expect", str(golden))
    assert changed.returncode == 1, changed.stderr
    want = compare(truth["handles"], other_truth["handles"])
    assert want
    lines = changed.stdout.strip().splitlines()
    assert lines[-1] == f"{len(want.added)} added, {len(want.removed)} removed, {len(want.changed)} changed"
    assert sum(line.startswith("+ ") for line in lines) == len(want.added)
    assert sum(line.startswith("- ") for line in lines) == len(want.removed)
    assert sum(line.startswith("~ ") for line in lines) == len(want.changed)
    if want.changed:
        old, new = want.changed[0]
        assert any(line.startswith(f"~ pid {new['pid']} ({new['process']}) handle {new['handle']:#x}:")
                   for line in lines)


def test_errors_exit_2(tmp_path):
    base, _ = machine(0, tmp_path)
    missing = gdbhandles("regress", "--qemu", base, "--snapshot", "nosuch", "--expect", str(tmp_path / "g.json"),
                         "--update")
    assert missing.returncode == 2 and missing.stderr.startswith("gdbhandles: QEMU exited:"), missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    reserved = gdbhandles("run", "--qemu", base + " -s", "--", "ps")
    assert reserved.returncode == 2 and "must not contain -s" in reserved.stderr
    nogolden = gdbhandles("regress", "--qemu", base, "--snapshot", "x", "--expect", str(tmp_path / "none.json"))
    assert nogolden.returncode == 2 and "no golden file" in nogolden.stderr
    remote = gdbhandles("run", "--gdb", "10.0.0.1:1234", "--", "ps")
    assert remote.returncode == 2 and "127.0.0.1" in remote.stderr


def test_attach_to_a_running_qemu(tmp_path):
    """--gdb/--qmp: regress against a QEMU someone else runs; it keeps running afterwards."""
    from boot import booted
    from gdbhandles.automation.qmp import Qmp
    directory = cached_guest("19041", "default", 0)
    truth = json.loads((directory / "truth.json").read_text())
    golden = tmp_path / "golden.json"
    with booted(directory) as vm:
        where = ["--gdb", f"127.0.0.1:{vm.port}", "--qmp", vm.qmp]
        update = gdbhandles("regress", *where, "--expect", str(golden), "--update")
        assert update.returncode == 0, update.stderr
        assert key(json.loads(golden.read_text())) == key(truth["handles"])
        again = gdbhandles("regress", *where, "--expect", str(golden))
        assert again.returncode == 0, again.stdout + again.stderr
        saved = gdbhandles("snapshot", "--qmp", vm.qmp, "--name", "later")
        assert saved.returncode == 0, saved.stderr
        assert vm.proc.poll() is None
        with Qmp(vm.qmp) as q:
            assert q.status() == "running"
            assert "later" in q.hmp("info snapshots")
