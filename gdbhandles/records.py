"""Plain records the engine produces and render.py formats.

`HandleRecord.to_json()` is exactly the handle record docs/architecture.md documents, so
tests and scripts compare lists directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from gdbhandles.windows.handle_table import LookupStatus, TableStep
from gdbhandles.windows.memory import ReadStats

HANDLE_KEYS = ("pid", "process", "handle", "object", "type", "name", "granted_access", "attributes")


@dataclass
class ProcessRecord:
    pid: int
    name: str                    # the full image name when readable, else ImageFileName
    eprocess: int
    dtb: int
    handle_table: int            # _HANDLE_TABLE address, 0 for an exiting process
    table_code: int
    level: int | None            # None when there is no table
    next_handle_needing_pool: int
    handle_count: int            # handles in use: Windows' HandleCount (counted when the layout lacks it)
    image_file_name: str = ""    # _EPROCESS.ImageFileName (15 bytes at most)
    image_path: str | None = None   # NT path from SeAuditProcessCreationInfo, None when unknown
    problems: list[str] = field(default_factory=list)   # damage met counting its handles

    def to_json(self) -> dict:
        """All fields; "problems" only when the table was damaged (handle_count is then what
        could be counted)."""
        out = asdict(self)
        if not self.problems:
            del out["problems"]
        return out


@dataclass(slots=True)
class HandleRecord:
    pid: int
    process: str
    handle: int
    object: int                  # object body address
    type: str | None
    name: str | None
    granted_access: int
    attributes: int              # 1 ProtectFromClose, 2 Inherit, 4 Audit
    problems: list[str] = field(default_factory=list)   # damage met decoding it: the fields it spoiled

    def to_json(self) -> dict:
        """The documented record shape; "problems" only when damage spoiled part of the record."""
        out = {key: getattr(self, key) for key in HANDLE_KEYS}
        if self.problems:
            out["problems"] = list(self.problems)
        return out


@dataclass
class LookupRecord:
    """One handle, decoded with everything a person debugging wants to see."""
    pid: int
    process: str
    handle: int
    status: LookupStatus
    object: int | None = None
    header: int | None = None
    type: str | None = None
    name: str | None = None
    granted_access: int = 0
    attributes: int = 0
    access_names: list[str] = field(default_factory=list)
    attribute_names: list[str] = field(default_factory=list)
    table: int | None = None     # the _HANDLE_TABLE searched
    levels: int | None = None    # TableCode & 3
    path: list[TableStep] = field(default_factory=list)
    entry: int | None = None     # _HANDLE_TABLE_ENTRY address
    note: str | None = None      # "pseudo-handle: current thread of vCPU 0", "kernel handle"
    problems: list[str] = field(default_factory=list)   # as HandleRecord.problems

    def handle_record(self) -> HandleRecord:
        return HandleRecord(self.pid, self.process, self.handle, self.object, self.type, self.name,
                            self.granted_access, self.attributes, list(self.problems))

    def to_json(self) -> dict:
        return self.handle_record().to_json()


@dataclass
class WalkWarning:
    """A bad entry, unreadable page or missing layout member met during a walk, which went on.
    `pid` is None for what concerns no one process (a layout without a member)."""
    pid: int | None
    process: str | None
    message: str
    handle: int | None = None

    def __str__(self) -> str:
        if self.pid is None:
            return self.message
        handle = f" handle {self.handle:#x}" if self.handle is not None else ""
        return f"{self.process}({self.pid}){handle}: {self.message}"


@dataclass
class InfoRecord:
    build: int
    version: str | None          # the kernel's own (RT_VERSION FileVersion); None when unreadable
    layout: str                  # version of the shipped profile (or the ISF) whose structures serve it
    guid: str
    age: int
    kernel_base: int
    kernel_size: int
    dtb: int
    dtb_source: str
    kernel_base_source: str
    profile: str                 # what supplied the structure layouts
    globals: dict[str, int | None]
    sources: dict[str, str]      # global name -> how it was found
    stats: ReadStats
    header_cookie: int | None = None
    warnings: list[str] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)   # invariants: (what, passed, detail)
    inferred: dict[str, str] = field(default_factory=dict)   # "struct.field" -> how found (layout infer)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class CidRecord:
    """One PspCidTable entry: a process or thread id and the object it names."""
    id: int
    object: int                  # _EPROCESS or _ETHREAD body address
    type: str | None             # Process | Thread (anything else is a damaged entry)
    pid: int | None              # the process, or the thread's owning process
    tid: int | None              # None for a process
    process: str | None          # image name of that process
    entry: int                   # _HANDLE_TABLE_ENTRY address

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class FreeEntryRecord:
    """A handle table entry holding no object, and its place in the kernel's free list."""
    pid: int
    process: str
    handle: int
    entry: int                   # _HANDLE_TABLE_ENTRY address
    status: str                  # free (closed) | never_allocated
    free_position: int | None    # 0 = the next handle the kernel hands out; None: not on the list

    def to_json(self) -> dict:
        return asdict(self)
