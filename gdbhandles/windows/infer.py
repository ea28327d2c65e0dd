"""Structure offsets for kernels we ship no layout for, derived from the kernel itself.

Two independent ways per offset where the kernel offers them: the code of an exported accessor
(PsGetProcessId reads UniqueProcessId, PsGetThreadId Cid.UniqueThread, the handle-reference
worker the current process's ObjectTable ...) and an invariant of live objects (System's pid 4
with ActiveProcessLinks right after it, its ImageFileName "System", its ObjectTable equal to
the kernel handle table, every thread's Cid naming its own id in PspCidTable). Structures
unchanged since Windows 8.1 (_OBJECT_HEADER, _HANDLE_TABLE(_ENTRY), _OBJECT_TYPE, name info,
_FILE_OBJECT's first fields, _UNICODE_STRING) come from the nearest shipped layout and are
checked by discovery's invariants. Every offset records how it was found (`how`).
"""

from __future__ import annotations

from gdbhandles.errors import Advice, HandleError
from gdbhandles.windows import disasm, layouts
from gdbhandles.windows.kernel import Check, Kernel
from gdbhandles.windows.layouts import Field

INFERRED = {"_EPROCESS": ("UniqueProcessId", "ActiveProcessLinks", "ObjectTable", "ImageFileName",
                          "Pcb.DirectoryTableBase"),
            "_ETHREAD": ("Cid",), "_KTHREAD": ("ApcState.Process", "Process"), "_KPCR": ("Prcb.CurrentThread",),
            "_CM_KEY_CONTROL_BLOCK": ("NameBlock", "ParentKcb")}
EPROCESS_SCAN = 0x1000          # bytes of System's EPROCESS searched for invariants
SYSTEM_PID = 4


class InferredLayout(layouts.Layout):
    """Inferred offsets for the structures that move between builds; the rest from `base`."""

    def __init__(self, base: layouts.Layout, build: int):
        super().__init__(build, f"inferred ({build})",
                         f"inferred from the kernel's code and live data (stable structures from shipped "
                         f"profile {base.version})", None)
        self.base = base
        self.fields: dict[tuple[str, str], Field] = {}
        self.how: dict[str, str] = {}           # "struct.field" -> how it was found

    def put(self, struct: str, path: str, offset: int, size: int, how: str) -> None:
        self.fields[(struct, path)] = Field(offset, size)
        self.how[f"{struct}.{path}"] = how

    def described(self) -> dict[str, str]:
        """Each inferred offset with how it was found (handle info)."""
        return {name: f"{self.fields[tuple(name.split('.', 1))].offset:#x}: {how}" for name, how in self.how.items()}

    def _own(self, struct, path):
        if struct in INFERRED:
            return self.fields.get((struct, path))
        return self.base.find(struct, path)

    def _own_size(self, struct):
        return None if struct in INFERRED else self.base.size(struct)


def nearest_base(build: int) -> layouts.ProfileLayout:
    """The shipped layout of the same build, else of the nearest build (for stable structures)."""
    same = layouts.for_build(build)
    if same is not None:
        return same
    nearest = min((p["build"] for p in layouts.shipped_profiles()), key=lambda b: (abs(b - build), -b))
    return layouts.for_build(nearest)


def exported_code(kernel: Kernel, *names: str, depth: int = 1) -> list[tuple[str, list[disasm.Trace]]]:
    out = []
    for name in names:
        rva = kernel.image.exports.get(name)
        if rva is not None:
            out.append((name, disasm.traces(kernel.space.read, kernel.base + rva, depth)))
    return out


def accessor(kernel: Kernel, name: str, lea: bool = False) -> tuple[int, str] | None:
    """(offset, how) of the first field the exported accessor reads (or addresses) from its argument."""
    for function, found in exported_code(kernel, name):
        reads = disasm.field_reads(found[:1], ("arg", 0), None if lea else 8, lea=lea)
        if reads:
            disp, at = reads[0]
            return disp, f"code: {function} at {at:#x}"
    return None


def agree(kernel: Kernel, what: str, code: tuple[int, str] | None,
           live: tuple[int, str] | None) -> tuple[int, str]:
    """The offset both ways give (a failed check when they differ; the live one then wins)."""
    if code and live:
        kernel.checks.append(Check(f"{what}: code and live data agree", code[0] == live[0],
                                   f"{code[0]:#x} ({code[1]}) vs {live[0]:#x} ({live[1]})"))
        return live if code[0] != live[0] else (code[0], f"{code[1]}; {live[1]}")
    if code or live:
        return code or live
    raise HandleError(f"cannot infer {what}: no accessor in the kernel's code and no live invariant holds",
                      Advice.SUPPLY_PROFILE)


def qwords(kernel: Kernel, address: int, size: int) -> list[int]:
    """`size` bytes as qwords; past an unreadable page boundary, zeros (a structure's tail may
    lie beyond the page its pool block ends in). HandleError if even the first page fails."""
    raw, at = b"", address
    while len(raw) < size:
        chunk = min(size - len(raw), 0x1000 - (at & 0xFFF))
        try:
            raw += kernel.space.read(at, chunk)
        except HandleError:
            if not raw:
                raise
            raw += bytes(size - len(raw))
        at += chunk
    return [int.from_bytes(raw[i:i + 8], "little") for i in range(0, size, 8)]


def _process_list(kernel: Kernel, system: int, words: list[int]) -> tuple[int, str] | None:
    """UniqueProcessId by invariant: 4 in System's EPROCESS, followed by a LIST_ENTRY whose
    neighbours point back at it (ActiveProcessLinks right after UniqueProcessId)."""
    for i in range(1, len(words) - 2):
        if words[i] != SYSTEM_PID:
            continue
        links, flink, blink = system + 8 * (i + 1), words[i + 1], words[i + 2]
        try:
            if kernel.space.u64(flink + 8) == links and kernel.space.u64(blink) == links:
                return 8 * i, "live: System's pid 4 followed by a LIST_ENTRY whose Flink->Blink and Blink->Flink return"
        except HandleError:
            continue
    return None


def infer_process(kernel: Kernel, layout: InferredLayout, system: int) -> None:
    """The _EPROCESS offsets, from System's EPROCESS (PsInitialSystemProcess) and the accessors."""
    words = qwords(kernel, system, EPROCESS_SCAN)
    pid, how = agree(kernel, "_EPROCESS.UniqueProcessId", accessor(kernel, "PsGetProcessId"),
                      _process_list(kernel, system, words))
    layout.put("_EPROCESS", "UniqueProcessId", pid, 8, how)
    layout.put("_EPROCESS", "ActiveProcessLinks", pid + 8, 16,
               "live: right after UniqueProcessId (every x64 build), its links checked")
    raw = b"".join(word.to_bytes(8, "little") for word in words)
    at = raw.find(b"System\0")
    live_name = (at, "live: \"System\" in System's EPROCESS") if at >= 0 else None
    name, how = agree(kernel, "_EPROCESS.ImageFileName", accessor(kernel, "PsGetProcessImageFileName", lea=True),
                       live_name)
    layout.put("_EPROCESS", "ImageFileName", name, 15, how)
    table, how = agree(kernel, "_EPROCESS.ObjectTable", _object_table_code(kernel),
                        _object_table_live(kernel, words))
    layout.put("_EPROCESS", "ObjectTable", table, 8, how)


def _object_table_code(kernel: Kernel) -> tuple[int, str] | None:
    """ObReferenceObjectByHandle(WithTag): [[[gs:CurrentThread] + ApcState.Process] + ObjectTable]."""
    for function, found in exported_code(kernel, "ObReferenceObjectByHandleWithTag", "ObReferenceObjectByHandle"):
        for base, disp, at in disasm.loads_through(found, "load"):
            if base[1][0] == "gs":
                return disp, f"code: {function} at {at:#x}"
    return None


def _object_table_live(kernel: Kernel, words: list[int]) -> tuple[int, str] | None:
    """The System EPROCESS slot holding the value of a qword the handle-reference code loads."""
    values = {}
    for function, found in exported_code(kernel, "ObReferenceObjectByHandleWithTag", "ObReferenceObjectByHandle"):
        for address, _at in disasm.constant_loads(found, 8):
            try:
                values[kernel.space.u64(address)] = address
            except HandleError:
                continue
    for i, word in enumerate(words):
        if word in values and word >> 47 == 0x1FFFF:
            return 8 * i, f"live: System's slot equal to ObpKernelHandleTable's value ({values[word]:#x})"
    return None
