#!/usr/bin/env python3
"""Boot a built guest under QEMU (TCG): gdbstub and QMP on unix sockets in a private 0700 directory.

python vm-images/boot.py DIR [options]
prints `gdb-socket PATH` (gdb: `target remote PATH`; with --gdb-tcp or --gdb-port, `gdb-port P` on
127.0.0.1), `qmp PATH` and `disk PATH` once the guest reached its steady state, then
runs until Ctrl-C/SIGTERM and cleans up (QEMU stopped, socket directory removed). The guest
runs on its own DIR/disk.qcow2, so snapshots saved meanwhile (`gdbhandles snapshot --qmp PATH
--name s1`) stay for a later `--snapshot s1`; `--scratch` runs on a throw-away copy instead.
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


UNIX_PATH_MAX = 108            # sun_path of Linux, with its NUL


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
    disk: Path
    gdb: str = ""            # what gdb's `target remote` takes: the socket path or 127.0.0.1:PORT


ACCELS = {"tcg": ["-accel", "tcg"], "kvm": ["-accel", "kvm"],
          "auto": ["-accel", "kvm", "-accel", "tcg"]}   # KVM when /dev/kvm works, else TCG


def machine_arguments(guest: Path, cfg: dict, disk: Path, smp: int, accel: str = "tcg",
                      ram_mib: int | None = None) -> list[str]:
    """QEMU's arguments for the guest's machine alone: what a user gives `gdbhandles run --qemu`."""
    f = cfg["files"]
    return [*ACCELS[accel], "-machine", "pc", "-cpu", "qemu64", "-m", str(ram_mib or cfg["ram_mib"]),
            "-smp", str(smp), "-display", "none", "-no-reboot", "-nodefaults", "-serial", "none",
            "-kernel", str(guest / f["kernel"]),
            "-device", f"loader,file={guest / f['blob']},addr={cfg['blob_base']:#x},force-raw=on",
            "-blockdev", f"driver=file,filename={disk},node-name=file0",
            "-blockdev", "driver=qcow2,file=file0,node-name=disk0"]


def gdbstub_options(where: int | str) -> list[str]:
    """A TCP port on 127.0.0.1, or (a path) a unix socket only its owner's directory lets in."""
    if isinstance(where, str):
        return ["-chardev", f"socket,id=gdbstub0,path={where},server=on,wait=off", "-gdb", "chardev:gdbstub0"]
    return ["-gdb", f"tcp:127.0.0.1:{where}"]


def qemu_command(guest: Path, cfg: dict, port: int | str, qmp: str, disk: Path, smp: int,
                 snapshot: str | None, accel: str = "tcg", ram_mib: int | None = None) -> list[str]:
    cmd = [QEMU, *machine_arguments(guest, cfg, disk, smp, accel, ram_mib),
           *gdbstub_options(port), "-qmp", f"unix:{qmp},server=on,wait=off"]
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
           timeout: float = 60.0, accel: str = "tcg", ram_mib: int | None = None, scratch: bool = True,
           gdb_socket: bool = True):
    """Run QEMU on a built guest until the block exits; yields Booted(port, qmp, pid, proc, disk, gdb).
    `ram_mib` gives the guest more RAM than it was built with (TCG allocates untouched RAM lazily).
    The gdbstub is a unix socket in the private 0700 directory (port 0; another local user cannot
    reach it), or TCP on 127.0.0.1 with `gdb_port` or `gdb_socket=False` (also, with one line on
    stderr, when the directory's path is too long for a unix socket).

    The disk is `disk` if given, else with `scratch` (the default here, so that tests can boot one
    cached guest several times at once: QEMU locks its disk images) a private copy of the guest's
    disk.qcow2 removed afterwards, else the guest's own disk.qcow2."""
    guest = Path(guest_dir).resolve()
    cfg = json.loads((guest / "guest.json").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="gh-boot-"))
    os.chmod(tmp, 0o700)
    proc = None
    q = None
    try:
        gdb_socket = gdb_socket and gdb_port is None and _fits_unix_socket(tmp / "gdb.sock")
        port = str(tmp / "gdb.sock") if gdb_socket else gdb_port or free_port()
        qmp_path = qmp or str(tmp / "qmp.sock")
        if disk is None:
            disk = guest / cfg["files"]["disk"]
            if scratch:
                disk = Path(shutil.copy(disk, tmp / "disk.qcow2"))
        cmd = qemu_command(guest, cfg, port, qmp_path, Path(disk), smp or cfg["smp"], snapshot, accel, ram_mib)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, preexec_fn=lambda: os.umask(0o077))
        try:
            q = QMP(qmp_path, timeout=10)
        except OSError as e:
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace")
            hint = " (another QEMU uses this disk: boot with --scratch)" if "lock" in err else ""
            raise RuntimeError(f"QEMU did not start: {err.strip() or e}{hint}") from None
        os.chmod(qmp_path, 0o600)
        deadline = time.monotonic() + timeout
        while not steady(cpu_states(q), cfg):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"guest did not reach its steady state: {cpu_states(q) if proc.poll() is None else 'QEMU exited'}")
            time.sleep(0.02)
        q.close()
        q = None
        yield Booted(0 if gdb_socket else port, qmp_path, proc.pid, proc, Path(disk),
                     port if gdb_socket else f"127.0.0.1:{port}")
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


def _fits_unix_socket(path: Path) -> bool:
    if len(os.fsencode(path)) < UNIX_PATH_MAX:
        return True
    print(f"boot.py: {path} is too long for a unix socket; the gdbstub listens on 127.0.0.1 instead",
          file=sys.stderr)
    return False


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="a guest written by build.py (guest.json, loader.bin, memory.bin, ...)")
    ap.add_argument("--gdb-tcp", action="store_true",
                    help="serve the gdbstub on a free TCP port on 127.0.0.1 (printed as `gdb-port P`) instead "
                         "of the default unix socket in the private directory (printed as `gdb-socket PATH`; "
                         "gdb: target remote PATH), which no other local user can reach")
    ap.add_argument("--gdb-port", type=int, metavar="P", help="serve the gdbstub on this TCP port on 127.0.0.1")
    ap.add_argument("--qmp", metavar="PATH", help="QMP unix socket (default: qmp.sock in a private 0700 directory)")
    ap.add_argument("--snapshot", metavar="NAME", help="start from this snapshot of the disk (QEMU -loadvm)")
    ap.add_argument("--scratch", action="store_true",
                    help="run on a throw-away copy of DIR/disk.qcow2 (removed at exit, with any snapshot saved "
                         "meanwhile) instead of the guest's own disk; lets one guest boot several times at once")
    ap.add_argument("--smp", type=int, metavar="N", help="vCPUs (default: what the guest was built with)")
    ap.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                    help="give up if the vCPUs have not reached their steady state by then (default 60)")
    ap.add_argument("--ram-mib", type=int, help="guest RAM in MiB (default: what the guest was built with)")
    ap.add_argument("--accel", choices=sorted(ACCELS), default="tcg",
                    help="tcg (default: the tests' guests boot in well under a second and alike on every "
                         "machine), kvm, or auto (KVM when usable, else TCG)")
    return ap


def main() -> int:
    a = parser().parse_args()

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        with booted(a.dir, gdb_port=a.gdb_port, qmp=a.qmp, snapshot=a.snapshot, smp=a.smp,
                    timeout=a.timeout, accel=a.accel, ram_mib=a.ram_mib, scratch=a.scratch,
                    gdb_socket=not a.gdb_tcp) as b:
            print(f"gdb-port {b.port}" if b.port else f"gdb-socket {b.gdb}", flush=True)
            print(f"qmp {b.qmp}", flush=True)
            print(f"disk {b.disk}" + (" (scratch copy, removed at exit)" if a.scratch else ""), flush=True)
            b.proc.wait()
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:
        print(f"boot.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
