"""What a fault test checks afterwards: which processes a process started, and that they are gone."""

from __future__ import annotations

import os
import time
from pathlib import Path


def children(pid: int) -> dict[int, str]:
    """Direct children of `pid`: {pid: command name}."""
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
            found[int(entry.name)] = name
    return found


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
