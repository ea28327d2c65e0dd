"""Handle records then and now: what was opened (+), closed (-) or changed (~), by pid and
handle value. `gdbhandles regress` (golden files) and `handle diff` (marks) share it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = ["FIELDS", "Diff", "compare", "report", "to_json"]

FIELDS = ("process", "object", "type", "name", "granted_access", "attributes")


@dataclass
class Diff:
    added: list[dict] = field(default_factory=list)
    removed: list[dict] = field(default_factory=list)
    changed: list[tuple[dict, dict]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def _key(record: dict) -> tuple[int, int]:
    return record["pid"], record["handle"]


def compare(expected: list[dict], actual: list[dict]) -> Diff:
    want = {_key(r): r for r in expected}
    got = {_key(r): r for r in actual}
    return Diff(added=[got[k] for k in sorted(got.keys() - want.keys())],
                removed=[want[k] for k in sorted(want.keys() - got.keys())],
                changed=[(want[k], got[k]) for k in sorted(want.keys() & got.keys())
                         if any(want[k].get(f) != got[k].get(f) for f in FIELDS)])


def _show(value) -> str:
    return f"{value:#x}" if isinstance(value, int) else json.dumps(value)


def _describe(record: dict, clean=str) -> str:
    return (f"pid {record['pid']} ({clean(record['process'])}) handle {record['handle']:#x}: {clean(record['type'])} "
            f"{_show(record['name'])} access {record['granted_access']:#x} object {record['object']:#x}")


def _changed(old: dict, new: dict, clean=str) -> str:
    changes = ", ".join(f"{f} {_show(old.get(f))} -> {_show(new.get(f))}" for f in FIELDS
                        if old.get(f) != new.get(f))
    return f"~ pid {new['pid']} ({clean(new['process'])}) handle {new['handle']:#x}: {changes}"


def report(diff: Diff, by_process: bool = False, clean=str) -> str:
    """One line per difference (+ added, - removed, ~ changed) and a count line; all the
    added first, then removed, then changed, or with `by_process` in pid and handle order.
    `clean` makes a process name safe for a terminal (names and types are JSON-quoted)."""
    lines = [(_key(r), f"+ {_describe(r, clean)}") for r in diff.added] + \
            [(_key(r), f"- {_describe(r, clean)}") for r in diff.removed] + \
            [(_key(new), _changed(old, new, clean)) for old, new in diff.changed]
    if by_process:
        lines.sort(key=lambda line: line[0])
    text = [line for _key_, line in lines]
    text.append(f"{len(diff.added)} added, {len(diff.removed)} removed, {len(diff.changed)} changed")
    return "\n".join(text)


def to_json(diff: Diff) -> dict:
    return {"added": diff.added, "removed": diff.removed,
            "changed": [{"old": old, "new": new} for old, new in diff.changed]}
