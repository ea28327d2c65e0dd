"""The Python API for scripts running inside gdb: the same records as the commands' --json.

    (gdb) python from gdbhandles import api; print(api.lookup(0x4, pid=4)["name"])

Every function reads the guest as it is now (a stopped target, or a running one through
auto-pause) and returns plain dicts and lists; failures raise gdbhandles.errors.HandleError
with the same one-line message the commands print. `target`: a pid, an image name, "all",
or None for the current process of the selected vCPU.
"""

from __future__ import annotations

from gdbhandles import diff as diff_module, queries
from gdbhandles.gdb.commands import session

__all__ = ["current", "processes", "walk", "lookup", "find", "cid", "cids", "free", "diff"]


def _target(windows, target):
    if target is None:
        return queries.current_process(windows)[0].pid
    return None if target == "all" else target


def current() -> dict:
    """The current process of the selected vCPU: {"pid", "name", "eprocess", "note"}."""
    with session.open() as windows:
        found, note = queries.current_process(windows)
    return {"pid": found.pid, "name": found.name, "eprocess": found.eprocess, "note": note}


def processes() -> list[dict]:
    """`handle ps --json`."""
    with session.open() as windows:
        return [r.to_json() for r in windows.processes()]


def walk(target=None, type: str | None = None, name: str | None = None) -> list[dict]:
    """`handle walk TARGET --json` (warnings go to windows.warnings, as `handle info` shows)."""
    with session.open() as windows:
        return [r.to_json() for r in windows.walk(_target(windows, target), type=type, name=name)]


def lookup(handle: int, pid=None) -> dict:
    """`handle lookup [PID] HANDLE --json`, the one record; HandleError (BadHandle) if invalid."""
    with session.open() as windows:
        return windows.lookup(_target(windows, pid), handle).to_json()


def find(object: int | None = None, name: str | None = None, type: str | None = None) -> list[dict]:
    """`handle find OBJECT` or `handle find --name NAME [--type TYPE]`."""
    with session.open() as windows:
        return [r.to_json() for r in windows.walk(None, type=type, name=name, object=object)]


def cid(number: int) -> dict:
    """`handle cid ID --json`, the one record."""
    with session.open() as windows:
        return queries.cid(windows, number).to_json()


def cids() -> list[dict]:
    """`handle cid --all --json`."""
    with session.open() as windows:
        return [r.to_json() for r in queries.cid_all(windows)]


def free(target=None) -> list[dict]:
    """`handle walk TARGET --free --json`."""
    with session.open() as windows:
        return [r.to_json() for r in queries.free_entries(windows, _target(windows, target))]


def diff(before: list[dict], after: list[dict]) -> dict:
    """Two lists of handle records compared as `handle diff --json` does."""
    return diff_module.to_json(diff_module.compare(before, after))
