"""QEMU and gdb for scripted runs (`gdbhandles run|snapshot|regress`).

QEMU is started from the user's own arguments plus a gdbstub on 127.0.0.1 and a QMP socket
(mode 0600) in a private directory; a real gdb with the extension is driven through mi.py.
Everything started here is stopped here, also on failure, timeout or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from gdbhandles import commandspec
from gdbhandles.errors import HandleError
from gdbhandles.automation import private
from gdbhandles.automation.mi import Gdb, MiError
from gdbhandles.automation.qmp import Qmp, QmpError

GDBINIT = Path(__file__).resolve().parents[1] / "gdbinit.py"
QEMU = "qemu-system-x86_64"
START_TIMEOUT = 20.0
RUN_PREFIX = "gdbhandles-run-"
UNIX_SOCKET_GDB = 10            # gdb major version from which `target remote PATH` takes a unix socket
PR_SET_PDEATHSIG = 1
RESERVED = ("-gdb", "-s", "-qmp", "-S", "-loadvm", "-daemonize")


class RunError(HandleError):
    """QEMU or gdb could not be started or driven."""


@dataclass
class Vm:
    gdb: str            # what gdb's `target remote` takes: a unix socket path, or 127.0.0.1:PORT
    qmp: str
    proc: subprocess.Popen | None


def qemu_arguments(text: str) -> list[str]:
    try:
        args = shlex.split(text)
    except ValueError as exc:               # "No closing quotation"
        raise RunError(f"--qemu: {str(exc).lower()} in the QEMU arguments") from None
    taken = [a for a in args if a in RESERVED]
    if taken:
        raise RunError(f"--qemu must not contain {', '.join(taken)}: gdbhandles adds the gdbstub, QMP and "
                       "-loadvm itself")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def qemu(args: list[str], snapshot: str | None = None, paused: bool = False):
    """QEMU running the user's machine; yields Vm. `paused`: stopped before the first instruction
    (with `snapshot`: at the snapshot's state)."""
    directory = private.make(RUN_PREFIX)
    proc = None
    try:
        qmp_path = os.path.join(directory, "qmp.sock")
        stub, gdb_target = gdbstub(directory)
        command = [QEMU, *args, *stub, "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        command += (["-loadvm", snapshot] if snapshot else []) + (["-S"] if paused else [])
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, preexec_fn=_child_of_ours)
        except OSError as exc:
            raise RunError(f"cannot start {QEMU}: {exc.strerror}") from None
        _wait_ready(proc, qmp_path)
        yield Vm(gdb_target, qmp_path, proc)
    finally:
        if proc is not None:
            _stop(proc, os.path.join(directory, "qmp.sock"))
        shutil.rmtree(directory, ignore_errors=True)


def gdbstub(directory: str) -> tuple[list[str], str]:
    """QEMU's gdbstub options and gdb's address for it. A unix socket in our 0700 directory, which
    no other local user can reach (a TCP port on 127.0.0.1 serves whichever local process connects
    first), when gdb can use one (`target remote PATH`, measured with gdb 13); else TCP."""
    if _gdb_major() >= UNIX_SOCKET_GDB:
        path = os.path.join(directory, "gdb.sock")
        return ["-chardev", f"socket,id=gdbstub0,path={path},server=on,wait=off", "-gdb", "chardev:gdbstub0"], path
    port = free_port()
    return ["-gdb", f"tcp:127.0.0.1:{port}"], f"127.0.0.1:{port}"


def _gdb_major() -> int:
    try:
        first = subprocess.run(["gdb", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    match = re.search(r"(\d+)\.\d+", first.splitlines()[0] if first else "")
    return int(match.group(1)) if match else 0


def _child_of_ours() -> None:
    """In QEMU before exec: private files, and killed with us even if we are SIGKILLed (a QEMU
    left running holds its qcow2 lock and stops the next run)."""
    os.umask(0o077)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait_ready(proc: subprocess.Popen, qmp_path: str) -> None:
    """Until QMP answers (QEMU has loaded any snapshot by then); QEMU's own error if it exits."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            error = proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise RunError(f"QEMU exited: {error[-1] if error else 'status ' + str(proc.returncode)}")
        if os.path.exists(qmp_path):
            os.chmod(qmp_path, 0o600)
            with contextlib.suppress(QmpError):
                with Qmp(qmp_path) as q:
                    q.status()
                    return
        if time.monotonic() > deadline:
            raise RunError(f"QEMU did not answer on QMP within {START_TIMEOUT:g} s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, qmp_path: str) -> None:
    if proc.poll() is None:
        with contextlib.suppress(HandleError, OSError):
            with Qmp(qmp_path) as q:
                q.execute("quit")
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


def attached(address: str, qmp: str | None):
    """A gdb with the extension, attached to the gdbstub (and told the QMP socket)."""
    try:
        gdb = Gdb(timeout=600)
    except MiError as exc:
        raise RunError(exc.message) from None
    try:
        gdb.source(str(GDBINIT))
        gdb.console("set tcp auto-retry off")     # a refused connection fails now, not after 15 s
        gdb.connect(address, timeout=START_TIMEOUT)
        if qmp:
            gdb.console(f"set handle qmp {qmp}")
    except MiError as exc:
        gdb.close()
        reason = exc.message.removeprefix(f"{address}: ")     # gdb names the address itself
        raise RunError(f"gdb could not attach to {address}: {reason}") from None
    except BaseException:                   # Ctrl-C, SIGTERM: gdb goes too
        gdb.close()
        raise
    return _detached_at_end(gdb)


@contextlib.contextmanager
def _detached_at_end(gdb: Gdb):
    """Detach before gdb exits: the machine (maybe the user's own) goes on as it was."""
    try:
        yield gdb
    finally:
        with contextlib.suppress(MiError):
            gdb.mi("-target-detach", timeout=10)
        gdb.close()


def handle_command(text: str) -> tuple[str, bool]:
    """`walk all` or `handle walk all` → (`handle walk all --json`, True); `--json` is added only to
    commands that take it (`vmstatus` → (`handle vmstatus`, False))."""
    words = text.split()
    if words and words[0] == "handle":
        words = words[1:]
    if not words:
        raise RunError("empty command")
    command = commandspec.COMMANDS.get(words[0])
    if command is None or "gdb" not in command.front_ends:
        known = ", ".join(name for name, c in commandspec.COMMANDS.items() if "gdb" in c.front_ends)
        raise RunError(f"{words[0]}: not a handle command (one of {known})")
    if command.json and "--json" not in words:
        words.append("--json")
    return "handle " + " ".join(words), command.json


def run_commands(gdb: Gdb, commands: list[str]) -> list:
    """Each command's JSON, or the text it printed (a command without --json) as a JSON string."""
    out = []
    for text in commands:
        line, as_json = handle_command(text)
        try:
            out.append(gdb.json(line) if as_json else gdb.console(line).rstrip("\n"))
        except MiError as exc:
            raise RunError(f"{line}: {exc.message}") from None
    return out


def gdb_address(text: str) -> str:
    """--gdb: 127.0.0.1:PORT, or the path of QEMU's gdbstub unix socket."""
    if os.path.exists(text):
        if not stat.S_ISSOCK(os.stat(text).st_mode):
            raise RunError(f"--gdb {text}: not a socket")
        return text
    host, _, port = text.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        raise RunError(f"--gdb {text}: use 127.0.0.1:PORT or a unix socket path (QEMU's gdbstub listens on "
                       "127.0.0.1 only)")
    return text


@contextlib.contextmanager
def session(qemu_text: str | None, snapshot: str | None, gdb_at: str | None, qmp: str | None):
    """gdb attached either to a QEMU booted here (paused at the snapshot) or to a running one."""
    if shutil.which("gdb") is None:              # before QEMU starts
        raise RunError("gdb not found in PATH (apt-get install gdb)")
    if gdb_at:
        if qemu_text:
            raise RunError("give either --qemu or --gdb, not both")
        address = gdb_address(gdb_at)
        if qmp:
            with Qmp(qmp) as q:                   # a wrong socket is one line now, not a late surprise
                q.status()
        with attached(address, qmp) as gdb:
            yield gdb
        return
    if qmp:
        raise RunError("--qmp goes with --gdb (with --qemu, gdbhandles makes its own QMP socket)")
    if not qemu_text:
        raise RunError("give --qemu \"<qemu arguments>\" (or --gdb HOST:PORT of a running QEMU)")
    machine = qemu_arguments(qemu_text)
    if not snapshot:
        raise RunError("--qemu needs --snapshot NAME: without one QEMU starts at the reset vector, before any "
                       "Windows kernel runs (save one from the booted machine: gdbhandles snapshot --qemu ARGS "
                       "--name NAME)")
    with qemu(machine, snapshot, paused=True) as vm, \
            attached(vm.gdb, vm.qmp) as gdb:
        yield gdb


def save_snapshot(q: Qmp, name: str, disk: str | None) -> str:
    nodes = q.block_nodes()
    node = disk or (nodes[0] if nodes else None)
    if node is None:
        raise QmpError("the VM has no qcow2 disk to hold a snapshot (add -blockdev driver=qcow2,...)")
    running = q.status() == "running"
    if running:
        q.stop()
    try:
        q.snapshot_save(name, node)
    finally:
        if running:
            q.cont()
    return node
