"""Damaged guests (`build.py --corrupt KIND`): one kind of damage a real or hostile kernel shows,
applied to the built memory, and what truth.json must then say (which records stay intact, which
are marked, which cannot be listed, and which objects the one warning line must name).

Victims are chosen by a generator of their own, so the rest of the guest is byte for byte the
guest without damage. Several kinds on one guest pick different victims.
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from .handles import LOW, MID
from .objects import CREATOR, NAME
from .paging import MM_READWRITE
from .physmem import PAGE

SPECIAL_NAMES = ("File", "Key", "Process", "Thread", "Directory", "Device", "Type", "SymbolicLink")
BAD_TYPE_INDEX = 0xF0          # far beyond the NULL that ends ObTypeIndexTable
HUGE_BOUND = 0x3FFFFFC          # NextHandleNeedingPool of the amplified table (2^24 handles)


@dataclass
class Damage:
    """One damage done; `words` are what the one warning line about it must contain."""
    kind: str
    pid: int | None
    what: str
    words: list[str]
    lines: int = 1                                   # warning lines it must produce
    lost: list[int] = field(default_factory=list)    # handle values of pid no walk can list
    marked: dict = field(default_factory=dict)       # (pid, handle) -> fields as they must read
    lookup: dict | None = None                       # {"pid", "handle", "words"}: one-line error
    process: dict = field(default_factory=dict)      # process fields as memory now holds them

    def to_json(self) -> dict:
        return {"kind": self.kind, "pid": self.pid, "what": self.what, "words": self.words,
                "lines": self.lines, "lost": self.lost,
                "marked": [[pid, handle] for pid, handle in sorted(self.marked)], "lookup": self.lookup}


class Corruptor:
    """Applies damage kinds to a finished GuestBuilder (its memory, tables and objects)."""

    def __init__(self, builder, seed: int):
        self.b = builder
        self.L, self.kmem, self.space = builder.L, builder.kmem, builder.space
        self.rng = random.Random(f"corrupt|{seed}")
        self.taken: set[int] = set()           # pids and object bodies already damaged

    # --- choosing victims ---------------------------------------------------------------------

    def victim(self, what: str, test) -> object:
        """A user process (not yet damaged) whose table passes `test`."""
        chosen = [p for p in self.b.procs[1:] if p.table is not None and p.table.slots
                  and p.pid not in self.taken and test(p.table)]
        if not chosen:
            raise SystemExit(f"--corrupt: no process with {what} in this scenario (try --scenario level2)")
        p = chosen[len(chosen) // 2]
        self.taken.add(p.pid)
        return p

    def handles_of(self, obj) -> list[tuple[int, int]]:
        """(pid, handle) of every handle to obj."""
        return [(p.pid, v) for p in self.b.procs if p.table is not None
                for v, e in p.table.used if e.obj is obj]

    def some_object(self, test):
        """An undamaged object with handles that passes test (in creation order)."""
        for obj in self.b.om.objects.values():
            if obj.body not in self.taken and obj.handles and test(obj) and self.handles_of(obj):
                self.taken.add(obj.body)
                return obj
        raise SystemExit("--corrupt: no object fits this kind of damage in this guest")

    def unmapped(self) -> int:
        """A kernel address no page table maps (in the paged pool's region, far above its use)."""
        va = self.b.pools["paged"].next_page + 0x4000_0000 + self.rng.randrange(1, 0x100) * PAGE
        assert self.space.translate(va) is None
        return va

    def page_out(self, va: int) -> None:
        """The page's PTE becomes a page-file PTE (not valid, not transition)."""
        self.space.set_pte(va, (self.rng.randrange(1, 1 << 20) << 32) | (1 << 12) | (MM_READWRITE << 5))

    def fresh_pages(self, n: int) -> int:
        """n new paged-pool pages, past the page-file PTEs the guest already has."""
        pool = self.b.pools["paged"]
        va = pool.next_page + 8 * PAGE
        self.kmem.back(va, n)
        pool.next_page = va + n * PAGE
        return va

    # --- small writers ------------------------------------------------------------------------

    def put(self, va: int, struct_name: str, field_name: str, value: int) -> None:
        f = self.L.field(struct_name, field_name)
        at = va + f["offset"] - f["offset"] % 8
        span = ((f["offset"] % 8) + f["size"] + 7) // 8 * 8
        raw = bytearray(self.kmem.read(at, span))
        self.L.put(raw, -(f["offset"] - f["offset"] % 8), struct_name, field_name, value)
        self.kmem.write(at, bytes(raw))

    def q(self, va: int) -> int:
        return int.from_bytes(self.kmem.read(va, 8), "little")

    def name_info(self, obj) -> int:
        sizes = self.b.om.sizes
        return obj.header - (sizes[CREATOR] if obj.info_mask & CREATOR else 0) - sizes[NAME]

    def apply(self, kind: str) -> Damage:
        return KINDS[kind](self)


# --- the handle table -------------------------------------------------------------------------

def level3(c: Corruptor) -> Damage:
    p = c.victim("a handle table", lambda t: True)
    t = p.table
    c.put(t.va, "_HANDLE_TABLE", "TableCode", t.table_code | 3)
    return Damage("level3", p.pid, f"TableCode of {t.va:#x} has level bits 3", [f"{t.va:#x}"],
                  lost=[v for v, _ in t.used], lookup=lookup(p, t.used[0][0], t.va),
                  process={"table_code": t.table_code | 3, "level": None})


def bound_past_table(c: Corruptor) -> Damage:
    p = c.victim("a one-page table", lambda t: t.level == 0)
    t = p.table
    bound = 0x10000
    c.put(t.va, "_HANDLE_TABLE", "NextHandleNeedingPool", bound)
    return Damage("bound-past-table", p.pid, f"NextHandleNeedingPool of {t.va:#x} is {bound:#x}, past "
                  "its one page", [f"{t.va:#x}", f"{bound:#x}"], lookup=lookup(p, LOW * 4, t.va),
                  process={"next_handle_needing_pool": bound})


def amplify(c: Corruptor) -> Damage:
    """A level-2 table claiming 2^24 handles: every top slot names one mid page, every mid slot
    one low page (the victim's real page), so a naive walk yields 16 million records."""
    p = c.victim("a one-page table", lambda t: t.level == 0)
    t = p.table
    top = c.fresh_pages(2)
    mid, low = top + PAGE, t.pages[0]
    c.kmem.write(top, struct.pack(f"<{MID}Q", *[mid] * MID))
    c.kmem.write(mid, struct.pack(f"<{MID}Q", *[low] * MID))
    c.put(t.va, "_HANDLE_TABLE", "TableCode", top | 2)
    c.put(t.va, "_HANDLE_TABLE", "NextHandleNeedingPool", HUGE_BOUND)
    return Damage("amplify", p.pid, f"table {t.va:#x}: level 2, every top slot -> mid page {mid:#x}, every "
                  f"mid slot -> low page {low:#x}", [f"{mid:#x}", f"{low:#x}"], lines=2,
                  lookup=lookup(p, LOW * 4, low),
                  process={"table_code": top | 2, "level": 2, "next_handle_needing_pool": HUGE_BOUND})


def pointer_damage(level: str, how: str):
    """A kind that spoils slot 1 of the victim's top page: it points at a low page (level 1
    tables) or a mid page (level 2); NULL, unmapped, paged out or the same page as slot 0."""
    def apply(c: Corruptor) -> Damage:
        levels = 1 if level == "low" else 2
        p = c.victim(f"a level-{levels} table of 2+ {level} pages",
                     lambda t: t.level == levels and (t.npages > 1 if levels == 1 else t.npages > MID))
        t = p.table
        top = t.table_code & ~3
        first, second = c.q(top), c.q(top + 8)
        span = LOW * 4 * (MID if levels == 2 else 1)          # handle values one slot covers
        value, words = {"null": (0, [f"{top:#x}"]), "unmapped": (c.unmapped(), None),
                        "paged": (second, [f"{second:#x}"]), "alias": (first, [f"{first:#x}"])}[how]
        words = words or [f"{value:#x}"]
        if how == "paged":
            c.page_out(second)
        else:
            c.kmem.write(top + 8, struct.pack("<Q", value))
        lost = [v for v, _ in t.used if span <= v < 2 * span]
        return Damage(f"{level}-{how}", p.pid, f"table {t.va:#x}: slot 1 of top page {top:#x} "
                      f"({level}-level page {second:#x}) {how}", words, lost=lost,
                      lookup=lookup(p, lost[0], *words))
    return apply


def zero_table_page(c: Corruptor) -> Damage:
    p = c.victim("a table of 2+ pages", lambda t: t.level == 1 and t.npages > 1)
    t = p.table
    page = t.pages[1]
    c.kmem.write(page, bytes(PAGE))
    lost = [v for v, _ in t.used if LOW * 4 <= v < 2 * LOW * 4]
    return Damage("zero-table-page", p.pid, f"table {t.va:#x}: low-level page {page:#x} zeroed",
                  [f"{page:#x}"], lost=lost, lookup=lookup(p, lost[0], f"{page:#x}"))


def zero_handle_table(c: Corruptor) -> Damage:
    p = c.victim("a handle table", lambda t: True)
    t = p.table
    c.kmem.write(t.va, bytes(c.L.size("_HANDLE_TABLE")))
    return Damage("zero-handle-table", p.pid, f"_HANDLE_TABLE {t.va:#x} zeroed", [f"{t.va:#x}"],
                  lost=[v for v, _ in t.used], lookup=lookup(p, t.used[0][0], f"{t.va:#x}"),
                  process={"table_code": 0, "level": None, "next_handle_needing_pool": 0})


def object_unmapped(c: Corruptor) -> Damage:
    p = c.victim("a handle table", lambda t: True)
    t = p.table
    value, e = t.used[len(t.used) // 2]
    bad = c.unmapped() + 0x40
    at = t.entry_va(value // 4)
    if c.L.is_win7:
        c.put(at, "_HANDLE_TABLE_ENTRY", "Object", bad | 1)
    else:
        _, _, bits = c.L.bits("_HANDLE_TABLE_ENTRY", "ObjectPointerBits")
        c.put(at, "_HANDLE_TABLE_ENTRY", "ObjectPointerBits", (bad >> 4) & ((1 << bits) - 1))
    return Damage("object-unmapped", p.pid, f"handle {value:#x}: object header {bad:#x} unmapped",
                  [f"{bad:#x}", f"{value:#x}"], lost=[value], lookup=lookup(p, value, f"{bad:#x}"))


# --- objects ----------------------------------------------------------------------------------

def marked(c: Corruptor, obj, **fields) -> dict:
    return {key: fields for key in c.handles_of(obj)}


def type_index(c: Corruptor) -> Damage:
    obj = c.some_object(lambda o: o.type not in SPECIAL_NAMES and o.name is None)
    om = c.b.om
    stored = BAD_TYPE_INDEX if om.cookie is None else BAD_TYPE_INDEX ^ om.cookie ^ ((obj.header >> 8) & 0xFF)
    c.put(obj.header, "_OBJECT_HEADER", "TypeIndex", stored)
    pid, handle = c.handles_of(obj)[0]
    return Damage("type-index", None, f"object {obj.body:#x}: TypeIndex decodes to {BAD_TYPE_INDEX:#x}",
                  [f"{obj.body:#x}"], marked=marked(c, obj, type=None),
                  lookup={"pid": pid, "handle": handle, "words": [f"{obj.body:#x}"], "record": True})


def name_string(how: str):
    """A named object's UNICODE_STRING spoiled: Length > MaximumLength, an odd Length, or a
    Buffer no page maps (a File's FileName)."""
    def apply(c: Corruptor) -> Damage:
        if how == "buffer":
            obj = c.some_object(lambda o: o.type == "File")
            at = obj.body + c.L.off("_FILE_OBJECT", "FileName")
            c.kmem.write(at + 8, struct.pack("<Q", c.unmapped()))
        else:
            obj = c.some_object(lambda o: o.type not in SPECIAL_NAMES and o.info_mask & NAME and o.name)
            at = c.name_info(obj) + c.L.off("_OBJECT_HEADER_NAME_INFO", "Name")
            length, maximum = struct.unpack("<HH", c.kmem.read(at, 4))
            c.kmem.write(at, struct.pack("<HH", *((0x7FE, maximum) if how == "length" else (length + 1, maximum))))
        pid, handle = c.handles_of(obj)[0]
        return Damage(f"name-{how}", None, f"object {obj.body:#x}: UNICODE_STRING at {at:#x} bad {how}",
                      [f"{obj.body:#x}"], marked=marked(c, obj, name=None),
                      lookup={"pid": pid, "handle": handle, "words": [f"{obj.body:#x}"], "record": True})
    return apply


def optional_header(c: Corruptor) -> Damage:
    """One handle of an unnamed Event is moved to a copy of the event at the start of a page
    after never-mapped pages, whose InfoMask claims creator and name info: they would lie
    before its page, in memory no page table maps."""
    obj = c.some_object(lambda o: o.type == "Event" and o.name is None)
    pid, handle = c.handles_of(obj)[0]
    table = next(p for p in c.b.procs if p.pid == pid).table
    header = c.fresh_pages(1) + 0x10
    body = header + (obj.body - obj.header)
    c.kmem.write(header, c.kmem.read(obj.header, 0x18))
    c.kmem.write(header + 0x18, bytes([c.b.om.stored_type_index("Event", header) & 0xFF, 0, CREATOR | NAME, 0]))
    c.kmem.write(body, c.kmem.read(obj.body, 0x18))
    at = table.entry_va(handle // 4)
    if c.L.is_win7:
        c.put(at, "_HANDLE_TABLE_ENTRY", "Object", header | (c.q(at) & 0xF))
    else:
        _, _, bits = c.L.bits("_HANDLE_TABLE_ENTRY", "ObjectPointerBits")
        c.put(at, "_HANDLE_TABLE_ENTRY", "ObjectPointerBits", (header >> 4) & ((1 << bits) - 1))
    return Damage("optional-header", pid, f"handle {handle:#x} -> event {body:#x} whose InfoMask puts its name "
                  "info off its page, in unmapped memory", [f"{body:#x}"],
                  marked={(pid, handle): {"object": body, "name": None}},
                  lookup={"pid": pid, "handle": handle, "words": [f"{body:#x}"], "record": True})


def kcb_loop(c: Corruptor) -> Damage:
    """A key control block becomes its own parent: every key at or below it loops."""
    cat = c.b.cat
    obj = c.some_object(lambda o: o.type == "Key")
    path = obj.name
    kcb = cat.kcbs[path[1:]]
    c.put(kcb, "_CM_KEY_CONTROL_BLOCK", "ParentKcb", kcb)
    hit = {}
    for key in c.b.om.objects.values():
        if key.type == "Key" and (key.name == path or key.name.startswith(path + "\\")):
            hit.update(marked(c, key, name=None))
    return Damage("kcb-loop", None, f"key control block {kcb:#x} ({path}) is its own parent",
                  [f"{kcb:#x}"], marked=hit, lookup=None)


def directory_loop(c: Corruptor) -> Damage:
    """\\Device names itself as its parent directory: no File's device path ends."""
    device = c.b.cat.dirs["\\Device"]
    c.kmem.write(c.name_info(device) + c.L.off("_OBJECT_HEADER_NAME_INFO", "Directory"),
                 struct.pack("<Q", device.body))
    hit = {}
    for obj in c.b.om.objects.values():
        if obj.type == "File":
            hit.update(marked(c, obj, name=None))
    return Damage("directory-loop", None, f"directory {device.body:#x} (\\Device) is its own parent",
                  [f"{device.body:#x}"], marked=hit, lookup=None)


# --- the process list -------------------------------------------------------------------------

def process_link(how: str):
    """The Flink of a process in the middle of the list goes back to the first user process
    (a loop) or to an address no page maps (dangling)."""
    def apply(c: Corruptor) -> Damage:
        procs = c.b.procs
        p = procs[len(procs) // 2]
        off = c.L.off("_EPROCESS", "ActiveProcessLinks")
        target = procs[1].eprocess + off if how == "loop" else c.unmapped()
        c.kmem.write(p.eprocess + off, struct.pack("<Q", target))
        return Damage(f"process-{how}", p.pid, f"ActiveProcessLinks.Flink of {p.label} -> {target:#x}",
                      ["process list", f"{p.eprocess:#x}"], lookup=None)
    return apply


def lookup(p, handle: int, *words) -> dict:
    return {"pid": p.pid, "handle": handle, "words": [w if isinstance(w, str) else f"{w:#x}" for w in words]}


KINDS = {
    "level3": level3, "bound-past-table": bound_past_table, "amplify": amplify,
    **{f"{level}-{how}": pointer_damage(level, how) for level in ("low", "mid")
       for how in ("null", "unmapped", "paged", "alias")},
    "object-unmapped": object_unmapped, "type-index": type_index,
    "process-loop": process_link("loop"), "process-dangling": process_link("dangling"),
    "name-length": name_string("length"), "name-odd": name_string("odd"), "name-buffer": name_string("buffer"),
    "optional-header": optional_header, "kcb-loop": kcb_loop, "directory-loop": directory_loop,
    "zero-table-page": zero_table_page, "zero-handle-table": zero_handle_table,
}


def edit_truth(truth: dict, damages: list[Damage]) -> None:
    """truth["handles"] becomes what a walk of the damaged guest must list; "damage" says why."""
    lost = {(d.pid, v) for d in damages for v in d.lost}
    changes = {key: fields for d in damages for key, fields in d.marked.items()}
    handles = []
    for record in truth["handles"]:
        key = (record["pid"], record["handle"])
        if key not in lost:
            handles.append({**record, **changes.get(key, {})})
    truth["handles"] = handles
    for d in damages:                    # a record no walk can list is not marked either
        d.marked = {k: v for k, v in d.marked.items() if k not in lost}
    truth["damage"] = [d.to_json() for d in damages]
    hurt = {d.pid for d in damages if d.lost}
    truth["invalid"] = [i for i in truth["invalid"] if i["pid"] not in hurt]
    for d in damages:
        for p in truth["processes"]:
            if p["pid"] == d.pid:
                p.update(d.process)
