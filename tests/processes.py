"""What a fault test checks afterwards: which processes a process started, and that they are gone."""

from __future__ import annotations

import os
import time
from pathlib import Path


def children(pid: int) -> dict[int, str]:
    """Direct children of `pid`: {pid: command name}; an MI gdb is named "gdb-mi" (a `gdb --version`
    probe stays "gdb")."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid:
            found[int(entry.name)] = name + ("-mi" if name == "gdb" and _is_mi(entry) else "")
    return found


def _is_mi(entry: Path) -> bool:
    try:
        return b"--interpreter=mi3" in (entry / "cmdline").read_bytes()
    except OSError:
        return False


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it only waits for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_until(condition, timeout: float = 60.0, what: str = "condition"):
    """Poll `condition()` until it is true (the event a test waits on); its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def gone(pids, timeout: float = 30.0) -> None:
    wait_until(lambda: not [p for p in pids if alive(p)], timeout, f"processes {sorted(pids)} to end")


def leftovers(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def tcp_listeners(pid: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} writes them) on which `pid` listens."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                listening.append(fields[1])
    return listening
