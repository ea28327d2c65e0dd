"""Golden-file comparison of handle records: what was added, removed or changed, by pid and
handle value."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gdbhandles.errors import HandleError

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


def _describe(record: dict) -> str:
    return (f"pid {record['pid']} ({record['process']}) handle {record['handle']:#x}: {record['type']} "
            f"{_show(record['name'])} access {record['granted_access']:#x} object {record['object']:#x}")


def report(diff: Diff) -> str:
    lines = [f"+ {_describe(r)}" for r in diff.added] + [f"- {_describe(r)}" for r in diff.removed]
    for old, new in diff.changed:
        changes = ", ".join(f"{f} {_show(old.get(f))} -> {_show(new.get(f))}" for f in FIELDS
                            if old.get(f) != new.get(f))
        lines.append(f"~ pid {new['pid']} ({new['process']}) handle {new['handle']:#x}: {changes}")
    lines.append(f"{len(diff.added)} added, {len(diff.removed)} removed, {len(diff.changed)} changed")
    return "\n".join(lines)


def load(path: str | Path) -> list[dict]:
    try:
        records = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HandleError(f"no golden file {path} (create it with --update)") from None
    except (OSError, ValueError) as exc:
        raise HandleError(f"golden file {path} unreadable: {exc}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "pid" in r and "handle" in r
                                                for r in records):
        raise HandleError(f"golden file {path} is not a list of handle records")
    return records


def save(path: str | Path, records: list[dict]) -> None:
    Path(path).write_text(json.dumps(sorted(records, key=_key), indent=1) + "\n")
