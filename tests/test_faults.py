"""The fault suite: real QEMU, real gdb, real signals. After each fault nothing we started is
left running or paused, and no file is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from processes import children, gone, leftovers, wait_until
from test_regress_live import machine

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "gdbhandles.cli"]
MANY = ["ps"] * 40                   # keeps gdb busy long enough to be signalled there


@pytest.fixture(scope="module")
def snapshotted(tmp_path_factory):
    """QEMU arguments of a guest whose disk holds the snapshot `base`."""
    tmp = tmp_path_factory.mktemp("faults")
    base, _ = machine(0, tmp)
    saved = subprocess.run([*CLI, "snapshot", "--qemu", base, "--name", "base", "--wait", "0.5"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert saved.returncode == 0, saved.stderr
    return base


def cli(args: list[str], tmp: Path) -> subprocess.Popen:
    """`gdbhandles ARGS` with its own TMPDIR, so that what it leaves there can be seen."""
    tmp.mkdir(exist_ok=True)
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)})


def run_again_works(base: str, tmp: Path) -> None:
    """The next run starts (no qcow2 lock left) and removes what a killed run left."""
    again = cli(["run", "--qemu", base, "--snapshot", "base", "--", "ps"], tmp)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert leftovers(tmp) == []


STAGES = {"qemu": "qemu-system-x86", "gdb": "gdb"}


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL],
                         ids=lambda s: s.name)
def test_run_signalled(snapshotted, tmp_path, stage, sig):
    tmp = tmp_path / "tmp"
    run = cli(["run", "--qemu", snapshotted, "--snapshot", "base", "--", *MANY], tmp)
    try:
        started = wait_until(lambda: {p: n for p, n in children(run.pid).items()
                                      if n.startswith(STAGES[stage])} and children(run.pid),
                             what=f"{stage} started by gdbhandles run")
        run.send_signal(sig)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    if sig == signal.SIGKILL:
        assert run.returncode == -signal.SIGKILL
    else:
        assert run.returncode == 2, err
        want = "interrupted" if sig == signal.SIGINT else f"stopped by {sig.name}"
        assert err.strip() == f"gdbhandles: {want}" + ("" if sig == signal.SIGINT else "; what it started is stopped")
        assert leftovers(tmp) == []
    gone(started)
    run_again_works(snapshotted, tmp)


def test_regress_sigterm(snapshotted, tmp_path):
    tmp = tmp_path / "tmp"
    golden = tmp_path / "golden.json"
    run = cli(["regress", "--qemu", snapshotted, "--snapshot", "base", "--expect", str(golden), "--update"], tmp)
    started = wait_until(lambda: "gdb" in children(run.pid).values() and children(run.pid), what="gdb started")
    run.terminate()
    out, err = run.communicate(timeout=120)
    assert (run.returncode, err.strip()) == (2, "gdbhandles: stopped by SIGTERM; what it started is stopped")
    assert leftovers(tmp) == [] and not golden.exists()
    gone(started)
