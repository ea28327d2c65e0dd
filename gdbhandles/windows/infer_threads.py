"""Inferred thread offsets: _ETHREAD.Cid, _KTHREAD.ApcState.Process and
_KPCR.Prcb.CurrentThread (the key control block's pair: infer_keys).

Code: PsGetThreadProcessId/PsGetThreadId read Cid, PsGetCurrentProcess reads
[gs:CurrentThread]+ApcState.Process. Live data: PspCidTable holds every thread body under its
own id, so a thread's Cid is where its own id sits after its process's pid.
"""

from __future__ import annotations

from gdbhandles.errors import HandleError
from gdbhandles.windows import disasm
from gdbhandles.windows.handle_table import HandleTable
from gdbhandles.windows.infer import InferredLayout, accessor, agree, exported_code, qwords
from gdbhandles.windows.kernel import Check, Kernel

THREAD_OBJECT, PROCESS_OBJECT = 6, 3       # _DISPATCHER_HEADER.Type
THREAD_SCAN = 0x800
SAMPLE = 16                                # threads checked


def infer_thread_code(kernel: Kernel, layout: InferredLayout) -> None:
    """What the accessors say; the CID table checks it later (check_threads)."""
    cid = accessor(kernel, "PsGetThreadProcessId")
    tid = accessor(kernel, "PsGetThreadId")
    if cid is None and tid is not None:
        cid = (tid[0] - 8, tid[1] + " (UniqueThread, Cid + 8)")
    if cid is not None:
        layout.put("_ETHREAD", "Cid", cid[0], 16, cid[1])
    owner = accessor(kernel, "PsGetThreadProcess")
    if owner is not None:
        layout.put("_KTHREAD", "Process", owner[0], 8, owner[1])
    for function, found in exported_code(kernel, "PsGetCurrentProcess", "IoGetCurrentProcess"):
        reads = disasm.loads_through(found[:1], "gs")
        if reads:
            base, disp, at = reads[0]
            layout.put("_KTHREAD", "ApcState.Process", disp, 8, f"code: {function} at {at:#x}")
            layout.put("_KPCR", "Prcb.CurrentThread", base[1], 8, f"code: {function} at {at:#x} (gs:{base[1]:#x})")
            break


def _cid_bodies(kernel: Kernel) -> tuple[dict[int, int], dict[int, int]]:
    """(pid -> EPROCESS, tid -> ETHREAD) from PspCidTable, a sample of threads."""
    table = HandleTable(kernel.space, kernel.layout, kernel.space.u64(kernel.globals["PspCidTable"]))
    processes, threads = {}, {}
    for entry in table.entries():
        body = getattr(entry, "header", None)
        if not body:
            continue
        try:
            kind = kernel.space.u8(body)
        except HandleError:
            continue
        if kind == PROCESS_OBJECT:
            processes[entry.handle] = body
        elif kind == THREAD_OBJECT and len(threads) < SAMPLE:
            threads[entry.handle] = body
    return processes, threads


def _live_cid(kernel: Kernel, processes: dict, threads: dict) -> tuple[int, str] | None:
    candidates = None
    for tid, body in threads.items():
        words = qwords(kernel, body, THREAD_SCAN)
        here = {8 * i for i in range(len(words) - 1) if words[i + 1] == tid and words[i] in processes}
        candidates = here if candidates is None else candidates & here
    if candidates:
        return min(candidates), f"live: {len(threads)} threads of PspCidTable hold their pid and own tid there"
    return None


def _live_apc_process(kernel: Kernel, processes: dict, threads: dict, cid: int) -> set[int]:
    """Offsets where every sampled thread holds its own process's EPROCESS."""
    candidates = None
    for body in threads.values():
        words = qwords(kernel, body, THREAD_SCAN)
        owner = processes.get(words[cid // 8])
        here = {8 * i for i, w in enumerate(words) if owner and w == owner}
        candidates = here if candidates is None else candidates & here
    return candidates or set()


def check_threads(kernel: Kernel, layout: InferredLayout) -> None:
    """Cid and ApcState.Process against the threads PspCidTable holds (after globals are known)."""
    if kernel.globals.get("PspCidTable") is None:
        kernel.checks.append(Check("thread offsets against PspCidTable", False, "PspCidTable not located"))
        processes, threads = {}, {}
    else:
        processes, threads = _cid_bodies(kernel)
    code = layout.fields.get(("_ETHREAD", "Cid"))
    code = (code.offset, layout.how["_ETHREAD.Cid"]) if code else None
    live = _live_cid(kernel, processes, threads)
    if code is None and live is None:            # said in handle info: thread ids may be wrong
        base = layout.base
        live = (base.offset("_ETHREAD", "Cid"), f"NOT inferred (no accessor, no live threads): taken from "
                                                 f"shipped profile {base.version}; thread ids may be wrong")
        kernel.checks.append(Check("_ETHREAD.Cid inferred", False, live[1]))
    cid, how = agree(kernel, "_ETHREAD.Cid", code, live)
    layout.put("_ETHREAD", "Cid", cid, 16, how)
    owners = sorted(_live_apc_process(kernel, processes, threads, cid))
    # ApcState.Process (attached-to) comes before KTHREAD.Process (owner); unattached, both hold the owner
    for rank, name in enumerate(("ApcState.Process", "Process")):
        known = layout.fields.get(("_KTHREAD", name))
        if known is None and len(owners) > rank:
            layout.put("_KTHREAD", name, owners[rank], 8,
                       f"live: slot {rank + 1} where every sampled thread holds its own EPROCESS")
        elif known is not None:
            kernel.checks.append(Check(f"_KTHREAD.{name} holds each thread's own EPROCESS",
                                       known.offset in owners, f"{len(threads)} threads of PspCidTable"))
