"""The fault suite: real QEMU, real gdb, real signals. After each fault nothing we started is
left running or paused, and no file is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from boot import booted
from gdbhandles.automation.mi import Gdb, MiError
from gdbhandles.automation.qmp import Qmp
from qmp_peers import PEERS, Peer
from processes import children, gone, leftovers, tcp_listeners, wait_until
from test_qmp_live import attach
from test_regress_live import machine
from winguest.cache import guest as cached_guest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "gdbhandles.cli"]
MANY = ["ps"] * 40                   # keeps gdb busy long enough to be signalled there
STARTUP = 240                        # QEMU's loadvm and gdb's start under two CPU hogs: an event, not a delay


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


STAGES = {"qemu": "qemu-system-x86", "gdb": "gdb-mi"}


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL],
                         ids=lambda s: s.name)
def test_run_signalled(snapshotted, tmp_path, stage, sig):
    tmp = tmp_path / "tmp"
    run = cli(["run", "--qemu", snapshotted, "--snapshot", "base", "--", *MANY], tmp)
    try:
        started = wait_until(lambda: {p: n for p, n in children(run.pid).items()
                                      if n.startswith(STAGES[stage])} and children(run.pid),
                             timeout=STARTUP, what=f"{stage} started by gdbhandles run")
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
    started = wait_until(lambda: "gdb-mi" in children(run.pid).values() and children(run.pid), STARTUP,
                         what="gdb started")
    run.terminate()
    out, err = run.communicate(timeout=120)
    assert (run.returncode, err.strip()) == (2, "gdbhandles: stopped by SIGTERM; what it started is stopped")
    assert leftovers(tmp) == [] and not golden.exists()
    gone(started)


# --- gdb dies while the VM is paused by auto-pause: the guardian resumes it -----------------------

HOLD_PAUSE = """
import contextlib
import json
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
def sighup_default():
    """gdb keeps an inherited SIG_IGN for SIGHUP and then never quits on it: under `nohup` (or any
    parent ignoring SIGHUP) a test that sends gdb SIGHUP would wait for ever. Its gdb gets the default."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)


@pytest.fixture
def gdb_in_pause(tmp_path, monkeypatch, sighup_default):
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
        console_until(gdb, "IN-PAUSE save-vm")          # QMP's hold: gdb sees no stop
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


def test_ctrl_c_in_auto_pause_resumes_the_vm(gdb_in_pause):
    """Ctrl-C ends the hold: QEMU resumes the VM, and gdb, which saw no stop, still has it running."""
    vm, gdb, tmp, release = gdb_in_pause
    helpers = children(gdb.pid)
    gdb.ctrl_c()
    result = gdb.result(gdb._token, timeout=60)        # `source` shows the script's traceback
    assert "KeyboardInterrupt" in result.log and "Task exception" not in result.log
    wait_until(lambda: gdb.console("handle vmstatus").strip() == "QEMU: running; gdb: running",
               what="the VM resumed")
    assert [r for r in gdb.backlog if r.get("message") == "stopped"] == []
    gone(helpers)
    assert leftovers(tmp) == []


def test_run_serves_the_gdbstub_on_a_private_unix_socket(snapshotted, tmp_path):
    """No TCP port: another local user cannot reach the gdbstub of `gdbhandles run`."""
    tmp = tmp_path / "tmp"
    run = cli(["run", "--qemu", snapshotted, "--snapshot", "base", "--", *MANY], tmp)
    try:
        started = wait_until(lambda: "gdb-mi" in children(run.pid).values() and children(run.pid), STARTUP,
                             what="gdb")
        qemu = next(pid for pid, name in started.items() if name.startswith("qemu"))
        command = Path(f"/proc/{qemu}/cmdline").read_bytes().split(b"\0")
        stub = command[command.index(b"-chardev") + 1].decode()
        socket_path = Path(stub.split("path=")[1].split(",")[0])
        assert socket_path.parent.parent == tmp and socket_path.parent.stat().st_mode & 0o777 == 0o700
        assert b"chardev:gdbstub0" in command and not any(b"tcp:" in arg for arg in command)
        assert tcp_listeners(qemu) == []
        run.terminate()
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 2 and leftovers(tmp) == []


def test_boot_py_serves_gdb_only_through_the_private_directory_by_default():
    with booted(cached_guest("19041", "default")) as vm:
        assert vm.port == 0 and tcp_listeners(vm.pid) == []
        assert Path(vm.gdb).parent.stat().st_mode & 0o777 == 0o700
        run = subprocess.run([*CLI, "run", "--gdb", vm.gdb, "--qmp", vm.qmp, "--", "ps"], capture_output=True,
                             text=True, cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stderr
        assert [p["pid"] for p in json.loads(run.stdout)][0] == 4


@pytest.mark.parametrize("option", [[], ["--gdb-tcp"]], ids=["default", "gdb-tcp"])
def test_boot_py_prints_where_its_gdbstub_is(option, tmp_path):
    """boot.py's default is the unix socket in its 0700 directory; --gdb-tcp is the explicit
    choice of a free port on 127.0.0.1. gdb attaches to what it prints, either way."""
    boot = subprocess.Popen([sys.executable, str(ROOT / "vm-images" / "boot.py"), "--scratch", *option,
                             str(cached_guest("19041", "default"))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        kind, where = boot.stdout.readline().split()           # printed once the guest is up
        qemu = next(pid for pid, name in children(boot.pid).items() if name.startswith("qemu"))
        if option:
            assert kind == "gdb-port" and tcp_listeners(qemu) == [f"0100007F:{int(where):04X}"]   # 127.0.0.1
            target = f"127.0.0.1:{where}"
        else:
            assert kind == "gdb-socket" and tcp_listeners(qemu) == []
            assert Path(where).parent.parent == tmp_path and Path(where).parent.stat().st_mode & 0o777 == 0o700
            target = where
        with Gdb(timeout=120) as gdb:
            gdb.source(str(ROOT / "gdbinit.py"))
            gdb.connect(target)
            assert gdb.json("handle ps --json")[0]["pid"] == 4
    finally:
        boot.terminate()
        boot.communicate(timeout=60)
    assert leftovers(tmp_path) == []


# --- the gdbstub goes away in the middle of a walk -------------------------------------------------

class CuttingProxy:
    """A forwarder between gdb and QEMU's gdbstub that calls `fault()` once `after` more bytes came
    from QEMU after arm(): the middle of a walk, reached by an event, not by a timer."""

    def __init__(self, port: int):
        self.port = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.armed_at = None
        self.passed = 0
        self.fault = None
        self.fired = threading.Event()
        self.sockets = []
        threading.Thread(target=self._serve, daemon=True).start()

    def arm(self, after: int, fault) -> None:
        self.fault, self.armed_at = fault, self.passed + after

    def _pump(self, source, sink, from_qemu: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(4096):
                sink.sendall(data)
                if from_qemu:
                    self.passed += len(data)
                    if self.armed_at is not None and self.passed >= self.armed_at and not self.fired.is_set():
                        self.fired.set()
                        self.fault()
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            client, _ = self.listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.port))
            self.sockets = [client, upstream]
            for source, sink, from_qemu in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(source, sink, from_qemu), daemon=True).start()

    def drop(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.drop()
        self.listener.close()


def one_line(exc: MiError) -> str:
    assert "Traceback" not in exc.log and "\n" not in exc.message.strip(), exc.log
    return exc.message


@pytest.mark.parametrize("fault", ["gdbstub dropped", "QEMU killed"])
def test_walk_loses_its_target_midway(fault, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with booted(cached_guest("19041", "default"), gdb_socket=False) as vm, Gdb(timeout=300) as gdb:
        proxy = CuttingProxy(vm.port)
        try:
            gdb.source(str(ROOT / "gdbinit.py"))
            gdb.connect("127.0.0.1", proxy.listener.getsockname()[1])
            gdb.console(f"set handle qmp {vm.qmp}")
            assert gdb.json("handle ps --json")[0]["pid"] == 4        # the path works before the fault
            proxy.arm(64 << 10, proxy.drop if fault == "gdbstub dropped" else vm.proc.kill)
            with pytest.raises(MiError) as exc:
                gdb.console("handle walk all --json", timeout=300)
            assert proxy.fired.is_set()
            one_line(exc.value)
            for command in ("handle ps", "handle walk 4", "handle lookup 4 4", "handle info"):
                with pytest.raises(MiError) as exc:         # gdb answers, with one line
                    gdb.console(command, timeout=60)
                one_line(exc.value)
            assert "GNU gdb" in gdb.console("show version")
        finally:
            proxy.close()
        if fault == "QEMU killed":
            vm.proc.wait()
        else:
            assert qemu_status(vm.qmp) in ("paused", "debug", "running")
    assert leftovers(tmp_path) == []


# --- hostile QMP peers behind gdb's handle commands and the CLI ------------------------------------

GDB_QMP_COMMANDS = ["handle vmstatus", "handle pause", "handle resume"]


@pytest.mark.parametrize("peer", ["silent", "greets_then_silent", "echoes", "capabilities_only", "hangs_up",
                                  "nonsense"])
def test_hostile_qmp_peer_in_gdb_is_one_line(peer, tmp_path):
    """Each step has a time limit (5 s connect, 10 s per command): no command blocks for ever."""
    with booted(cached_guest("19041", "default")) as vm, Gdb(timeout=120) as gdb, \
            Peer(tmp_path / "qmp.sock", PEERS[peer]):
        attach(vm, gdb)
        gdb.console(f"set handle qmp {tmp_path / 'qmp.sock'}")
        for command in GDB_QMP_COMMANDS:
            with pytest.raises(MiError) as exc:
                gdb.console(command, timeout=60)
            assert "QMP" in one_line(exc.value) or "qmp" in exc.value.message
        gdb.cont()                                     # a running target: auto-pause goes through QMP
        gdb.console("set handle auto-pause on")
        with pytest.raises(MiError) as exc:
            gdb.console("handle walk 4", timeout=60)
        one_line(exc.value)
        gdb.interrupt()
        assert gdb.json("handle ps --json")[0]["pid"] == 4          # gdb is still usable


def test_ctrl_c_while_qmp_peer_is_silent(tmp_path):
    with booted(cached_guest("19041", "default")) as vm, Gdb(timeout=120) as gdb, \
            Peer(tmp_path / "qmp.sock", PEERS["silent"]) as peer:
        attach(vm, gdb)
        gdb.console(f"set handle qmp {tmp_path / 'qmp.sock'}")
        token = gdb.send('-interpreter-exec console "handle vmstatus"')
        wait_until(peer.connected.is_set, what="gdb waiting for the greeting")
        gdb.ctrl_c()
        with pytest.raises(MiError) as exc:
            gdb.result(token, timeout=60)
        assert exc.value.message == "Quit" and "Task exception" not in exc.value.log and "Traceback" not in exc.value.log
        assert gdb.console("handle version")


@pytest.mark.parametrize("peer", ["silent", "capabilities_only"])
def test_snapshot_against_a_hostile_peer_exits_2(peer, tmp_path):
    with Peer(tmp_path / "qmp.sock", PEERS[peer]):
        run = subprocess.run([*CLI, "snapshot", "--qmp", str(tmp_path / "qmp.sock"), "--name", "x"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "QMP" in run.stderr


@contextlib.contextmanager
def qmp_over_tcp(path: str):
    """QEMU's unix QMP socket reached as tcp:127.0.0.1:PORT (one forward per client): auto-pause
    then pauses with QMP `stop` and resumes through gdb, as it does for a TCP monitor."""
    listener = socket.create_server(("127.0.0.1", 0))

    def pump(source, sink) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                upstream = socket.socket(socket.AF_UNIX)
                upstream.connect(path)
                for pair in ((client, upstream), (upstream, client)):
                    threading.Thread(target=pump, args=pair, daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"tcp:127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.mark.parametrize("monitor", ["unix", "tcp"])
def test_ctrl_c_during_the_auto_pause_ram_dump(tmp_path, monkeypatch, monitor):
    """Ctrl-C while QEMU writes the RAM dump of a 2 GiB guest (the path taken without the fast
    path), paused by QMP's hold (a unix monitor) or by QMP `stop` (a TCP one). QEMU cannot cancel
    a pmemsave and serves nothing else until it ends: with `stop`, a resume through gdb sent
    meanwhile timed out and left QEMU paused with gdb believing it ran. Now gdb says so in one
    line, removes the partial dump, waits for QEMU, resumes: the VM runs, gdb and QEMU in step,
    no dump, no guardian, no asyncio traceback, and gdb stays usable."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    script = tmp_path / "dump.py"
    script.write_text("from gdbhandles.gdb import paused\n"
                      "with paused.paused_vm() as q, paused.ram_dump(q):\n    pass\n")
    with booted(cached_guest("19041", "default"), ram_mib=2048) as vm, Gdb(timeout=120) as gdb, \
            (qmp_over_tcp(vm.qmp) if monitor == "tcp" else contextlib.nullcontext(vm.qmp)) as address:
        attach(vm, gdb)
        gdb.console(f"set handle qmp {address}")
        gdb.cont()
        wait_until(lambda: qemu_status(vm.qmp) == "running", what="the guest running")
        token = gdb.send(f'-interpreter-exec console "source {script}"')
        wait_until(lambda: list(tmp.glob("gdbhandles-dump-*/ram.raw")), what="QEMU writing the dump")
        helpers = children(gdb.pid)
        gdb.ctrl_c()
        log = gdb.result(token, timeout=120).log          # `source` shows the script's traceback
        assert "QEMU cannot cancel the RAM dump" in log and "KeyboardInterrupt" in log, log
        assert "Task exception" not in log
        assert leftovers(tmp) == []                    # removed before the command returned
        wait_until(lambda: qemu_status(vm.qmp) == "running", STARTUP, "the VM resumed (after the whole dump)")
        wait_until(lambda: gdb.console("handle vmstatus").strip().splitlines()[-1] == "QEMU: running; gdb: running",
                   what="gdb in step with QEMU")
        gone(helpers)
        gdb.interrupt()
        assert gdb.json("handle ps --json")[0]["pid"] == 4          # gdb is still usable


@pytest.mark.parametrize("victim", ["gdb-mi", "qemu-system-x86"])
def test_run_survives_its_gdb_or_qemu_being_killed(snapshotted, tmp_path, victim):
    """SIGKILL to the gdb or the QEMU that `gdbhandles run` drives: one line, exit 2, nothing left."""
    tmp = tmp_path / "tmp"
    run = cli(["run", "--qemu", snapshotted, "--snapshot", "base", "--", *MANY], tmp)
    try:
        started = wait_until(lambda: "gdb-mi" in children(run.pid).values() and children(run.pid), STARTUP,
                             what="gdb")
        os.kill(next(pid for pid, name in started.items() if name.startswith(victim)), signal.SIGKILL)
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    gone(started)
    assert leftovers(tmp) == []
