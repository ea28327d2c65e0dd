"""Booted test guests under real QEMU, inspected by a real gdb (pygdbmi) and QMP pmemsave."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pygdbmi.gdbcontroller import GdbController

from boot import QMP
from guest_check import Guest, Raw, check_guest

pytestmark = pytest.mark.integration


class Gdb:
    """Just enough MI to attach, read registers and memory (the gdb layer has the full driver)."""

    def __init__(self, target: str):
        self.ctrl = GdbController(["gdb", "-nx", "-q", "--interpreter=mi3"])
        self.ctrl.io_manager.time_to_check_for_additional_output_sec = 0
        self.token = 0
        self.cmd("-gdb-set mi-async on")
        self.cmd("-gdb-set architecture i386:x86-64")
        self.cmd(f"-target-select remote {target}", timeout=20)

    def cmd(self, line: str, timeout: float = 10.0) -> dict:
        self.token += 1
        self.ctrl.write(f"{self.token}{line}", read_response=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.ctrl.get_gdb_response(timeout_sec=0.05, raise_error_on_timeout=False):
                if r.get("type") == "result" and r.get("token") == self.token:
                    assert r["message"] in ("done", "connected", "running"), r
                    return r.get("payload") or {}
        raise TimeoutError(line)

    def reg(self, name: str) -> int:
        return int(self.cmd(f'-data-evaluate-expression "(long)${name}"')["value"]) & (2**64 - 1)

    def mem(self, va: int, n: int) -> bytes:
        p = self.cmd(f"-data-read-memory-bytes {va:#x} {n}")
        return bytes.fromhex(p["memory"][0]["contents"])

    def close(self) -> None:
        try:
            self.cmd("-target-detach", timeout=3)
        finally:
            self.ctrl.exit()


@pytest.mark.parametrize("profile", ["7601", "19041", "22000"])
def test_registers_and_structures_through_gdb(booted_guest, profile):
    g = booted_guest(profile)
    t = g.truth
    gdb = Gdb(g.gdb)
    try:
        v = t["vcpus"][0]
        assert gdb.reg("cr3") == v["cr3"] == t["kernel_dtb"]
        assert gdb.reg("gs_base") == v["kpcr"]
        rip = gdb.reg("rip")
        assert t["kernel_base"] <= rip < t["kernel_base"] + t["kernel_size"]
        kpcr = struct.unpack("<4Q", gdb.mem(v["kpcr"], 32))
        assert kpcr[3] == v["kpcr"]                      # _KPCR.Self
        system = t["processes"][0]
        assert system["pid"] == 4
        layout = Guest(None, t)
        upid = layout.off("_EPROCESS", "UniqueProcessId")
        assert struct.unpack("<Q", gdb.mem(system["eprocess"] + upid, 8))[0] == 4
        head = t["globals"]["PsActiveProcessHead"]
        links = layout.off("_EPROCESS", "ActiveProcessLinks")
        assert struct.unpack("<Q", gdb.mem(head, 8))[0] == system["eprocess"] + links
    finally:
        gdb.close()


@pytest.fixture
def dump_path(tmp_path):
    """Where a test's pmemsave goes; removed when the test ends (a dump is the guest's whole RAM)."""
    path = tmp_path / "dump.raw"
    yield path
    path.unlink(missing_ok=True)


def pmemsave(g, path, q=None):
    """Stop the guest and dump all its RAM (QMP allows one client: pass the open one)."""
    cfg = json.loads((g.dir / "guest.json").read_text())
    own = q is None
    q = q or QMP(g.qmp)
    try:
        q.execute("stop")
        q.execute("pmemsave", val=0, size=cfg["ram_mib"] << 20, filename=str(path))
    finally:
        if own:
            q.close()
    return path


@pytest.mark.parametrize("profile,scenario", [(p, s) for s in ("default", "level2", "kpti")
                                              for p in ("7601", "19041", "22000")] + [
                                              pytest.param("19041", "big", marks=pytest.mark.slow)])
def test_pmemsave_equals_memory_raw(booted_guest, dump_path, profile, scenario):
    g = booted_guest(profile, scenario)
    cfg = json.loads((g.dir / "guest.json").read_text())
    dump = pmemsave(g, dump_path)
    got, want = dump.read_bytes(), (g.dir / "memory.raw").read_bytes()
    assert len(got) == len(want)
    blob = (g.dir / "memory.bin").stat().st_size
    runtime = set(cfg["runtime_pages"])
    for lo, hi in ((0, 0x2000), (cfg["blob_base"], cfg["blob_base"] + blob)):
        for pa in range(lo, hi, 0x1000):
            if pa not in runtime:
                assert got[pa:pa + 0x1000] == want[pa:pa + 0x1000], f"page {pa:#x}"
    check_guest(dump, g.truth)


@pytest.mark.parametrize("profile", ["7601", "19041", "22000"])
def test_kpti_second_vcpu_in_user_mode(booted_guest, profile):
    g = booted_guest(profile, "kpti")
    t = g.truth
    user = t["vcpus"][1]
    assert user["cpl"] == 3
    gdb = Gdb(g.gdb)
    try:
        gdb.cmd("-thread-select 2")
        assert gdb.reg("cs") & 3 == 3
        assert gdb.reg("cr3") == user["cr3"]
        proc = next(p for p in t["processes"] if p["pid"] == user["pid"])
        assert user["cr3"] == proc["user_dtb"] != proc["dtb"]
        assert gdb.reg("gs_base") == user["gs_base"]
        assert gdb.reg("k_gs_base") == user["kpcr"]
        assert user["rip"] <= gdb.reg("rip") < user["rip"] + 4     # pause; jmp $-2
        # the user CR3 maps no kernel data: the KPCR's Self field reads through the shadow page,
        # but the EPROCESS (pool) is not reachable from this vCPU's page tables
        with pytest.raises(AssertionError):
            gdb.mem(proc["eprocess"], 8)
        gdb.cmd("-thread-select 1")
        assert gdb.reg("cr3") == t["kernel_dtb"]
    finally:
        gdb.close()


@pytest.mark.parametrize("profile", ["7601", "19041", "22000"])
def test_churn_flips_between_the_two_states(booted_guest, dump_path, profile):
    """The live table page is state A or B whenever the seqlock counter is even."""
    g = booted_guest(profile, "churn")
    c = g.truth["churn"]
    proc = next(p for p in g.truth["processes"] if p["pid"] == c["pid"])
    seen = {}
    q = QMP(g.qmp)
    try:
        for attempt in range(200):
            time.sleep(0.002 * (attempt % 10))
            dump = pmemsave(g, dump_path, q)
            raw = Raw(dump)
            try:
                guest = Guest(raw, g.truth)
                counter = guest.q(c["counter"])
                if counter % 2 == 0:
                    state = "A" if (counter // 2) % 2 == 0 else "B"
                    assert guest.handles(proc) == c["states"][state], f"counter {counter}"
                    seen[state] = counter
            finally:
                raw.close()
            if len(seen) == 2:
                break
            q.execute("cont")
    finally:
        q.close()
    assert set(seen) == {"A", "B"} and max(seen.values()) > 0


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")
def test_boots_under_kvm_when_usable(booted_guest, dump_path):
    g = booted_guest("19041", "default", accel="auto")
    q = QMP(g.qmp)
    try:
        assert "kvm support: enabled" in q.hmp("info kvm")
    finally:
        q.close()
    check_guest(pmemsave(g, dump_path), g.truth)


def boot_script(guest_dir, *args: str):
    """`vm-images/boot.py DIR ARGS` as a user runs it; its printed lines once the guest is up."""
    script = Path(__file__).resolve().parents[1] / "vm-images" / "boot.py"
    proc = subprocess.Popen([sys.executable, str(script), str(guest_dir), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, proc.kill)      # a boot.py that never comes up ends the read
    watchdog.start()
    lines = {}
    try:
        for line in proc.stdout:                   # until the last line boot.py prints when up
            word, _, rest = line.rstrip("\n").partition(" ")
            lines[word] = rest
            if word == "disk":
                return proc, lines
    finally:
        watchdog.cancel()
    proc.kill()
    proc.wait()
    raise AssertionError(f"boot.py ended: {proc.stderr.read()}")


def end(proc) -> None:
    proc.terminate()
    assert proc.wait(timeout=30) == 128 + 15, proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()


def test_snapshot_of_a_booted_guest_is_kept_for_the_next_boot(built_guest, tmp_path):
    """boot.py runs the guest on its own disk.qcow2, so `gdbhandles snapshot --qmp` saves there;
    --scratch runs on a copy whose snapshots go with it."""
    source = built_guest("19041")
    guest = tmp_path / "guest"
    guest.mkdir()
    for item in source.iterdir():                  # the cached guest stays as built: only the disk is copied
        (guest / item.name).symlink_to(item)
    (guest / "disk.qcow2").unlink()
    shutil.copy(source / "disk.qcow2", guest / "disk.qcow2")

    def snapshot(qmp: str, name: str) -> None:
        saved = subprocess.run([sys.executable, "-m", "gdbhandles.cli", "snapshot", "--qmp", qmp, "--name", name],
                               capture_output=True, text=True, timeout=120)
        assert saved.returncode == 0, saved.stderr

    def snapshots() -> str:
        return subprocess.run(["qemu-img", "snapshot", "-l", str(guest / "disk.qcow2")], capture_output=True,
                              text=True, check=True).stdout

    proc, lines = boot_script(guest)
    assert lines["disk"] == str(guest / "disk.qcow2")
    snapshot(lines["qmp"], "s1")
    end(proc)
    proc, lines = boot_script(guest, "--snapshot", "s1")
    end(proc)
    assert " s1 " in snapshots()

    proc, lines = boot_script(guest, "--scratch")
    assert lines["disk"].endswith("(scratch copy, removed at exit)")
    snapshot(lines["qmp"], "s2")
    end(proc)
    assert " s2 " not in snapshots() and " s1 " in snapshots()
    assert not Path(lines["disk"].split()[0]).exists()
