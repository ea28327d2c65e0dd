"""_EPROCESS and the process list: PsActiveProcessHead through ActiveProcessLinks, System first.

A process has two names. `_EPROCESS.ImageFileName` keeps at most 15 bytes
(`SearchProtocolH`); the full image path hangs off
`SeAuditProcessCreationInfo.ImageFileName` (an `_OBJECT_NAME_INFORMATION` whose `Name` is
`\\Device\\HarddiskVolume3\\Windows\\System32\\SearchProtocolHost.exe`), and its last component
is the name Task Manager shows. System and other processes without an image file have a
NULL pointer there.
"""

from __future__ import annotations

from dataclasses import dataclass

from gdbhandles.errors import CorruptTable, HandleError
from gdbhandles.windows.kernel import Kernel
from gdbhandles.windows.memory import AddressSpace
from gdbhandles.windows.structure import Struct
from gdbhandles.windows.unicode_string import UnicodeString

__all__ = ["EProcess", "Process", "read_process", "image_path", "active_processes", "linked", "MAX_PROCESSES"]

MAX_PROCESSES = 1 << 16
FIXED = ("UniqueProcessId", "ActiveProcessLinks", "ObjectTable", "ImageFileName", "Pcb.DirectoryTableBase")
AUDIT_NAME = "SeAuditProcessCreationInfo.ImageFileName"
PATH_REACH = 0x200       # bytes of an _OBJECT_NAME_INFORMATION read at once: Name, then most paths


class EProcess(Struct):
    NAME = "_EPROCESS"

    def image_file_name(self, raw: bytes, base: int = 0) -> str:
        """`ImageFileName` (UCHAR[15] on every x64 build; its size comes from the layout)."""
        field = self.field("ImageFileName")
        start = base + field.offset
        return raw[start:start + field.size].split(b"\0", 1)[0].decode("latin-1")

    def read_image_file_name(self, space: AddressSpace, eprocess: int) -> str:
        """`ImageFileName` of the _EPROCESS at `eprocess`."""
        field = self.field("ImageFileName")
        return self.image_file_name(space.read(eprocess + field.offset, field.size), -field.offset)

    def audit_name(self, space: AddressSpace, eprocess: int) -> int:
        """`SeAuditProcessCreationInfo.ImageFileName`: address of an `_OBJECT_NAME_INFORMATION`, or 0."""
        return self.field(AUDIT_NAME).read(space.read, eprocess)


class ObjectNameInformation(Struct):
    NAME = "_OBJECT_NAME_INFORMATION"

    def name(self, space: AddressSpace, address: int) -> str | None:
        """`Name`, a _UNICODE_STRING holding an NT path; its buffer follows it in the same pool
        block, so both come in one read."""
        space.prefetch([(address, PATH_REACH)])
        return UnicodeString.of(self.layout).read(space, address + self.offset("Name"))


@dataclass(frozen=True)
class Process:
    pid: int                 # _EPROCESS.UniqueProcessId
    image_file_name: str     # _EPROCESS.ImageFileName (15 bytes at most)
    eprocess: int
    dtb: int                 # _EPROCESS.Pcb.DirectoryTableBase
    table: int               # _EPROCESS.ObjectTable (0 while the process exits)
    image_path: str | None = None   # the full NT path of the image, when it could be read

    @property
    def name(self) -> str:
        """The full image name when known (`SearchProtocolHost.exe`), else ImageFileName."""
        if self.image_path:
            return self.image_path.rpartition("\\")[2]
        return self.image_file_name

    @property
    def label(self) -> str:
        return f"{self.name}({self.pid})"


def read_process(kernel: Kernel, eprocess: int) -> Process:
    """The fixed fields of the `_EPROCESS` at `eprocess`, read as one span (no image path)."""
    layout = EProcess.of(kernel.layout)
    start, size = layout.span(*FIXED)
    raw = kernel.space.read(eprocess + start, size)
    value = {name: layout.field(name).extract(raw, -start) for name in FIXED if name != "ImageFileName"}
    return Process(value["UniqueProcessId"], layout.image_file_name(raw, -start), eprocess,
                   value["Pcb.DirectoryTableBase"], value["ObjectTable"])


def fixed_extent(kernel: Kernel, eprocess: int) -> tuple[int, int]:
    """(address, size) of what read_process reads, to prefetch it with what lies near."""
    start, size = EProcess.of(kernel.layout).span(*FIXED)
    return eprocess + start, size


def image_path(kernel: Kernel, process: Process) -> str | None:
    """The NT path of the process's image, None when it has none (System, Registry).
    ProfileError if the layout lacks the audit member; HandleError if memory is unreadable;
    CorruptTable if the path does not end in the 15-byte ImageFileName."""
    space = kernel.space
    info = EProcess.of(kernel.layout).audit_name(space, process.eprocess)
    if not info:
        return None
    path = ObjectNameInformation.of(kernel.layout).name(space, info)
    if not path:
        return None
    leaf = path.rpartition("\\")[2]
    if not leaf.startswith(process.image_file_name):
        raise CorruptTable(f"image path {path!r} (at {info:#x}) does not end in ImageFileName "
                           f"{process.image_file_name!r}")
    return path


def active_processes(kernel: Kernel) -> tuple[list[Process], list[tuple[Process | None, str]]]:
    """Every process on the active list, in list order (15-byte names; see image_path), and the
    damage met: (process at the bad link or None, one line). A bad link does not end the list:
    it is followed forwards (Flink) from PsActiveProcessHead until a link whose target does not
    link back, then backwards (Blink) from the head to the break, and System is added from
    PsInitialSystemProcess if neither reached it."""
    head = kernel.globals["PsActiveProcessHead"]
    links = EProcess.of(kernel.layout).offset("ActiveProcessLinks")
    forward, problems = _follow(kernel, head, links, FLINK, set())
    if problems:
        backward, more = _follow(kernel, head, links, BLINK, {entry for entry, _ in forward})
        forward += reversed(backward)
        problems += more
    found = [process for _, process in forward]
    system = kernel.system_process
    if system and system not in {p.eprocess for p in found}:
        try:
            found.insert(0, read_process(kernel, system))
            problems.append((found[0], f"process list: System (EPROCESS {system:#x}, PsInitialSystemProcess) "
                                       "is not on it; added"))
        except HandleError as exc:
            problems.append((None, f"process list: PsInitialSystemProcess {system:#x} unreadable ({exc})"))
    return found, problems


FLINK, BLINK = 0, 8


def linked(kernel: Kernel, most: int = MAX_PROCESSES):
    """EPROCESS addresses on PsActiveProcessHead by Flink alone, lazily, in list order: at most
    `most`, until the head, a link met before, or one whose own Flink is unreadable (the process
    list check says where). For discovery and checks that sample processes; active_processes()
    reads and checks them."""
    head = kernel.globals.get("PsActiveProcessHead")
    if not head:
        return
    links, space, seen = kernel.layout.offset("_EPROCESS", "ActiveProcessLinks"), kernel.space, set()
    try:
        entry = space.u64(head)
        while entry != head and entry not in seen and len(seen) < most:
            following = space.u64(entry)
            seen.add(entry)
            yield entry - links
            entry = following
    except HandleError:
        return


def _follow(kernel: Kernel, head: int, links: int, way: int, known: set[int]):
    """[(list entry, Process)] from the head one way until the head, an entry in `known` (where
    the other way stopped) or a bad link; the bad link as [(process before it, one line)]."""
    space, back = kernel.space, BLINK - way
    name = "Flink" if way == FLINK else "Blink"
    out: list[tuple[int, Process]] = []
    seen, here, before = {head}, head, None
    while len(out) < MAX_PROCESSES:
        where = f"the {name} of {before.label} (EPROCESS {before.eprocess:#x})" if before else \
            f"the {name} of PsActiveProcessHead {head:#x}"
        try:
            entry = space.u64(here + way)
            if entry == head or entry in known:
                return out, []
            if entry in seen:
                return out, [(before, f"process list: {where} goes back to {entry:#x}: the list loops")]
            space.prefetch([fixed_extent(kernel, entry - links)])     # its links with its fields: one read
            if space.u64(entry + back) != here:
                return out, [(before, f"process list: {where} points to {entry:#x}, which does not link back")]
            process = read_process(kernel, entry - links)
        except HandleError as exc:
            return out, [(before, f"process list: {where} leads to unreadable memory ({exc})")]
        seen.add(entry)
        out.append((entry, process))
        here, before = entry, process
    return out, [(before, f"process list: more than {MAX_PROCESSES} processes one way: taken as a loop")]
