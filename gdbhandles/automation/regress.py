"""Golden files of handle records for `gdbhandles regress`; the comparison itself is diff.py."""

from __future__ import annotations

import json
from pathlib import Path

from gdbhandles.diff import Diff, compare, report  # noqa: F401  (regress's interface)
from gdbhandles.errors import HandleError


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
    Path(path).write_text(json.dumps(sorted(records, key=lambda r: (r["pid"], r["handle"])), indent=1) + "\n")
