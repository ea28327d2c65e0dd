#!/usr/bin/env python3
"""Boot a built guest under QEMU (TCG): gdbstub on 127.0.0.1, QMP on a private unix socket.

python vm-images/boot.py DIR [--gdb-port P] [--qmp PATH] [--snapshot NAME] [--smp N] [--ram-mib M]
prints `gdb-port P` and `qmp PATH` once the guest reached its steady state, then runs
until Ctrl-C/SIGTERM and cleans up (QEMU killed, socket directory removed).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

QEMU = "qemu-system-x86_64"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bind port 0, read it, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QMP:
    """A minimal synchronous QMP client (the builder side must not import the engine's)."""

    def __init__(self, path: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.buf = b""
        self._read()                       # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP socket closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd: str, **args):
        self.sock.sendall(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        while True:
            msg = self._read()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {cmd}: {msg['error'].get('desc')}")

    def hmp(self, line: str) -> str:
        return self.execute("human-monitor-command", **{"command-line": line})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class Booted:
    port: int
    qmp: str
    pid: int
    proc: subprocess.Popen


ACCELS = {"tcg": ["-accel", "tcg"], "kvm": ["-accel", "kvm"],
          "auto": ["-accel", "kvm", "-accel", "tcg"]}   # KVM when /dev/kvm works, else TCG


def qemu_command(guest: Path, cfg: dict, port: int, qmp: str, disk: Path, smp: int,
                 snapshot: str | None, accel: str = "tcg", ram_mib: int | None = None) -> list[str]:
    f = cfg["files"]
    cmd = [QEMU, *ACCELS[accel], "-machine", "pc", "-cpu", "qemu64", "-m", str(ram_mib or cfg["ram_mib"]),
           "-smp", str(smp), "-display", "none", "-no-reboot", "-nodefaults", "-serial", "none",
           "-kernel", str(guest / f["kernel"]),
           "-device", f"loader,file={guest / f['blob']},addr={cfg['blob_base']:#x},force-raw=on",
           "-blockdev", f"driver=file,filename={disk},node-name=file0",
           "-blockdev", "driver=qcow2,file=file0,node-name=disk0",
           "-gdb", f"tcp:127.0.0.1:{port}", "-qmp", f"unix:{qmp},server=on,wait=off"]
    if snapshot:
        cmd += ["-loadvm", snapshot]
    return cmd


def cpu_states(q: QMP) -> list[tuple[int, int]]:
    """(RIP, CPL) of every vCPU, from HMP `info registers -a`."""
    text = q.hmp("info registers -a")
    rips = [int(x, 16) for x in re.findall(r"RIP=([0-9a-f]{16})", text)]
    cpls = [int(x) for x in re.findall(r"CPL=(\d)", text)]
    return list(zip(rips, cpls))


def steady(states: list[tuple[int, int]], cfg: dict) -> bool:
    """Every vCPU where the guest leaves it: CPU 0 in the kernel loop, others as guest.json says."""
    if len(states) < cfg["smp"]:
        return False
    for (rip, cpl), want in zip(states, cfg["vcpus"]):
        lo, hi = want["rip_range"]
        if not (lo <= rip < hi and cpl == want["cpl"]):
            return False
    return True


@contextlib.contextmanager
def booted(guest_dir, *, gdb_port: int | None = None, qmp: str | None = None,
           snapshot: str | None = None, smp: int | None = None, disk: Path | None = None,
           timeout: float = 60.0, accel: str = "tcg", ram_mib: int | None = None):
    """Run QEMU on a built guest until the block exits; yields Booted(port, qmp, pid, proc).
    `ram_mib` gives the guest more RAM than it was built with (TCG allocates untouched RAM lazily).

    Without `snapshot` or `disk` the guest gets a fresh private disk, so that tests can boot
    one cached guest several times at once (QEMU locks its disk images)."""
    guest = Path(guest_dir).resolve()
    cfg = json.loads((guest / "guest.json").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="gh-boot-"))
    os.chmod(tmp, 0o700)
    proc = None
    q = None
    try:
        port = gdb_port or free_port()
        qmp_path = qmp or str(tmp / "qmp.sock")
        if disk is None:
            if snapshot:
                disk = guest / cfg["files"]["disk"]
            else:
                disk = tmp / "disk.qcow2"
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
        cmd = qemu_command(guest, cfg, port, qmp_path, Path(disk), smp or cfg["smp"], snapshot, accel, ram_mib)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, preexec_fn=lambda: os.umask(0o077))
        try:
            q = QMP(qmp_path, timeout=10)
        except OSError as e:
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace")
            raise RuntimeError(f"QEMU did not start: {err.strip() or e}") from None
        os.chmod(qmp_path, 0o600)
        deadline = time.monotonic() + timeout
        while not steady(cpu_states(q), cfg):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"guest did not reach its steady state: {cpu_states(q) if proc.poll() is None else 'QEMU exited'}")
            time.sleep(0.02)
        q.close()
        q = None
        yield Booted(port, qmp_path, proc.pid, proc)
    finally:
        if q is not None:
            q.close()
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                qq = QMP(qmp_path, timeout=1)
                qq.sock.sendall(b'{"execute": "quit"}\n')
                qq.close()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr:
            proc.stderr.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--gdb-port", type=int)
    ap.add_argument("--qmp")
    ap.add_argument("--snapshot")
    ap.add_argument("--smp", type=int)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--ram-mib", type=int, help="guest RAM in MiB (default: what the guest was built with)")
    ap.add_argument("--accel", choices=sorted(ACCELS), default="tcg",
                    help="tcg (default: the tests' guests boot in well under a second and alike on every "
                         "machine), kvm, or auto (KVM when usable, else TCG)")
    a = ap.parse_args()

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        with booted(a.dir, gdb_port=a.gdb_port, qmp=a.qmp, snapshot=a.snapshot, smp=a.smp,
                    timeout=a.timeout, accel=a.accel, ram_mib=a.ram_mib) as b:
            print(f"gdb-port {b.port}", flush=True)
            print(f"qmp {b.qmp}", flush=True)
            b.proc.wait()
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:
        print(f"boot.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
