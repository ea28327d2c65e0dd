"""The fault suite: real QEMU, real gdb, real signals. After each fault nothing we started is
left running or paused, and no file is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from boot import booted
from gdbhandles.automation.mi import Gdb, MiError
from gdbhandles.automation.qmp import Qmp
from processes import children, gone, leftovers, wait_until
from test_qmp_live import attach
from test_regress_live import machine
from winguest.cache import guest as cached_guest

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


# --- gdb dies while the VM is paused by auto-pause: the guardian resumes it -----------------------

HOLD_PAUSE = """
import os
import time
import gdb
from gdbhandles.gdb import paused
with paused.paused_vm() as q, paused.ram_dump(q):
    gdb.write(f"IN-PAUSE {q.status()}\\n")
    gdb.flush()
    while not os.path.exists(RELEASE):      # a walk that lasts until the test lets it end
        time.sleep(0.05)
"""


def qemu_status(qmp: str) -> str:
    with Qmp(qmp, connect_timeout=30) as q:
        return q.status()


def console_until(gdb: Gdb, marker: str, timeout: float = 120) -> None:
    """Read gdb's output while a command runs, until it prints `marker`."""
    seen = []

    def arrived() -> bool:
        seen.extend(str(r.get("payload")) for r in gdb._read(0.05))
        return marker in "".join(seen)
    try:
        wait_until(arrived, timeout, f"{marker!r} from gdb")
    except AssertionError:
        raise AssertionError(f"no {marker!r} from gdb; it said {''.join(seen)[-2000:]}") from None


@pytest.fixture
def gdb_in_pause(tmp_path, monkeypatch):
    """A gdb holding the running guest paused by auto-pause (its RAM dump in TMPDIR)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    script = tmp_path / "hold.py"
    script.write_text(HOLD_PAUSE.replace("RELEASE", repr(str(tmp_path / "release"))))
    with booted(cached_guest("19041", "default")) as vm, Gdb(timeout=120) as gdb:
        attach(vm, gdb)
        gdb.cont()
        wait_until(lambda: qemu_status(vm.qmp) == "running", what="the guest running")
        gdb.send(f"-interpreter-exec console \"source {script}\"")
        console_until(gdb, "IN-PAUSE paused")
        assert [p.name for p in tmp.iterdir()][0].startswith(f"gdbhandles-dump-{gdb.pid}-")
        yield vm, gdb, tmp, tmp_path / "release"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP, signal.SIGTERM], ids=lambda s: s.name)
def test_gdb_killed_in_auto_pause_leaves_the_vm_running(gdb_in_pause, sig):
    vm, gdb, tmp, release = gdb_in_pause
    helpers = children(gdb.pid)
    assert any(name.startswith("python") for name in helpers.values()), helpers     # the guardian
    os.kill(gdb.pid, sig)
    release.touch()                  # what gdb does next is its own affair: a walk would end now
    gone([gdb.pid])
    wait_until(lambda: vm.proc.poll() is not None or qemu_status(vm.qmp) == "running",
               what="the VM resumed by the guardian")
    assert vm.proc.poll() is None, "QEMU exited"
    gone(helpers)
    wait_until(lambda: leftovers(tmp) == [], what="the RAM dump removed")


def test_ctrl_c_in_auto_pause_resumes_through_gdb(gdb_in_pause):
    vm, gdb, tmp, release = gdb_in_pause
    helpers = children(gdb.pid)
    gdb.ctrl_c()
    result = gdb.result(gdb._token, timeout=60)        # `source` shows the script's traceback
    assert "KeyboardInterrupt" in result.log and "Task exception" not in result.log
    gdb.wait_async("running", timeout=60)              # gdb took the stop and resumed
    wait_until(lambda: gdb.console("handle vmstatus").strip() == "QEMU: running; gdb: running",
               what="the VM resumed through gdb")
    gone(helpers)
    assert leftovers(tmp) == []
