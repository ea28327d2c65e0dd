"""The `leak` scenario's moving part: the guest kernel opens and closes handles as it runs.

One process (leaky.exe) gains a handle every round and never closes it; in the same round
another process opens a handle and the process of the round before closes its one, so the
others stay in balance. The kernel image's leak routine (KiGuestLeak) applies the planned
operations to the live table entries one by one, counting them (operations-done counter)
and the leaked handles (leaked counter); a breakpoint on KiGuestLeakStep sees whole
operations. As in Windows, an open takes the head of the table's free list and a close puts
the entry back at the head (the entry's own link already points at the old head).
truth["leak"]["operations"][i] is what operation i does; the guest starts at 0 done.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .handles import Entry
from .physmem import PAGE

ROUNDS = 300
LEAKY = ("leaky.exe", 5124)
BALANCED = ("services.exe", "lsass.exe", "svchost.exe")     # pids 652, 672 and 788 open and close
PARAMS = struct.Struct("<QQQQQ")
OPERATION = struct.Struct("<QQQQQQ")
DELAY = 400_000             # pause loops after each operation


@dataclass
class Operation:
    proc: object
    index: int
    obj: object | None      # None: close the handle in that slot
    access: int = 0
    attributes: int = 0
    leaked: int = 0


def plan(pop, procs: list) -> list[Operation]:
    """leaky.exe and the operations; every object is created now, before tables are laid out."""
    rng, cat = pop.rng, pop.w.cat
    parent = next(p for p in procs if p.name == "explorer.exe")
    leaky = pop.processes([(LEAKY[0], LEAKY[1], parent.pid)])[0]
    pop.mix(leaky, 40)
    leaky.table.reserve_pages = 1 + -(-(len(leaky.table.slots) + ROUNDS) // 255)
    procs.append(leaky)
    leak_slots = leaky.table.free_chain()[:ROUNDS]
    others = [p for p in procs if p.name in BALANCED and p.pid in (652, 672, 788)]
    shared = [cat.generic("Event"), cat.generic("Semaphore"), cat.file("\\Windows\\Temp\\balance.log")]
    operations, previous = [], None
    for round_, slot in enumerate(leak_slots):
        obj = cat.file(f"\\Users\\Public\\leak{round_:04d}.tmp") if round_ % 3 == 0 else cat.generic("Event")
        operations.append(Operation(leaky, slot, obj, pop.access(obj.type), 0, leaked=1))
        holder = others[round_ % len(others)]
        opened = Operation(holder, holder.table.free_chain()[0], rng.choice(shared), 0x1F0003)
        operations.append(opened)
        if previous is not None:
            operations.append(Operation(previous.proc, previous.index, None))
        previous = opened
    return operations


def _record(op: Operation) -> dict:
    p = op.proc
    return {"pid": p.pid, "process": p.name, "handle": op.index * 4, "object": op.obj.body, "type": op.obj.type,
            "name": op.obj.name, "granted_access": op.access, "attributes": op.attributes}


class FreeHead:
    """A table's free-list head as the builder wrote it (_HANDLE_TABLE.FirstFreeHandle, a value,
    where the layout has HandleCount; else FreeLists[0].FirstFreeHandleEntry, an entry VA), and
    the qword to store there for a new head."""

    def __init__(self, kmem, table):
        L, self.table = table.layout, table
        self.by_value = L.has("_HANDLE_TABLE", "HandleCount")
        self.va = table.va + (L.off("_HANDLE_TABLE", "FirstFreeHandle") if self.by_value else
                              L.off("_HANDLE_TABLE", "FreeLists") +
                              L.off("_HANDLE_TABLE_FREE_LIST", "FirstFreeHandleEntry"))
        self.upper = struct.unpack("<Q", kmem.read(self.va, 8))[0] & ~0xFFFFFFFF   # beside a ULONG head
        self.chain = table.free_chain()

    def qword(self, index: int | None) -> int:
        if self.by_value:
            return self.upper | (index * 4 if index else 0)
        return self.table.entry_va(index) if index else 0


def _encode(op: Operation, kmem, original: dict, heads: dict) -> tuple[bytes, dict]:
    """One operation's 48 bytes and its truth record; an open pops the free-list head (the
    slot it takes), a close pushes its slot back."""
    table = op.proc.table
    head = heads.setdefault(op.proc.pid, FreeHead(kmem, table))
    va = table.entry_va(op.index)
    original.setdefault(va, kmem.read(va, 16))
    if op.obj is None:
        low, high = struct.unpack("<QQ", original[va])
        head.chain.insert(0, op.index)
        record = {"op": "close", "pid": op.proc.pid, "handle": op.index * 4}
    else:
        assert head.chain[0] == op.index, "opens take the free-list head"
        entry = bytearray(16)
        table.put_entry(entry, 0, Entry(op.obj, op.access, op.attributes, op.obj.header))
        low, high = struct.unpack("<QQ", entry)
        head.chain.pop(0)
        record = {"op": "open", "record": _record(op)}
    new_head = head.qword(head.chain[0] if head.chain else None)
    return OPERATION.pack(va, low, high, op.leaked, head.va, new_head), record


def lay_out(builder, operations: list[Operation]) -> dict:
    """The operation list, counters and parameter block in guest memory; returns truth["leak"]."""
    kmem, pool = builder.kmem, builder.pools["nonpaged"]
    raw, records, original, heads = bytearray(), [], {}, {}
    for op in operations:
        packed, record = _encode(op, kmem, original, heads)
        raw += packed
        records.append(record)
    ops_va = pool.pages(-(-len(raw) // PAGE))
    kmem.write(ops_va, bytes(raw))
    counters = pool.alloc(16, b"Leak")
    params = PARAMS.pack(ops_va, len(operations), counters, counters + 8, DELAY)
    name = builder.image_names["leak_params"]
    builder.image.put(name, params)
    kmem.write(builder.image.va(name), params)
    changed = set(original) | {head.va for head in heads.values()} | {counters}
    builder.runtime_pages += sorted({kmem.pa(va) & ~0xFFF for va in changed})
    leaky = operations[0].proc
    return {"pid": leaky.pid, "process": leaky.name, "done": counters, "leaked": counters + 8,
            "step": builder.image.va(builder.image_names["leak_step"]), "operations": records,
            "decode": "the u64 at `done` counts operations applied (operations[:done]); the u64 at `leaked` "
                      "counts leaky handles opened; a stop at `step` sees whole operations; an open takes "
                      "the head of its table's free list, a close puts the slot back at the head"}


def moving(operations: list[Operation]) -> set[int]:
    """Pids of the processes whose tables the routine writes (their pages must stay present)."""
    return {op.proc.pid for op in operations}
