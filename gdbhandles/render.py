"""Text tables (WinDbg `!handle` / volatility3 columns), text reports and JSON lists of records.

Every string that came from guest memory passes `escape()` before it reaches a terminal:
names are attacker-controlled, and a control or bidi character in one could retitle the
window, move the cursor or reorder what the user reads. JSON escapes by itself.
Tables fit `width` columns when one is given; `paint(role, text)` adds the front end's
colours after the cells are padded, so colours never change widths.
"""

from __future__ import annotations

import json
import operator
import re
import time
from typing import Callable, Iterator

from gdbhandles.windows import access
from gdbhandles.records import HANDLE_KEYS, HandleRecord, InfoRecord, LookupRecord, ProcessRecord, ReadStats, WalkWarning

CUT = "..."                 # marks text cut to fit
ACCESS_WIDTH = 40           # decoded rights beyond this are cut in tables (lookup and JSON have them all)
GAP = "  "
PROGRESS_EVERY = 0.5        # seconds between progress lines
# C0 and C1 controls, DEL, and the bidi embeddings, overrides and isolates (plus LRM/RLM/ALM and
# the Unicode line separators): each shown as a visible escape instead.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
JSON_STRING = json.encoder.encode_basestring_ascii     # what json.dumps writes a str as
NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}


def _visible(match: re.Match) -> str:
    char = match.group()
    return NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape(text: str | None, limit: int | None = None) -> str:
    """`text` safe for a terminal: controls and bidi characters shown as escapes, cut to `limit`
    characters with a visible marker."""
    safe = UNSAFE.sub(_visible, text or "")
    if limit is not None and len(safe) > limit:
        return safe[:max(limit - len(CUT), 0)] + CUT[:limit]
    return safe


def plain(role: str, text: str) -> str:
    """No colours (a `paint` for pipes, files and `set style enabled off`)."""
    return text


Paint = Callable[[str, str], str]


# --- progress and warnings: one format for both front ends ------------------------------------------

class Progress:
    """Throttled progress lines to `write` (gdb's error stream, or stderr when it is a terminal)."""

    def __init__(self, write: Callable[[str], None] | None, every: float = PROGRESS_EVERY):
        self.write = write
        self.every = every
        self.last = time.monotonic()
        self.shown = False

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if self.write is not None and now - self.last >= self.every:
            self.last = now
            self.shown = True
            self.write(escape(message, 200) + "\n")


def warning_line(warning: WalkWarning) -> str:
    """`warning: lsass.exe(672) handle 0x1c: <what>`, for every walk warning in both front ends."""
    if warning.pid is None:                  # about no one process: a layout without a member
        return f"warning: {escape(warning.message)}"
    handle = f" handle {warning.handle:#x}" if warning.handle is not None else ""
    return f"warning: {escape(warning.process, 64)}({warning.pid}){handle}: {escape(warning.message)}"


def stats_since(now: ReadStats, before: ReadStats) -> ReadStats:
    return ReadStats(**{key: getattr(now, key) - getattr(before, key) for key in vars(now)})


# --- tables --------------------------------------------------------------------------------------

def _fit(widths: list[int], shrink: list[tuple[int, int]], width: int | None) -> list[int]:
    """Column widths within `width` (gaps included): shrink the columns of `shrink`, in order, to
    their minimum widths until the row fits; a column already narrower than its minimum keeps its
    width (widening it would take the room from the columns cut next)."""
    widths = list(widths)
    if width is None:
        return widths
    for column, minimum in shrink:
        over = sum(widths) + len(GAP) * (len(widths) - 1) - width
        if over <= 0:
            break
        widths[column] = min(widths[column], max(minimum, widths[column] - over))
    return widths


def _table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset(),
           width: int | None = None, shrink: tuple[tuple[int, int], ...] = (),
           roles: dict[int, str] | None = None, paint: Paint = plain) -> str:
    natural = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    widths = _fit(natural, list(shrink), width)
    roles = roles or {}

    def line(cells, role=None):
        cut = [c if len(c) <= w else c[:max(w - len(CUT), 0)] + CUT[:w] for c, w in zip(cells, widths)]
        padded = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cut, widths))]
        text = GAP.join(padded).rstrip()
        if width and len(text) > width:                # narrower than the columns' minimums: cut the row
            text = text[:width - len(CUT)] + CUT
        elif not role:                                 # colours per cell, after padding
            text = GAP.join(paint(roles[i], p) if i in roles else p for i, p in enumerate(padded)).rstrip()
        return paint(role, text) if role else text
    rule = GAP.join("-" * w for w in widths)
    rule = rule[:width] if width else rule
    return "\n".join([line(headers, "header"), paint("header", rule)] + [line(r) for r in rows])


HANDLE_COLUMNS = ["PID", "Process", "Handle", "Object", "Type", "Access", "Attributes", "Name"]
# (column, minimum width), in the order columns give way when a row is wider than the terminal
HANDLE_SHRINK = ((5, 24), (7, 32), (4, 14), (5, 16), (6, 10), (1, 10), (7, 16), (5, 10), (4, 10), (7, 8),
                 (6, 5), (5, 6), (7, 4))


def handles_table(records: list[HandleRecord], width: int | None = None, paint: Paint = plain) -> str:
    """The walk table; when it must fit `width` and every row is of one process, the PID and
    Process columns go first (the summary line names the process count)."""
    rows = [[str(r.pid), escape(r.process), f"{r.handle:#x}", f"{r.object:#018x}", escape(r.type) or "?",
             escape(access.describe(r.type, r.granted_access), ACCESS_WIDTH),
             "|".join(access.attribute_names(r.attributes)) or "-", escape(r.name)] for r in records]
    headers, shrink, right, roles = HANDLE_COLUMNS, HANDLE_SHRINK, {0, 2}, {4: "type"}
    natural = sum(max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)) + 2 * 7
    if width and natural > width and len({r.pid for r in records}) == 1:
        headers, rows = headers[2:], [r[2:] for r in rows]
        shrink = tuple((c - 2, m) for c, m in shrink if c >= 2)
        right, roles = {0}, {2: "type"}
    return _table(headers, rows, right=right, width=width, shrink=shrink, roles=roles, paint=paint)


def handles_json(records: list[HandleRecord]) -> str:
    """json.dumps(list, indent=1) of the records, and a newline."""
    return "".join(handles_json_pieces(records))


def handles_json_pieces(records: list[HandleRecord]) -> Iterator[str]:
    """handles_json() one record at a time: no list of dicts, no string as large as the walk."""
    if not records:
        yield "[]\n"
        return
    yield "[\n"
    last = len(records) - 1
    strings = _JsonStrings()
    for i, record in enumerate(records):
        yield _record_json(record, strings) + (",\n" if i < last else "\n")
    yield "]\n"


# a flat record as json.dumps(list, indent=1) writes a list item: %d for the integer fields (what
# json writes for an int), %s for strings already in JSON form; filled in HANDLE_KEYS order
_INTEGERS = {"pid", "handle", "object", "granted_access", "attributes"}
_RECORD_TEMPLATE = " {\n" + ",\n".join(f"  {JSON_STRING(key)}: %{'d' if key in _INTEGERS else 's'}"
                                        for key in HANDLE_KEYS) + "\n }"
_FIELDS = operator.attrgetter(*HANDLE_KEYS)


class _JsonStrings(dict):
    """Strings as json writes them, kept for one walk (at most 4,096): process and type names
    repeat on every record; json.dumps(None) is "null"."""

    def __missing__(self, value: str | None) -> str:
        if len(self) >= 4096:
            self.clear()
        text = self[value] = "null" if value is None else JSON_STRING(value)
        return text


def _record_json(record: HandleRecord, strings: _JsonStrings) -> str:
    """One record as json.dumps(list, indent=1) writes it; a flat one (no problems, integers where
    integers belong) from the template (a walk writes ~50,000: several times faster than
    json.dumps). Names rarely repeat, so they are not kept."""
    if not record.problems:
        pid, process, handle, address, kind, name, access, attributes = _FIELDS(record)
        try:
            return _RECORD_TEMPLATE % (pid, strings[process], handle, address, strings[kind],
                                       "null" if name is None else JSON_STRING(name), access, attributes)
        except TypeError:       # not an int where one belongs: json.dumps says what it is
            pass
    return " " + json.dumps(record.to_json(), indent=1).replace("\n", "\n ")


def walk_summary(records: list[HandleRecord], seconds: float, stats) -> str:
    processes = len({r.pid for r in records})
    return (f"{processes} processes, {len(records)} handles, {seconds:.2f} s "
            f"({stats.round_trips} memory reads, {stats.bytes} bytes, {stats.cache_hits} cache hits)")


def processes_table(records: list[ProcessRecord], width: int | None = None, paint: Paint = plain) -> str:
    rows = [[str(r.pid), escape(r.name), f"{r.eprocess:#018x}", f"{r.handle_table:#x}" if r.handle_table else "-",
             "-" if r.level is None else str(r.level), str(r.handle_count)] for r in records]
    return _table(["PID", "Name", "EPROCESS", "HandleTable", "Level", "Handles"], rows, right={0, 4, 5},
                  width=width, shrink=((1, 12),), paint=paint)


def processes_json(records: list[ProcessRecord]) -> str:
    return json.dumps([r.to_json() for r in records], indent=1)


# --- reports -------------------------------------------------------------------------------------

def lookup_json(records: list[LookupRecord]) -> str:
    return json.dumps([r.to_json() for r in records], indent=1)


def lookup_text(record: LookupRecord, paint: Paint = plain) -> str:
    lines = [f"process      {escape(record.process)} (pid {record.pid})",
             f"handle       {record.handle:#x}"]
    if record.note:
        lines.append(f"note         {escape(record.note)}")
    if record.object is not None:
        lines += [f"object       {record.object:#018x} (header {record.header:#018x})",
                  f"type         {paint('type', escape(record.type) or '?')}",
                  f"name         {escape(record.name) if record.name is not None else '(none)'}",
                  f"access       {record.granted_access:#x} {'|'.join(record.access_names)}".rstrip(),
                  f"attributes   {record.attributes:#x} {', '.join(record.attribute_names) or '(none)'}"]
    if record.table is not None:
        lines.append(f"table        {record.table:#018x}, {record.levels} level(s) above the entries")
        for step in record.path:
            lines.append(f"  level {step.level}    {step.address:#018x} [{step.index}]")
        if record.entry is not None:
            lines.append(f"entry        {record.entry:#018x}")
    lines += [f"damage       {escape(problem)}" for problem in record.problems]
    lines.append(f"status       {record.status}" + (" (damaged: see above)" if record.problems else ""))
    return "\n".join(lines)


def info_text(record: InfoRecord, paint: Paint = plain) -> str:
    lines = [f"build        {record.build} (ntkrnlmp.pdb {record.guid} age {record.age})",
             f"kernel base  {record.kernel_base:#018x}, {record.kernel_size:#x} bytes ({record.kernel_base_source})",
             f"kernel DTB   {record.dtb:#x} ({record.dtb_source})",
             "version      " + (f"{record.version} (the kernel's FileVersion)" if record.version
                                else "unknown (no readable RT_VERSION in the kernel image)"),
             f"layout       {escape(record.profile)}",
             "cookie       " + ("none (build without ObHeaderCookie)" if record.header_cookie is None
                                else f"{record.header_cookie:#04x}"),
             paint("header", "globals")]
    for name, address in record.globals.items():
        where = f"{address:#018x}" if address is not None else "-"
        lines.append(f"  {name:<22} {where}  {escape(record.sources.get(name, ''))}")
    s = record.stats
    lines.append(f"reads        {s.reads} requests, {s.round_trips} memory reads, {s.bytes} bytes, "
                 f"{s.cache_hits} cache hits")
    if record.inferred:
        lines.append("inferred offsets")
        lines += [f"  {name:<34} {escape(how)}" for name, how in record.inferred.items()]
    passed = sum(1 for _, ok, _ in record.checks if ok)
    lines.append(f"checks       {passed} of {len(record.checks)} passed")
    lines += [f"  {'passed' if ok else 'FAILED'}  {what}: {escape(detail)}" for what, ok, detail in record.checks]
    lines += [f"warning      {escape(w)}" for w in record.warnings]
    return "\n".join(lines)


def info_json(record: InfoRecord) -> str:
    return json.dumps(record.to_json(), indent=1)


def error_line(message: str) -> str:
    """An error as one safe line."""
    return escape(message)
