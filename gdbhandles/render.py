"""Text tables (WinDbg `!handle` / volatility3 columns) and JSON lists of records."""

from __future__ import annotations

import json

from gdbhandles.windows import access
from gdbhandles.records import HandleRecord, InfoRecord, LookupRecord, ProcessRecord


def _table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


ACCESS_WIDTH = 40          # decoded rights beyond this are cut in tables (lookup and JSON have them all)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def handles_table(records: list[HandleRecord]) -> str:
    rows = [[str(r.pid), r.process, f"{r.handle:#x}", f"{r.object:#018x}", r.type or "?",
             _short(access.describe(r.type, r.granted_access), ACCESS_WIDTH),
             "|".join(access.attribute_names(r.attributes)) or "-", r.name or ""] for r in records]
    return _table(["PID", "Process", "Handle", "Object", "Type", "Access", "Attributes", "Name"], rows,
                  right={0, 2})


def handles_json(records: list[HandleRecord]) -> str:
    return json.dumps([r.to_json() for r in records], indent=1)


def walk_summary(records: list[HandleRecord], seconds: float, stats) -> str:
    processes = len({r.pid for r in records})
    return (f"{processes} processes, {len(records)} handles, {seconds:.2f} s "
            f"({stats.round_trips} memory reads, {stats.bytes} bytes, {stats.cache_hits} cache hits)")


def processes_table(records: list[ProcessRecord]) -> str:
    rows = [[str(r.pid), r.name, f"{r.eprocess:#018x}", f"{r.handle_table:#x}" if r.handle_table else "-",
             "-" if r.level is None else str(r.level), str(r.handle_count)] for r in records]
    return _table(["PID", "Name", "EPROCESS", "HandleTable", "Level", "Handles"], rows, right={0, 4, 5})


def processes_json(records: list[ProcessRecord]) -> str:
    return json.dumps([r.to_json() for r in records], indent=1)


def lookup_json(records: list[LookupRecord]) -> str:
    return json.dumps([r.to_json() for r in records], indent=1)


def lookup_text(record: LookupRecord) -> str:
    lines = [f"process      {record.process} (pid {record.pid})",
             f"handle       {record.handle:#x}"]
    if record.note:
        lines.append(f"note         {record.note}")
    if record.object is not None:
        lines += [f"object       {record.object:#018x} (header {record.header:#018x})",
                  f"type         {record.type or '?'}",
                  f"name         {record.name if record.name is not None else '(none)'}",
                  f"access       {record.granted_access:#x} {'|'.join(record.access_names)}".rstrip(),
                  f"attributes   {record.attributes:#x} {', '.join(record.attribute_names) or '(none)'}"]
    if record.table is not None:
        lines.append(f"table        {record.table:#018x}, {record.levels} level(s) above the entries")
        for step in record.path:
            lines.append(f"  level {step.level}    {step.address:#018x} [{step.index}]")
        if record.entry is not None:
            lines.append(f"entry        {record.entry:#018x}")
    lines.append(f"status       {record.status}")
    return "\n".join(lines)


def info_text(record: InfoRecord) -> str:
    lines = [f"build        {record.build} (ntkrnlmp.pdb {record.guid} age {record.age})",
             f"kernel base  {record.kernel_base:#018x}, {record.kernel_size:#x} bytes ({record.kernel_base_source})",
             f"kernel DTB   {record.dtb:#x} ({record.dtb_source})",
             f"layout       {record.profile}",
             f"cookie       " + ("none (build without ObHeaderCookie)" if record.header_cookie is None
                                 else f"{record.header_cookie:#04x}"),
             "globals"]
    for name, address in record.globals.items():
        where = f"{address:#018x}" if address is not None else "-"
        lines.append(f"  {name:<22} {where}  {record.sources.get(name, '')}")
    s = record.stats
    lines.append(f"reads        {s.reads} requests, {s.round_trips} memory reads, {s.bytes} bytes, "
                 f"{s.cache_hits} cache hits")
    lines += [f"warning      {w}" for w in record.warnings]
    return "\n".join(lines)


def info_json(record: InfoRecord) -> str:
    return json.dumps(record.to_json(), indent=1)
