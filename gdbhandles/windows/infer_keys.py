"""The key control block's ParentKcb and NameBlock, two ways.

Code: CmCallbackGetKeyObjectIDEx (CmCallbackGetKeyObjectID before Windows 8) hands the key
body's KeyControlBlock to the routine that builds its name (CmpConstructName, or
CmpConstructNameWithStatus and CmpConstructNameFromKcbNameBlocks, by a call or a tail jump),
which walks to the root: ParentKcb is the field a loop reloads its control block from, NameBlock
the field whose value the loop reads a NameLength through. Live data: the one pair under which
sampled keys' control blocks chain up to a root named REGISTRY. A disagreement fails a check and
the live pair wins; with one way only, that way, said so; with none, the shipped layout's pair,
said so.
"""

from __future__ import annotations

from dataclasses import dataclass

from gdbhandles.errors import HandleError
from gdbhandles.windows import disasm, layouts, object_types
from gdbhandles.windows.eprocess import linked
from gdbhandles.windows.handle_table import HandleTable
from gdbhandles.windows.infer import InferredLayout, agree, qwords
from gdbhandles.windows.kernel import Check, Kernel

__all__ = ["infer_kcb", "name_walks"]

EXPORTS = ("CmCallbackGetKeyObjectIDEx", "CmCallbackGetKeyObjectID")
WALK_DEPTH = 2                  # export -> CmpConstructNameWithStatus -> ...FromKcbNameBlocks
MAX_CALLEES = 4                 # callees handed the control block, per level
KCB_SCAN = 0x200
MAX_KEY_DEPTH = 64
KEY_PROCESSES = 4096            # processes whose handle tables are searched for Key objects

Way = tuple[int, str]           # (offset, how it was found)


@dataclass(frozen=True)
class Walk:
    """A loop up the ParentKcb chain found in the code of `function` (reached from `export`)."""
    export: str
    function: int
    parent: int
    name_block: int
    parent_at: int              # the load of the next control block
    name_at: int                # the load of the name block
    length_at: int              # the NameLength read through it

    def ways(self) -> tuple[Way, Way]:
        """(ParentKcb, how), (NameBlock, how), naming the instructions."""
        where = f"{self.export} -> {self.function:#x}"
        return ((self.parent, f"code: {where}: the walk's next control block loaded at {self.parent_at:#x}"),
                (self.name_block, f"code: {where}: name block loaded at {self.name_at:#x}, its NameLength "
                                  f"read at {self.length_at:#x}"))


def _kcb_traces(read: disasm.Reader, address: int, body_field: int) -> list[disasm.Trace]:
    """The export and the functions it hands the key's control block to in rcx, two calls deep."""
    found = level = [disasm.trace(read, address)]
    kcb = ("load", ("arg", 1), body_field)
    for _ in range(WALK_DEPTH):
        done = {t.address for t in found}
        callees = [callee for t in level for callee, rcx in t.arguments.items()
                   if rcx == kcb and callee not in done][:MAX_CALLEES]
        level = [disasm.trace(read, callee) for callee in dict.fromkeys(callees)]
        found, kcb = found + level, ("arg", 0)
    return found


def _load_of(trace: disasm.Trace, base: disasm.Value, disp: int, loop: disasm.Loop) -> int:
    """The instruction loading the qword [base+disp]: inside the loop and a `mov` if one is, the
    last such (the one the loop's jump back follows); the jump itself if none is seen."""
    found = [a for a in trace.accesses if a.base == base and a.disp == disp and a.size == 8 and not a.lea
             and a.index is None]
    best = max(found, key=lambda a: (loop.head <= a.at <= loop.at, a.text.startswith("mov"), a.at), default=None)
    return best.at if best else loop.at


def _walks_in(trace: disasm.Trace, export: str, length: int) -> list[Walk]:
    """Each loop of `trace` that reloads a register from a field of what it held (ParentKcb) and
    reads a NameLength (at `length`) through another field of it (NameBlock)."""
    out = []
    for loop in trace.loops:
        for _reg, kcb, parent in loop.steps():
            for a in trace.accesses:
                base = a.base
                if (not a.lea and a.index is None and a.size == 2 and a.disp == length and base
                        and base[0] == "load" and base[1] == kcb and base[2] != parent):
                    out.append(Walk(export, trace.address, parent, base[2], _load_of(trace, kcb, parent, loop),
                                    _load_of(trace, kcb, base[2], loop), a.at))
    return out


def name_walks(read: disasm.Reader, base: int, exports: dict[str, int], layout: layouts.Layout) -> list[Walk]:
    """Every walk up the ParentKcb chain in the code the key-name export of the image at `base`
    reaches (`layout` gives the stable key body and name block)."""
    body_field = layout.offset("_CM_KEY_BODY", "KeyControlBlock")
    length = layout.offset("_CM_NAME_CONTROL_BLOCK", "NameLength")
    for export in EXPORTS:
        if export in exports:
            return [walk for t in _kcb_traces(read, base + exports[export], body_field)
                    for walk in _walks_in(t, export, length)]
    return []


def _code_way(kernel: Kernel) -> tuple[tuple[Way, Way] | None, str]:
    """Both offsets from the walks (the first walk's instructions named), or None and why not."""
    walks = name_walks(kernel.space.read, kernel.base, kernel.image.exports, kernel.layout)
    pairs = {(w.parent, w.name_block) for w in walks}
    if len(pairs) == 1:
        return walks[0].ways(), ""
    if not walks:
        return None, "code: no walk up ParentKcb found behind " + " or ".join(EXPORTS)
    kernel.checks.append(Check("key control blocks: the code's walks give one ParentKcb/NameBlock pair", False,
                               ", ".join(f"{p:#x}/{n:#x}" for p, n in sorted(pairs))))
    return None, f"code: its walks give {len(pairs)} different pairs"


def _key_bodies(kernel: Kernel, limit: int = 24) -> list[int]:
    """Bodies of Key objects from the processes' handle tables (types decoded with the cookie)."""
    types = object_types.read_table(kernel, kernel.globals["ObTypeIndexTable"])
    body_offset = kernel.layout.offset("_OBJECT_HEADER", "Body")
    table_offset, bodies = kernel.layout.offset("_EPROCESS", "ObjectTable"), []
    for eprocess in linked(kernel, KEY_PROCESSES):
        table = kernel.space.u64(eprocess + table_offset)
        if table:
            for item in HandleTable(kernel.space, kernel.layout, table).entries():
                header = getattr(item, "header", None)
                if header and object_types.decoded_type(kernel, types, header + body_offset,
                                                        kernel.header_cookie) == "Key":
                    bodies.append(header + body_offset)
        if len(bodies) >= limit:
            break
    return bodies[:limit]


class _Kcbs:
    """Cached reads of control blocks and name blocks for the joint search."""

    def __init__(self, kernel: Kernel):
        self.kernel, self.blocks, self.names = kernel, {}, {}
        L = kernel.layout
        self.length, self.name = L.field("_CM_NAME_CONTROL_BLOCK", "NameLength"), L.offset("_CM_NAME_CONTROL_BLOCK", "Name")

    def words(self, kcb: int) -> list[int]:
        if kcb not in self.blocks:
            self.blocks[kcb] = qwords(self.kernel, kcb, KCB_SCAN)
        return self.blocks[kcb]

    def name_of(self, block: int) -> str | None:
        if block not in self.names:
            try:
                head = self.kernel.space.read(block, self.name)
                length = self.length.extract(head)
                raw = self.kernel.space.read(block + self.name, length) if 0 < length < 256 else b""
                self.names[block] = raw.decode("latin-1") if raw and raw.isascii() and raw.decode().isprintable() else None
            except HandleError:
                self.names[block] = None
        return self.names[block]

    def root_name(self, kcb: int, parent: int, name: int) -> str | None:
        """Follow `parent` to the root; its name, or None when any step breaks the invariants."""
        for _ in range(MAX_KEY_DEPTH):
            try:
                words = self.words(kcb)
            except HandleError:
                return None
            label = self.name_of(words[name // 8]) if words[name // 8] >> 47 == 0x1FFFF else None
            if label is None:
                return None
            if not words[parent // 8]:
                return label
            kcb = words[parent // 8]
            if kcb >> 47 != 0x1FFFF:
                return None
        return None


def _live_way(kernel: Kernel) -> tuple[tuple[Way, Way] | None, str]:
    """The one pair under which every sampled key's chain of control blocks is named all the way
    up to a root named REGISTRY (a check either way), or None and why not."""
    kcb_field = kernel.layout.offset("_CM_KEY_BODY", "KeyControlBlock")
    try:
        kcbs = [kernel.space.u64(body + kcb_field) for body in _key_bodies(kernel)]
    except HandleError:
        kcbs = []
    cache, found = _Kcbs(kernel), []
    for parent in range(0, KCB_SCAN, 8):
        for name in range(0, KCB_SCAN, 8):
            if parent != name and kcbs and all((cache.root_name(k, parent, name) or "").upper() == "REGISTRY"
                                               for k in kcbs):
                found.append((parent, name))
    kernel.checks.append(Check("key control blocks: one ParentKcb/NameBlock pair chains every key to REGISTRY",
                               len(found) == 1, f"{len(kcbs)} keys, {len(found)} pairs"))
    if len(found) != 1:
        return None, f"live: {len(kcbs)} keys, no single pair chains them to \\REGISTRY"
    how = f"live: the only offsets under which {len(kcbs)} keys' control blocks chain up to \\REGISTRY"
    return ((found[0][0], how), (found[0][1], how)), ""


def infer_kcb(kernel: Kernel, layout: InferredLayout) -> None:
    """ParentKcb and NameBlock by the code and by live data; one way alone is used and said so,
    and with neither, the shipped layout's pair (said so in handle info: key names may be wrong)."""
    code, no_code = _code_way(kernel)
    live, no_live = _live_way(kernel)
    if code is None and live is None:
        base = layout.base
        how = (f"NOT inferred ({no_code}; {no_live}): taken from shipped profile {base.version}; "
               "key names may be wrong")
        code = ((base.offset("_CM_KEY_CONTROL_BLOCK", "ParentKcb"), how),
                (base.offset("_CM_KEY_CONTROL_BLOCK", "NameBlock"), how))
    elif live is None:                  # the code's pair, with why live data gave none
        code = tuple((offset, f"{how}; {no_live}: the code's offset used") for offset, how in code)
    elif code is None:
        live = tuple((offset, f"{how} ({no_code})") for offset, how in live)
    for index, (struct, path) in enumerate((("_CM_KEY_CONTROL_BLOCK", "ParentKcb"),
                                            ("_CM_KEY_CONTROL_BLOCK", "NameBlock"))):
        offset, how = agree(kernel, f"{struct}.{path}", code and code[index], live and live[index])
        layout.put(struct, path, offset, 8, how)
