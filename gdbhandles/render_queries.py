"""Text and JSON output of the workflow queries: PspCidTable entries, free entries, holders
of an object and the diff between two marks. Tables and escaping as in render.py."""

from __future__ import annotations

import json

from gdbhandles import diff as diff_module
from gdbhandles.records import CidRecord, FreeEntryRecord, HandleRecord
from gdbhandles.render import Paint, _table, escape, plain

__all__ = ["cid_text", "cid_table", "cid_json", "free_table", "free_json", "free_summary", "find_summary",
           "diff_text", "diff_json"]


def _who(record: CidRecord) -> str:
    if record.tid is not None:
        return f"thread {record.tid} of {escape(record.process)} (pid {record.pid})"
    if record.pid is not None:
        return f"process {escape(record.process)} (pid {record.pid})"
    return "not a process or thread object"


def cid_text(record: CidRecord) -> str:
    return "\n".join([f"id           {record.id} ({record.id:#x})",
                      f"object       {record.object:#x} ({escape(record.type) or '?'})",
                      f"is           {_who(record)}",
                      f"entry        {record.entry:#x} (PspCidTable)"])


def cid_table(records: list[CidRecord], width: int | None = None, paint: Paint = plain) -> str:
    rows = [[str(r.id), escape(r.type) or "?", f"{r.object:#018x}", "-" if r.pid is None else str(r.pid),
             "-" if r.tid is None else str(r.tid), escape(r.process)] for r in records]
    return _table(["ID", "Type", "Object", "PID", "TID", "Process"], rows, right={0, 3, 4}, width=width,
                  shrink=((5, 10),), roles={1: "type"}, paint=paint)


def cid_json(records: list[CidRecord]) -> str:
    return json.dumps([r.to_json() for r in records], indent=1)


def free_table(records: list[FreeEntryRecord], width: int | None = None, paint: Paint = plain) -> str:
    rows = [[str(r.pid), escape(r.process), f"{r.handle:#x}", f"{r.entry:#018x}", r.status.replace("_", " "),
             "-" if r.free_position is None else str(r.free_position)] for r in records]
    return _table(["PID", "Process", "Handle", "Entry", "Status", "FreeList#"], rows, right={0, 2, 5},
                  width=width, shrink=((1, 10),), paint=paint)


def free_json(records: list[FreeEntryRecord]) -> str:
    return json.dumps([r.to_json() for r in records], indent=1)


def free_summary(records: list[FreeEntryRecord]) -> str:
    listed = sum(1 for r in records if r.free_position is not None)
    return f"{len(records)} entries without an object, {listed} on the free list"


def find_summary(records: list[HandleRecord], body: int | None, name: str | None, seconds: float) -> str:
    what = f"object {body:#x}" if body is not None else f"names containing {escape(name)!r}"
    text = f"{len(records)} handles in {len({r.pid for r in records})} processes refer to {what}, {seconds:.2f} s"
    if not records and body is not None:
        text += " (give the object BODY address, as walk and lookup show it)"
    return text


def diff_text(diff: diff_module.Diff, header: str) -> str:
    return f"{escape(header)}:\n" + diff_module.report(diff, by_process=True, clean=escape)


def diff_json(diff: diff_module.Diff) -> str:
    return json.dumps(diff_module.to_json(diff), indent=1)
