"""Private working directories (mode 0700) that outlive no one: each is named after the pid of
the process that owns it, and directories of dead owners are removed when the next one is made.

What lives there: QEMU's QMP socket and gdbstub socket of `gdbhandles run`, and the RAM dumps
of auto-pause (hundreds of MiB each), which a SIGKILLed gdb would otherwise leave in /tmp.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

__all__ = ["make", "remove_stale"]


def _alive(pid: int) -> bool:
    """Running; a zombie is dead (it only waits for its parent to collect it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def remove_stale(prefix: str, directory: str | None = None, owner: int | None = None) -> list[str]:
    """Remove our `{prefix}{pid}-*` directories whose pid is dead (or is `owner`, who is known
    to be gone); the paths removed."""
    base = directory or tempfile.gettempdir()
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[^/]+")
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        path = os.path.join(base, name)
        if not match or (int(match.group(1)) != owner and _alive(int(match.group(1)))):
            continue
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if info.st_uid == os.getuid() and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def make(prefix: str, pid: int | None = None) -> str:
    """A new 0700 directory `{prefix}{pid}-XXXX` in the temp dir, after removing dead owners' ones."""
    remove_stale(prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{pid or os.getpid()}-")       # mkdtemp makes it 0700
