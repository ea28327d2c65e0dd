"""truth.json: what a correct tool must report for this guest (for tests only)."""
from __future__ import annotations

GLOBALS = ["PsActiveProcessHead", "PspCidTable", "ObpKernelHandleTable", "ObTypeIndexTable",
           "ObHeaderCookie", "ObpInfoMaskToOffset", "PsInitialSystemProcess", "NtBuildNumber",
           "KiKvaShadow", "ObpRootDirectoryObject", "ObpTypeObjectType", "PsLoadedModuleList"]


def process_record(p) -> dict:
    t = p.table
    return {"pid": p.pid, "name": p.name, "image_file_name": p.image_file_name, "image_path": p.image_path,
            "eprocess": p.eprocess, "dtb": p.dtb, "user_dtb": p.user_dtb,
            "handle_table": t.va if t else 0, "table_code": t.table_code if t else 0,
            "level": t.level if t else None,
            "next_handle_needing_pool": t.next_handle_needing_pool if t else 0,
            "free_list": [i * 4 for i in t.free_chain()] if t else [],
            "threads": [{"tid": th.tid, "ethread": th.ethread} for th in p.threads]}


def handle_records(p, table=None) -> list[dict]:
    """Records of p's handles (of `table` if given: another state of p's table)."""
    return [{"pid": p.pid, "process": p.name, "handle": value, "object": e.obj.body, "type": e.obj.type,
             "name": e.obj.name, "granted_access": e.access, "attributes": e.attributes}
            for value, e in (table or p.table).used]


def invalid_records(p, rng) -> list[dict]:
    """Values a lookup must refuse, one or more per reason."""
    t = p.table
    out = [{"pid": p.pid, "handle": 0, "reason": "first_slot"}]
    if t.npages > 1:
        out.append({"pid": p.pid, "handle": 256 * 4, "reason": "first_slot"})
    still_free = sorted(v for v in t.freed if v // 4 not in t.slots)
    out += [{"pid": p.pid, "handle": v, "reason": "free"} for v in still_free[:3]]
    top = max(t.slots) if t.slots else 0
    never = [i * 4 for i in range(top + 1, t.npages * 256) if i % 256][:2]
    out += [{"pid": p.pid, "handle": v, "reason": "never_allocated"} for v in never]
    out += [{"pid": p.pid, "handle": t.next_handle_needing_pool + k, "reason": "past_end"} for k in (0, 0x400)]
    return out


def make_truth(file_key, profile, scenario, seed, guid_mode, guid, age, image, dtb, procs, world, om,
               vcpus, system, cid, L, extra=None) -> dict:
    with_tables = [p for p in procs if p.table is not None]
    truth = {
        "format": 1,
        "profile": {"build": profile["build"], "version": profile["version"], "guid": guid, "age": age,
                    "layout_id": profile["layout_id"], "file": file_key},
        "scenario": scenario, "seed": seed, "guid_mode": guid_mode,
        "kernel_base": image.base, "kernel_size": len(image.data), "kernel_dtb": dtb, "low_stub": 0x1000,
        "globals": {g: (image.va(g) if g in image.symbols and not (g == "ObHeaderCookie" and om.cookie is None)
                        else None) for g in GLOBALS},
        "header_cookie": om.cookie,
        "kva_shadow": world.kvashadow,
        "types": {str(om.index[n]): n for n in om.types},
        "vcpus": vcpus,
        "processes": [process_record(p) for p in procs],
        "cid_table": {"handle_table": cid.va, "table_code": cid.table_code, "level": cid.level},
        "handles": [r for p in with_tables for r in handle_records(p)],
        "invalid": [r for p in with_tables for r in invalid_records(p, world.rng)],
    }
    if extra:
        truth.update(extra)
    return truth
