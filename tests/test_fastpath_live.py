"""The local fast path (guest RAM read from the QEMU process) against real QEMU guests: the same
records as the gdbstub on every scenario of one profile, auto-paused walks of 4 and 8 GiB
guests, and the reasons shown when it cannot be used (a proxy in front of the stub, another uid)."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from boot import booted                       # vm-images/, put on sys.path by conftest.py
from gdbhandles.automation import qemu_ram
from gdbhandles.automation.mi import Gdb, MiError
from gdbhandles.automation.qmp import Qmp
from winguest.cache import guest as cached_guest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
GDBINIT = ROOT / "gdbinit.py"


def key(record: dict) -> tuple[int, int]:
    return record["pid"], record["handle"]


@contextlib.contextmanager
def attached(scenario: str = "default", ram_mib: int | None = None, gdb_socket: bool = True):
    directory = cached_guest("19041", scenario)
    truth = json.loads((directory / "truth.json").read_text())
    with booted(directory, ram_mib=ram_mib, gdb_socket=gdb_socket) as vm, Gdb(timeout=120) as gdb:
        gdb.source(str(GDBINIT))
        yield vm, gdb, truth


@pytest.mark.parametrize("scenario", ["default", "kpti", "level2", "churn",
                                      pytest.param("big", marks=pytest.mark.slow)])
def test_fast_path_equals_stub_record_for_record(scenario):
    """churn is read paused (gdb stopped it), so both paths see the same instant."""
    with attached(scenario) as (vm, gdb, truth):
        gdb.connect(vm.gdb)
        fast_ps = gdb.json("handle ps --json", timeout=600)
        fast = gdb.json("handle walk all --json", timeout=900)
        info = gdb.console("handle info")
        assert f"/proc/{vm.pid}/mem, the fast path" in info and "fast path not used" not in info, info
        gdb.console("set handle fast-path off")
        stub_ps = gdb.json("handle ps --json", timeout=600)
        stub = gdb.json("handle walk all --json", timeout=900)
        info = gdb.console("handle info")
        assert "QEMU physical mode" in info and "fast path not used: set handle fast-path off" in info, info
        assert fast == stub and fast_ps == stub_ps
        if scenario != "churn":          # churn's truth is one of two states
            assert sorted(fast, key=key) == sorted(truth["handles"], key=key)
        record = truth["handles"][len(truth["handles"]) // 3]
        lookup = f"handle lookup {record['pid']} {record['handle']:#x} --json"
        stub_lookup = gdb.json(lookup)
        gdb.console("set handle fast-path on")
        assert gdb.json(lookup) == stub_lookup


@pytest.mark.parametrize("ram_mib", [4096, 8192])
def test_auto_paused_walk_of_a_large_guest_reads_the_process(ram_mib):
    """No RAM dump, so no size limit: the VM is paused, read in place and resumed."""
    with attached("default", ram_mib=ram_mib) as (vm, gdb, truth):
        gdb.connect(vm.gdb)
        gdb.console(f"set handle qmp {vm.qmp}")
        gdb.console("set handle auto-pause on")
        gdb.cont()
        records = gdb.json("handle walk all --json", timeout=600)
        assert sorted(records, key=key) == sorted(truth["handles"], key=key)
        with Qmp(vm.qmp) as q:
            assert q.status() == "running"
            assert q.ram_size() == ram_mib << 20
        gdb.interrupt()
        info = gdb.console("handle info")
        assert "the fast path" in info and "0x100000000-" in info, info


@contextlib.contextmanager
def tcp_proxy(port: int):
    """A forwarder on 127.0.0.1: gdb's peer is then this test process, not QEMU."""
    listener = socket.create_server(("127.0.0.1", 0))

    def pump(a, b):
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def serve():
        with contextlib.suppress(OSError):
            client, _ = listener.accept()
            upstream = socket.create_connection(("127.0.0.1", port))
            for pair in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=pair, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_proxy_in_front_of_the_stub_falls_back_and_says_why():
    with attached(gdb_socket=False) as (vm, gdb, truth), tcp_proxy(vm.port) as port:
        gdb.connect("127.0.0.1", port)
        records = gdb.json("handle walk all --json", timeout=600)
        assert sorted(records, key=key) == sorted(truth["handles"], key=key)
        info = gdb.console("handle info")
        assert "QEMU physical mode" in info, info
        reason = next(line for line in info.splitlines() if line.startswith("fast path not used: "))
        assert f"process {os.getpid()} " in reason and "proxy" in reason, reason
        gdb.console("set handle fast-path on")
        with pytest.raises(MiError) as exc:
            gdb.console("handle ps")
        assert exc.value.message.startswith("fast path unavailable") and "Traceback" not in exc.value.log


def test_ram_read_from_the_process_equals_a_pmemsave(tmp_path):
    """Without gdb: QEMU found from each of its sockets (QMP, the gdbstub on TCP and on a unix
    socket), RAM mapped through QMP and compared."""
    with booted(cached_guest("19041", "default"), gdb_socket=False) as vm, Qmp(vm.qmp) as q, \
            booted(cached_guest("19041", "default")) as unix_vm:
        assert qemu_ram.unix_peer_pid(vm.qmp) == vm.pid
        with socket.create_connection(("127.0.0.1", vm.port)) as stub:
            stub.sendall(b"$?#3f")             # QEMU's answer means it has accepted us
            assert stub.recv(64)
            assert qemu_ram.tcp_peer_pid(stub.getpeername()) == vm.pid
        with pytest.raises(qemu_ram.FastPathUnavailable):
            qemu_ram.own_unix_peer_pid(unix_vm.gdb)            # no connection of ours yet
        with socket.socket(socket.AF_UNIX) as stub:
            stub.connect(unix_vm.gdb)
            stub.sendall(b"$?#3f")
            assert stub.recv(64)
            assert qemu_ram.own_unix_peer_pid(unix_vm.gdb) == unix_vm.pid != vm.pid
        q.stop()
        ram = qemu_ram.map_ram(vm.pid, q.hmp, lambda p, n: qemu_ram.xp_bytes(q.hmp, p, n))
        try:
            dump = tmp_path / "ram.raw"
            q.pmemsave(str(dump), 32 << 20)
            assert ram.read(0, 32 << 20) == dump.read_bytes()
            dump.unlink()
            size = q.ram_size()
            assert ram.read(size - 16, 16) is not None
            with pytest.raises(qemu_ram.UnreadablePage):
                ram.read(size - 16, 32)
        finally:
            ram.close()


OTHER_USER = """
import sys
from gdbhandles.automation import qemu_ram
pid = int(sys.argv[1])
for attempt in (lambda: qemu_ram.check_owner(pid), lambda: qemu_ram.QemuRam(pid, [])):
    try:
        attempt()
        print("no error")
    except qemu_ram.FastPathUnavailable as exc:
        print(exc)
"""


SYSTEM_PYTHON = "/usr/bin/python3"         # the venv's interpreter may sit under /root


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
                    reason="needs root (to run a child as another user) and /usr/bin/python3")
def test_another_users_qemu_is_refused_with_the_reason():
    nobody = pwd.getpwnam("nobody")
    with booted(cached_guest("19041", "default")) as vm:
        result = subprocess.run([SYSTEM_PYTHON, "-c", OTHER_USER, str(vm.pid)], user=nobody.pw_uid,
                                group=nobody.pw_gid, cwd=ROOT, capture_output=True, text=True, timeout=60,
                                env={"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")})
        lines = result.stdout.splitlines()
        assert lines[0] == f"QEMU (pid {vm.pid}) runs as uid 0, gdb as uid {nobody.pw_uid}", result
        assert lines[1].startswith(f"no permission to read /proc/{vm.pid}/mem"), result
