"""A small reader of built guests' memory.raw, independent of the builder and of the engine.

Used by tests/test_builder.py (raw files) and tests/test_boot.py (pmemsave dumps) to check that
truth.json describes what the memory holds. It follows the Windows facts of
docs/architecture.md with the profile offsets read from the shipped JSON data.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "gdbhandles" / "data"
PFN = 0x000FFFFFFFFFF000


def profile_for(truth: dict) -> dict:
    if truth["profile"]["file"] == "future":            # the test bed's own, in no data file
        from winguest.profiles import future_profile
        return future_profile()
    name = {"offsets": "windows-x64-offsets.json", "extra": "windows-x64-offsets-extra.json"}
    for p in json.loads((DATA / name[truth["profile"]["file"]]).read_text()):
        if p["version"] == truth["profile"]["version"]:
            return p
    raise KeyError(truth["profile"]["version"])


class Raw:
    """Physical memory file + 4-level translation (large pages, transition PTEs)."""

    def __init__(self, path: Path):
        self.f = open(path, "rb")
        self.m = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ)

    def close(self):
        self.m.close()
        self.f.close()

    def phys(self, pa: int, n: int) -> bytes:
        return self.m[pa:pa + n]

    def q(self, pa: int) -> int:
        return struct.unpack_from("<Q", self.m, pa)[0]

    def translate(self, dtb: int, va: int) -> int | None:
        table = dtb & PFN
        for shift in (39, 30, 21, 12):
            e = self.q(table + ((va >> shift) & 511) * 8)
            if not e & 1:
                if shift == 12 and e & (1 << 11) and not e & (1 << 10):
                    return (e & PFN) | (va & 0xFFF)
                return None
            if shift == 21 and e & 0x80:
                return (e & PFN & ~0x1FFFFF) | (va & 0x1FFFFF)
            assert not (shift == 39 and e & 0x80), "PML4E with bit 7"
            table = e & PFN
        return table | (va & 0xFFF)


class Guest:
    """Typed reads of one guest through the kernel DTB and the profile's offsets."""

    def __init__(self, raw: Raw, truth: dict):
        self.raw = raw
        self.truth = truth
        self.p = profile_for(truth)
        self.dtb = truth["kernel_dtb"]

    def off(self, s: str, f: str) -> int:
        if s == "_KPCR" and f == "Prcb" and self.p["structs"][s]["fields"].get(f) is None:
            return 0x180
        return self.p["structs"][s]["fields"][f]["offset"]

    def field(self, s: str, f: str) -> dict:
        return self.p["structs"][s]["fields"][f]

    def read(self, va: int, n: int) -> bytes:
        out = b""
        while n:
            k = min(n, 0x1000 - (va & 0xFFF))
            pa = self.raw.translate(self.dtb, va)
            if pa is None:
                raise ValueError(f"unmapped {va:#x}")
            out += self.raw.phys(pa, k)
            va, n = va + k, n - k
        return out

    def q(self, va: int) -> int:
        return struct.unpack("<Q", self.read(va, 8))[0]

    def d(self, va: int) -> int:
        return struct.unpack("<I", self.read(va, 4))[0]

    def b(self, va: int) -> int:
        return self.read(va, 1)[0]

    def ustr(self, va: int) -> str:
        length, _, buf = struct.unpack("<HH4xQ", self.read(va, 16))
        return self.read(buf, length).decode("utf-16-le")

    # -- processes --
    def image_file_name(self, ep: int) -> str:
        return self.read(ep + self.off("_EPROCESS", "ImageFileName"), 15).split(b"\0")[0].decode()

    def process_name(self, ep: int) -> str:
        """The full image name (SeAuditProcessCreationInfo's path) where the profile has it."""
        audit = self.p["structs"]["_EPROCESS"]["fields"].get("SeAuditProcessCreationInfo.ImageFileName")
        info = self.q(ep + audit["offset"]) if audit else 0
        if not info:
            return self.image_file_name(ep)
        name = self.ustr(info + self.off("_OBJECT_NAME_INFORMATION", "Name")).rpartition("\\")[2]
        assert name.startswith(self.image_file_name(ep)), name
        return name

    def processes(self) -> list[dict]:
        head = self.truth["globals"]["PsActiveProcessHead"]
        links = self.off("_EPROCESS", "ActiveProcessLinks")
        out, at = [], self.q(head)
        while at != head:
            ep = at - links
            out.append({"pid": self.q(ep + self.off("_EPROCESS", "UniqueProcessId")), "name": self.process_name(ep),
                        "image_file_name": self.image_file_name(ep),
                        "eprocess": ep, "handle_table": self.q(ep + self.off("_EPROCESS", "ObjectTable")),
                        "dtb": self.q(ep + self.off("_EPROCESS", "Pcb.DirectoryTableBase"))})
            at = self.q(at)
            assert len(out) < 10000
        return out

    # -- handle tables --
    def table_entries(self, table: int):
        """(handle value, entry address) for every slot below NextHandleNeedingPool."""
        code = self.q(table + self.off("_HANDLE_TABLE", "TableCode"))
        limit = self.d(table + self.off("_HANDLE_TABLE", "NextHandleNeedingPool"))
        level, top = code & 3, code & ~3
        for value in range(0, limit, 4):
            i = value // 4
            if level == 0:
                page = top
            elif level == 1:
                page = self.q(top + (i // 256) * 8)
            else:
                page = self.q(self.q(top + (i // (256 * 512)) * 8) + ((i // 256) % 512) * 8)
            yield value, page + (i % 256) * 16

    def entry(self, at: int):
        """(header, granted access, attributes) of a used entry, None for a free one."""
        lo, hi = struct.unpack("<QQ", self.read(at, 16))
        fields = self.p["structs"]["_HANDLE_TABLE_ENTRY"]["fields"]
        if fields.get("GrantedAccess"):
            if lo == 0:
                return None
            attrs = (2 if lo & 2 else 0) | (4 if lo & 4 else 0) | (1 if hi & 0x2000000 else 0)
            return lo & ~0xF, hi & 0xFFFFFFFF & ~0x2000000, attrs
        if lo == 0:
            return None
        bits = lambda f: (lo >> fields[f]["bit_position"]) & ((1 << fields[f]["bit_length"]) - 1)
        assert bits("Unlocked") == 1
        width = fields["ObjectPointerBits"]["bit_length"] + 4
        ptr = bits("ObjectPointerBits") << 4
        if ptr >> (width - 1):
            ptr |= (2**64 - 1) ^ ((1 << width) - 1)
        ga = fields["GrantedAccessBits"]
        return ptr, (hi >> ga["bit_position"]) & ((1 << ga["bit_length"]) - 1), bits("Attributes")

    # -- objects --
    def type_name(self, header: int) -> str:
        stored = self.b(header + 0x18)
        assert stored != 0, f"stored TypeIndex 0 at {header:#x}"
        cookie = self.truth["header_cookie"]
        idx = stored if cookie is None else stored ^ cookie ^ ((header >> 8) & 0xFF)
        if cookie is not None:
            assert self.b(self.truth["globals"]["ObHeaderCookie"]) == cookie
        tobj = self.q(self.truth["globals"]["ObTypeIndexTable"] + idx * 8)
        assert self.b(tobj + self.off("_OBJECT_TYPE", "Index")) == idx
        return self.ustr(tobj + self.off("_OBJECT_TYPE", "Name"))

    def object_name(self, header: int, type_name: str) -> str | None:
        body = header + 0x30
        if type_name == "File":
            device = self.q(body + self.off("_FILE_OBJECT", "DeviceObject"))
            return self.object_path(device - 0x30) + self.ustr(body + self.off("_FILE_OBJECT", "FileName"))
        if type_name == "Key":
            kcb = self.q(body + self.off("_CM_KEY_BODY", "KeyControlBlock"))
            parts = []
            while kcb:
                nb = self.q(kcb + self.off("_CM_KEY_CONTROL_BLOCK", "NameBlock"))
                n = struct.unpack("<H", self.read(nb + self.off("_CM_NAME_CONTROL_BLOCK", "NameLength"), 2))[0]
                parts.append(self.read(nb + self.off("_CM_NAME_CONTROL_BLOCK", "Name"), n).decode())
                kcb = self.q(kcb + self.off("_CM_KEY_CONTROL_BLOCK", "ParentKcb"))
            return "\\" + "\\".join(reversed(parts))
        if type_name == "Process":
            return f"{self.process_name(body)}({self.q(body + self.off('_EPROCESS', 'UniqueProcessId'))})"
        if type_name == "Thread":
            return str(self.q(body + self.off("_ETHREAD", "Cid") + 8))
        mask = self.b(header + 0x1A)
        if not mask & 2:
            return None
        off = self.b(self.truth["globals"]["ObpInfoMaskToOffset"] + (mask & 3))
        return self.ustr(header - off + 8)

    def object_path(self, header: int) -> str:
        """\\Device\\X: names up the name-info Directory chain to the root (whose Directory is 0)."""
        parts = []
        while True:
            mask = self.b(header + 0x1A)
            assert mask & 2, f"object {header:#x} on a device's path has no name"
            off = self.b(self.truth["globals"]["ObpInfoMaskToOffset"] + (mask & 3))
            directory = self.q(header - off)
            if not directory:
                return "\\" + "\\".join(reversed(parts))
            parts.append(self.ustr(header - off + 8))
            header = directory - 0x30

    def page_handles(self, proc: dict, page: int) -> list[dict]:
        """Records of a level-0 table page's entries read from another address (churn states)."""
        return self.handles(proc, [(i * 4, page + i * 16) for i in range(256)])

    def handles(self, proc: dict, entries=None) -> list[dict]:
        out = []
        for value, at in entries or self.table_entries(proc["handle_table"]):
            e = None if value % 1024 == 0 else self.entry(at)
            if e is None:
                continue
            header, access, attrs = e
            t = self.type_name(header)
            out.append({"pid": proc["pid"], "process": proc["name"], "handle": value, "object": header + 0x30,
                        "type": t, "name": self.object_name(header, t), "granted_access": access,
                        "attributes": attrs})
        return out


def check_guest(raw_path: Path, truth: dict) -> None:
    """Assert that truth.json matches what an independent walk of the memory finds."""
    raw = Raw(raw_path)
    try:
        g = Guest(raw, truth)
        procs = g.processes()
        want = [{k: p[k] for k in ("pid", "name", "image_file_name", "eprocess", "handle_table", "dtb")}
                for p in truth["processes"]]
        assert procs == want
        assert procs[0]["pid"] == 4
        assert g.q(truth["globals"]["PsInitialSystemProcess"]) == procs[0]["eprocess"]
        assert g.q(truth["globals"]["ObpKernelHandleTable"]) == procs[0]["handle_table"]
        found = [h for p in procs if p["handle_table"] for h in g.handles(p)]
        assert found == truth["handles"]
        for v in truth["vcpus"]:
            if v["cpl"] == 0:
                assert g.q(v["kpcr"] + g.off("_KPCR", "Self")) == v["kpcr"]
                assert g.q(v["kpcr"] + g.off("_KPCR", "Prcb") + 8) == v["thread"]
        stub = raw.phys(truth["low_stub"], 0x100)
        assert struct.unpack_from("<Q", stub)[0] & 0xFFFFFFFFFFFF00FF == 0x00000001000600E9
        assert struct.unpack_from("<Q", stub, 0xA0)[0] == truth["kernel_dtb"]
        assert raw.phys(0, 0x1000) == bytes(0x1000)
    finally:
        raw.close()
