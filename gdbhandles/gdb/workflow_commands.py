"""`handle mark` and `handle diff` (declared in commandspec.py): what changed in the handle
tables between two stops.

Marks live in this gdb session (MARKS); `--save FILE` keeps one as JSON, `diff --file FILE`
compares with it later, in this session or another. A mark of chosen processes is compared
with those processes only (one that exited shows all its handles closed); a mark of every
process also shows the handles of processes started since.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import gdb

from gdbhandles import commandspec, diff, render_queries
from gdbhandles.commandspec import Output
from gdbhandles.errors import HandleError
from gdbhandles.gdb.commands import body, emit, frame, session, side_streams

__all__ = ["MARKS", "Mark"]

MARK_FORMAT = 1


@dataclass
class Mark:
    """The handles of the selected processes at one stop."""
    name: str
    pids: list[int] | None       # None: every process
    records: list[dict]
    taken: str                   # when, for the diff's header line


MARKS: dict[str, Mark] = {}


def _stop_text() -> str:
    """When the mark was taken: the wall clock and, if gdb has a frame, the stop address."""
    try:
        return f"{time.strftime('%H:%M:%S')}, rip {int(gdb.selected_frame().pc()):#x}"
    except gdb.error:
        return f"{time.strftime('%H:%M:%S')}, target running (auto-pause)"


@body("mark")
def mark(args: argparse.Namespace) -> None:
    shown = frame(args)
    with session.open() as windows:
        if args.targets:
            pids = sorted({p.pid for t in args.targets for p in windows.select(t)})
            records = [r for pid in pids for r in windows.walk(pid, progress=shown.progress, warn=shown.warn)]
        else:
            pids, records = None, list(windows.walk(None, progress=shown.progress, warn=shown.warn))
    taken = Mark(args.name, pids, [r.to_json() for r in records], _stop_text())
    if args.save:
        _save(taken, args.save)
    MARKS[args.name] = taken
    where = "every process" if pids is None else f"pids {', '.join(map(str, pids))}"
    emit(f"mark {args.name}: {len(records)} handles of {where} ({taken.taken})")


def _save(taken: Mark, path: str) -> None:
    data = {"format": MARK_FORMAT, "mark": taken.name, "pids": taken.pids, "taken": taken.taken,
            "handles": taken.records}
    try:
        commandspec.write_atomically(path, json.dumps(data, indent=1) + "\n")
    except OSError as exc:
        raise HandleError(f"cannot write mark file {path}: {exc.strerror}") from None


def _load(path: str) -> Mark:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise HandleError(f"mark file {path} unreadable: {exc}") from None
    handles = data.get("handles") if isinstance(data, dict) else None
    if not isinstance(handles, list) or data.get("format") != MARK_FORMAT or \
            not all(isinstance(r, dict) and {"pid", "handle"} <= r.keys() for r in handles):
        raise HandleError(f"{path} is not a mark file (`handle mark NAME --save FILE` writes one)")
    pids = data.get("pids")
    if pids is not None and not (isinstance(pids, list) and all(isinstance(p, int) for p in pids)):
        raise HandleError(f"{path}: its pids are not a list of numbers")
    return Mark(str(data.get("mark")), pids, handles, str(data.get("taken")))


def _chosen(args: argparse.Namespace) -> Mark:
    if (args.name is None) == (args.file is None):
        raise HandleError("diff takes a mark name or --file FILE (one of the two)")
    if args.file:
        return _load(args.file)
    if args.name not in MARKS:
        known = ", ".join(sorted(MARKS)) or "none yet"
        raise HandleError(f"no mark named {args.name!r} (marks: {known}; `handle mark NAME` takes one)")
    return MARKS[args.name]


@body("diff")
def diff_command(args: argparse.Namespace) -> None:
    taken = _chosen(args)
    shown = frame(args)
    with session.open() as windows:
        now = [r.to_json() for r in windows.walk(None, progress=shown.progress, warn=shown.warn)]
    if taken.pids is not None:
        wanted = set(taken.pids)
        now = [r for r in now if r["pid"] in wanted]
    found = diff.compare(taken.records, now)
    text = render_queries.diff_text(found, f"since mark {taken.name} ({taken.taken})")
    side, _ = side_streams(args)
    commandspec.deliver(Output(text, render_queries.diff_json(found)), args, gdb.write,
                        side or (lambda line: None))
