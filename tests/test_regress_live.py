"""`gdbhandles snapshot|run|regress` as a CI pipeline uses them: real QEMU, real gdb, the
shell command itself (a subprocess), exit codes and output checked."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from machines import machine as guest_machine
from gdbhandles.automation.regress import compare
from winguest.cache import guest as cached_guest

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "gdbhandles.cli"]


def machine(seed: int, tmp_path: Path) -> tuple[str, dict]:
    """QEMU arguments of a test guest with its own copy of the disk, and its truth."""
    args, _disk, truth = guest_machine(seed, tmp_path)
    return args, truth


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
        where = ["--gdb", vm.gdb, "--qmp", vm.qmp]
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


def shell(command: str) -> tuple[str, str, int]:
    """A shell pipeline (`... | head -3`): its stdout, stderr and the first command's status."""
    done = subprocess.run(["bash", "-c", command + '; echo "status ${PIPESTATUS[0]}"'], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    out, _, status = done.stdout.rpartition("status ")
    return out, done.stderr, int(status)


def test_run_text_commands_closed_pipe_and_a_snapshot_required(tmp_path):
    base, truth = machine(0, tmp_path)
    assert gdbhandles("snapshot", "--qemu", base, "--name", "base", "--wait", "1").returncode == 0
    run = gdbhandles("run", "--qemu", base, "--snapshot", "base", "--", "vmstatus", "pause", "ps")
    assert run.returncode == 0, run.stderr
    status, paused, processes = json.loads(run.stdout)
    assert status == "QEMU: prelaunch; gdb: stopped", status      # -S -loadvm: paused before it ran
    assert paused == "VM not running (QEMU status: prelaunch)", paused
    assert [p["pid"] for p in processes] == [p["pid"] for p in truth["processes"]]
    unknown = gdbhandles("run", "--qemu", base, "--snapshot", "base", "--", "frobnicate")
    assert unknown.returncode == 2 and "frobnicate: not a handle command" in unknown.stderr

    cli = shlex.join(CLI)
    out, err, status = shell(f"{cli} run --qemu {shlex.quote(base)} --snapshot base -- 'walk all' | head -3")
    assert (err, status) == ("", 141) and len(out.splitlines()) == 3

    unbooted = gdbhandles("run", "--qemu", base, "--", "ps")
    assert unbooted.returncode == 2 and "--qemu needs --snapshot NAME" in unbooted.stderr
    assert len(unbooted.stderr.strip().splitlines()) == 1
    noqmp = gdbhandles("run", "--qemu", base, "--snapshot", "base", "--qmp", str(tmp_path / "q.sock"), "--", "ps")
    assert noqmp.returncode == 2 and "--qmp goes with --gdb" in noqmp.stderr


def test_walk_into_a_closed_pipe_is_quiet(built_guest):
    dump = built_guest("19041") / "memory.raw"
    out, err, status = shell(f"{shlex.join(CLI)} walk --dump {dump} | head -5")
    assert (err, status) == ("", 141) and len(out.splitlines()) == 5


def test_attach_errors_are_one_line(tmp_path):
    from boot import booted, free_port
    port = free_port()
    refused = gdbhandles("run", "--gdb", f"127.0.0.1:{port}", "--", "ps")
    assert refused.stderr == f"gdbhandles: gdb could not attach to 127.0.0.1:{port}: Connection refused.\n", \
        refused.stderr
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1
    with booted(cached_guest("19041", "default", 0)) as vm:
        missing = gdbhandles("run", "--gdb", vm.gdb, "--qmp", str(tmp_path / "nonexist.sock"),
                             "--", "ps")
        assert missing.returncode == 2 and "no such file" in missing.stderr, missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1
        works = gdbhandles("run", "--gdb", vm.gdb, "--qmp", vm.qmp, "--", "vmstatus")
        assert works.returncode == 0 and json.loads(works.stdout) == "QEMU: paused; gdb: stopped", works.stdout
        from gdbhandles.automation.qmp import Qmp
        with Qmp(vm.qmp) as q:                 # gdb detached: the VM runs on
            assert q.status() == "running"
