"""QMP inside gdb against real QEMU guests: pause/resume/vmstatus kept in step with gdb,
auto-pause on the `churn` guest (every walk is one whole table state), and the errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from boot import booted
from gdbhandles.windows.memory import DumpFile
from gdbhandles.engine import Windows
from gdbhandles.automation.mi import Gdb, MiError
from gdbhandles.automation.qmp import Qmp, QmpError
from winguest.cache import guest as cached_guest

pytestmark = pytest.mark.integration
GDBINIT = Path(__file__).resolve().parents[1] / "gdbinit.py"


def attach(vm, gdb: Gdb) -> None:
    gdb.source(str(GDBINIT))
    gdb.connect(vm.gdb)
    gdb.console(f"set handle qmp {vm.qmp}")


def status(gdb: Gdb) -> str:
    return gdb.console("handle vmstatus").strip()


def wait_status(gdb: Gdb, want: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := status(gdb)) != want:
        assert time.monotonic() < deadline, f"status {got!r}, wanted {want!r}"
        time.sleep(0.05)


def one_line_error(gdb: Gdb, command: str) -> str:
    with pytest.raises(MiError) as exc:
        gdb.console(command, timeout=60)
    assert "Traceback" not in exc.value.log, exc.value.log
    assert "\n" not in exc.value.message.strip()
    return exc.value.message


def canonical(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: r["handle"])


def test_pause_resume_and_status_follow_gdb():
    with booted(cached_guest("19041", "default")) as vm, Gdb(timeout=60) as gdb:
        attach(vm, gdb)
        assert status(gdb).endswith("gdb: stopped") and not status(gdb).startswith("QEMU: running")
        assert gdb.console("handle resume").strip() == "VM resumed (through gdb)"
        wait_status(gdb, "QEMU: running; gdb: running")
        assert gdb.console("handle resume").strip() == "VM already running"
        assert gdb.console("handle pause").strip() == "VM paused (gdb reports the stop)"
        wait_status(gdb, "QEMU: paused; gdb: stopped")
        assert gdb.console("handle pause").strip() == "VM already paused"
        assert gdb.json("handle ps --json")[0]["pid"] == 4        # gdb reads the paused VM again


PAUSED_WALK = """
import json
from gdbhandles.gdb import commands
with commands.session.open() as windows:
    counter = windows.kernel.space.u64({counter})
    records = [record.to_json() for record in windows.walk({pid})]
print(json.dumps({{"counter": counter, "records": records}}))
"""


def from_states(records: list[dict], states: list[list[dict]]) -> bool:
    """Every record is the one state A or B holds at that handle (a copy may be half done)."""
    known = {(r["handle"], json.dumps(r, sort_keys=True)) for state in states for r in state}
    return all((r["handle"], json.dumps(r, sort_keys=True)) in known for r in records)


def test_auto_pause_reads_one_instant_of_the_churn_guest(tmp_path):
    directory = cached_guest("19041", "churn")
    truth = json.loads((directory / "truth.json").read_text())
    churn = truth["churn"]
    states = [canonical(churn["states"]["A"]), canonical(churn["states"]["B"])]
    assert states[0] != states[1]
    script = tmp_path / "paused_walk.py"
    script.write_text(PAUSED_WALK.format(counter=churn["counter"], pid=churn["pid"]))
    with booted(directory) as vm, Gdb(timeout=60) as gdb:
        attach(vm, gdb)
        gdb.cont()
        wait_status(gdb, "QEMU: running; gdb: running")
        assert "auto-pause" in one_line_error(gdb, f"handle walk {churn['pid']} --json")
        gdb.console("set handle auto-pause on")
        whole = 0
        for _ in range(8):
            # what the engine reads in one pause, with the guest's seqlock counter of that instant:
            # an even counter names the whole state the table must hold (generation parity)
            sample = json.loads(gdb.console(f"source {script}"))
            records = canonical(sample["records"])
            if sample["counter"] % 2 == 0:
                assert records == states[(sample["counter"] // 2) % 2]
                whole += 1
            else:
                assert from_states(records, states)
            wait_status(gdb, "QEMU: running; gdb: running")
            walked = canonical(gdb.json(f"handle walk {churn['pid']} --json"))
            assert from_states(walked, states)
            wait_status(gdb, "QEMU: running; gdb: running")
            time.sleep(0.1)
        assert whole, "the counter was odd in every pause"
        record = json.loads(gdb.console(f"handle lookup {churn['pid']} 4 --json"))[0]
        assert record["handle"] == 4 and from_states([record], states)
        wait_status(gdb, "QEMU: running; gdb: running")
        gdb.interrupt()                          # a VM paused by the user stays paused
        gdb.drain()
        wait_status(gdb, "QEMU: paused; gdb: stopped")
        assert from_states(canonical(gdb.json(f"handle walk {churn['pid']} --json")), states)
        time.sleep(0.3)
        assert status(gdb) == "QEMU: paused; gdb: stopped"


def test_auto_paused_commands_print_only_their_own_output():
    """Auto-pause holds the VM in a run state QEMU's gdbstub does not report: gdb sees no stop,
    so no command's raw console text (what a pygdbmi script reads) carries a "Program received
    signal SIGINT", and no *stopped record comes; the VM runs again when each command returns."""
    with booted(cached_guest("19041", "default")) as vm, Gdb(timeout=60) as gdb:
        attach(vm, gdb)
        gdb.console("set handle auto-pause on")
        gdb.cont()
        wait_status(gdb, "QEMU: running; gdb: running")
        outputs = {}
        for command in ("handle ps", "handle walk 4 --type File", "handle lookup 4 0x4", "handle ps --json",
                        "handle vmstatus"):
            outputs[command] = gdb.console(command)
        for command, text in outputs.items():
            assert "SIGINT" not in text and "Program received" not in text, (command, text)
        assert outputs["handle ps"].split()[0] == "PID"
        assert json.loads(outputs["handle ps --json"])[0]["pid"] == 4      # the whole console text is JSON
        assert outputs["handle vmstatus"] == "QEMU: running; gdb: running\n"
        assert [r for r in gdb.backlog if r.get("message") == "stopped"] == []
        stop = gdb.interrupt()                           # the first stop gdb hears of is the user's
        assert stop["payload"].get("signal-name") == "SIGINT"
        gdb.drain()
        wait_status(gdb, "QEMU: paused; gdb: stopped")


def test_without_pause_a_running_churn_guest_tears(tmp_path):
    """Why auto-pause exists: RAM dumped while the guest runs shows half-copied tables."""
    directory = cached_guest("19041", "churn")
    truth = json.loads((directory / "truth.json").read_text())
    churn = truth["churn"]
    states = [canonical(churn["states"]["A"]), canonical(churn["states"]["B"])]
    torn = 0
    with booted(directory) as vm, Qmp(vm.qmp) as q:
        q.cont()
        for attempt in range(30):
            path = tmp_path / f"live{attempt}.raw"
            q.pmemsave(str(path), q.ram_size())
            dump = DumpFile(path)
            try:
                windows = Windows.open(dump)
                records = canonical([r.to_json() for r in windows.walk(churn["pid"])])
            finally:
                dump.close()
                path.unlink()
            torn += records not in states
            if torn:
                break
    assert torn, "30 dumps of the running churn guest were all whole states"


def test_errors_are_one_line(tmp_path):
    with booted(cached_guest("19041", "default")) as vm, Gdb(timeout=60) as gdb:
        attach(vm, gdb)
        gdb.console(f"set handle qmp {tmp_path / 'missing.sock'}")
        assert "no such file" in one_line_error(gdb, "handle vmstatus")

        fake = tmp_path / "fake.sock"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(fake))
        server.listen(1)

        def talk_nonsense():
            connection, _ = server.accept()
            connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            time.sleep(1)
            connection.close()
        threading.Thread(target=talk_nonsense, daemon=True).start()
        gdb.console(f"set handle qmp {fake}")
        assert "not a QMP server" in one_line_error(gdb, "handle pause")
        server.close()

        gdb.console(f"set handle qmp tcp:10.1.2.3:4444")
        assert "tcp:127.0.0.1:PORT" in one_line_error(gdb, "handle vmstatus")

        gdb.console(f"set handle qmp {vm.qmp}")
        with Qmp(vm.qmp) as q:           # QMP serves one client: gdb's connection must wait
            with pytest.raises(QmpError, match="refused: Could not open"):
                q.pmemsave("/nonexistent/dir/ram.raw", 4096)

        vm.proc.kill()
        vm.proc.wait()
        assert "QEMU gone" in one_line_error(gdb, "handle vmstatus")
        message = one_line_error(gdb, "handle walk 4")
        assert message


def test_permission_denied_for_another_user(tmp_path):
    with booted(cached_guest("19041", "default")) as vm:
        assert os.stat(vm.qmp).st_mode & 0o777 == 0o600
        code = ("import sys; from gdbhandles.automation.qmp import Qmp, QmpError\n"
                "try: Qmp(sys.argv[1])\n"
                "except QmpError as e: print(e)")
        run = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                              sys.executable, "-c", code, vm.qmp], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=60)
        assert "permission denied" in run.stdout, run.stdout + run.stderr


def memory_line(info: str) -> str:
    return next(line for line in info.splitlines() if line.startswith("memory access: "))


def test_handle_info_under_auto_pause_names_where_memory_came_from():
    """A running target with auto-pause: `handle info` works and says the paused VM was read
    (RAM dump without the fast path, QEMU's process memory with it); after a stop, the stub or
    the fast path of the stopped target."""
    with booted(cached_guest("19041", "default")) as vm, Gdb(timeout=60) as gdb:
        attach(vm, gdb)
        gdb.console("set handle fast-path off")
        gdb.console("set handle auto-pause on")
        gdb.cont()
        wait_status(gdb, "QEMU: running; gdb: running")
        info = gdb.console("handle info")
        assert info.startswith("build        19041"), info
        assert memory_line(info).startswith("memory access: RAM dump of the VM paused through QMP (auto-pause)")
        wait_status(gdb, "QEMU: running; gdb: running")          # resumed after each command
        gdb.interrupt()
        gdb.drain()
        info = gdb.console("handle info")
        assert memory_line(info).startswith("memory access: QEMU physical mode (Qqemu.PhyMemMode); guest RAM: 0x0-")

        gdb.console("set handle fast-path auto")
        gdb.cont()
        wait_status(gdb, "QEMU: running; gdb: running")
        info = gdb.console("handle info")
        assert memory_line(info).startswith(f"memory access: QEMU process memory (/proc/{vm.pid}/mem, the fast path)")
        wait_status(gdb, "QEMU: running; gdb: running")
