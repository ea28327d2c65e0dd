"""The `churn` scenario's moving part: one process's table page flips between two states.

The kernel image's churn routine copies state B, then A, then B ... into the live low-level
page, one entry at a time, bumping a seqlock counter before and after each copy (odd while
copying). Generation g = counter // 2; state A when g is even, B when odd. Parameter block
(the image's churn parameter global), as the routine reads it:
  +0x00 dst page VA   +0x08 state A VA   +0x10 state B VA   +0x18 entries per copy
  +0x20 counter VA    +0x28 VA of a ULONG to set after each copy (0: none)
  +0x30 value for A (ULONG)  +0x34 value for B (ULONG)   +0x38 delay loop count
"""
from __future__ import annotations

import copy
import struct

from .handles import Entry, HandleTable
from .physmem import PAGE
from .truth import handle_records

PARAMS = struct.Struct("<QQQQQQIIQ")
DELAY = 2000


def state_b(pop, proc, changes: int = 12) -> HandleTable:
    """A second version of proc's table: some handles closed, others opened in their place."""
    rng = pop.rng
    a = proc.table
    b = copy.copy(a)
    b.slots = dict(a.slots)
    b.freed = list(a.freed)
    for value in rng.sample([v for v, _ in a.used], changes):
        del b.slots[value // 4]
        b.freed.append(value)
    free = [i for i in range(1, 256) if i not in b.slots]
    for index in sorted(rng.sample(free, changes)):
        kind = rng.choice(["Event", "Semaphore", "File", "Key"])
        if kind == "File":
            obj = pop.w.cat.file(rng.choice(["\\Windows\\System32\\drivers\\etc\\hosts",
                                             "\\Windows\\Temp\\churn.tmp", "\\Users\\Public\\desktop.ini"]))
        elif kind == "Key":
            obj = pop.w.cat.key("\\REGISTRY\\MACHINE\\SOFTWARE\\MICROSOFT\\CRYPTOGRAPHY\\RNG", proc.pid)
        else:
            obj = pop.w.cat.generic(kind)
        b.slots[index] = Entry(obj, pop.access(kind), 0, obj.header)
        b.freed = [v for v in b.freed if v != index * 4]
    return b


def lay_out(builder, proc, b: HandleTable) -> dict:
    """Source pages for both states, the counter, the parameter block; returns truth["churn"]."""
    a = proc.table
    assert a.level == 0
    kmem, L = builder.kmem, builder.L
    b.pages = a.pages
    b.va = a.va
    page_a = kmem.read(a.pages[0], PAGE)
    page_b = b.render(b.free_chain())[0]
    src = builder.pools["nonpaged"].pages(2)
    kmem.write(src, page_a)
    kmem.write(src + PAGE, page_b)
    counter = builder.pools["nonpaged"].alloc(8, b"Gen ")
    if L.has("_HANDLE_TABLE", "HandleCount"):
        count_va = a.va + L.off("_HANDLE_TABLE", "HandleCount")
    else:
        count_va = a.va + L.off("_HANDLE_TABLE", "FreeLists") + L.off("_HANDLE_TABLE_FREE_LIST", "HandleCount")
    params = PARAMS.pack(a.pages[0], src, src + PAGE, 256, counter, count_va, len(a.slots), len(b.slots), DELAY)
    name = builder.image_names["churn_params"]
    builder.image.put(name, params)
    kmem.write(builder.image.va(name), params)
    builder.runtime_pages += [kmem.pa(a.pages[0]), kmem.pa(counter) & ~0xFFF, kmem.pa(count_va) & ~0xFFF]
    return {"pid": proc.pid, "process": proc.name, "table_page": a.pages[0], "state_a": src,
            "state_b": src + PAGE, "counter": counter, "params": builder.image.va(name),
            "handle_count": count_va,
            "decode": "generation = counter // 2; counter odd: a copy is in progress (torn); "
                      "state A when generation is even, B when odd",
            "states": {"A": handle_records(proc), "B": handle_records(proc, b)}}
