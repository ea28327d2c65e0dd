"""Golden files of handle records for `gdbhandles regress`; the comparison itself is diff.py.

A golden file is checked record by record before anything is compared (a wrong field type
would otherwise surface as a traceback, or as a "difference" with exit 1), and written
atomically (a temporary file in the same directory, renamed), so an interrupted --update
never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from gdbhandles.diff import Diff, compare, report  # noqa: F401  (regress's interface)
from gdbhandles.errors import HandleError
from gdbhandles.windows.files import FileError, open_regular, read_capped

# field -> the JSON types it may hold (a record's shape: docs/architecture.md)
SHAPE = {"pid": (int,), "process": (str,), "handle": (int,), "object": (int,), "type": (str, type(None)),
         "name": (str, type(None)), "granted_access": (int,), "attributes": (int,)}
MAX_GOLDEN = 256 << 20          # bytes: far beyond any real walk, short of eating the host


class GoldenError(HandleError):
    """A golden file that is missing, unreadable or not a list of handle records."""


def _bad_field(record, index: int) -> str | None:
    if not isinstance(record, dict):
        return f"record {index} is not an object"
    for name, types in SHAPE.items():
        if name not in record:
            return f"record {index} has no {name!r}"
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"record {index} field {name!r} is {type(value).__name__}, not {types[0].__name__}"
        if isinstance(value, int) and not 0 <= value < 1 << 64:
            return f"record {index} field {name!r} is out of range"
    return None


def validate(records, path) -> list[dict]:
    if not isinstance(records, list):
        raise GoldenError(f"golden file {path} is not a list of handle records")
    seen = set()
    for index, record in enumerate(records):
        problem = _bad_field(record, index)
        if problem:
            raise GoldenError(f"golden file {path}: {problem}")
        key = (record["pid"], record["handle"])
        if key in seen:
            raise GoldenError(f"golden file {path}: record {index} repeats pid {key[0]} handle {key[1]:#x}")
        seen.add(key)
    return records


def load(path: str | Path) -> list[dict]:
    try:
        with open(open_regular(path, "golden file"), "rb") as file:
            text = read_capped(file, MAX_GOLDEN, "golden file", path)
    except FileError as exc:
        if not os.path.lexists(path):
            raise GoldenError(f"no golden file {path} (create it with --update)") from None
        raise GoldenError(str(exc)) from None
    except OSError as exc:
        raise GoldenError(f"golden file {path} unreadable: {exc.strerror}") from None
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise GoldenError(f"golden file {path} is not JSON: {str(exc)[:100]}") from None
    return validate(records, path)


def check_writable(path: str | Path) -> None:
    """Before a run with --update: fail now, not after the walk."""
    directory = Path(path).resolve().parent
    if not directory.is_dir():
        raise GoldenError(f"cannot write golden file {path}: no directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise GoldenError(f"cannot write golden file {path}: {directory} is not writable")
    if Path(path).exists() and not Path(path).is_file():
        raise GoldenError(f"cannot write golden file {path}: not a regular file")


def save(path: str | Path, records: list[dict]) -> None:
    """Write atomically: the old golden file stays whole until the new one is complete."""
    check_writable(path)
    text = json.dumps(sorted(validate(records, "of this run"), key=lambda r: (r["pid"], r["handle"])),
                      indent=1) + "\n"
    directory = str(Path(path).resolve().parent)
    umask = os.umask(0)
    os.umask(umask)
    fd, temporary = tempfile.mkstemp(prefix=".golden-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as file:
            os.fchmod(file.fileno(), 0o666 & ~umask)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise GoldenError(f"cannot write golden file {path}: {exc.strerror}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
