"""The shipped layout profiles (read as data; the engine package is never imported)."""
from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "gdbhandles" / "data"
FILES = {"offsets": "windows-x64-offsets.json", "extra": "windows-x64-offsets-extra.json"}

# _KPCR.Prcb is 0x180 in every ISF build; the vergilius headers of 22621/22631 dropped it.
KPCR_PRCB_FALLBACK = 0x180


@cache
def all_profiles() -> list[tuple[str, dict]]:
    """Every profile as (file key, entry), the ISF-derived file first."""
    out = []
    for key, name in FILES.items():
        out += [(key, p) for p in json.loads((DATA / name).read_text())]
    return out


FUTURE = "future"
FUTURE_BUILD = 27000                    # above every shipped build
# (struct, first offset that moves, bytes it moves by): the structures grow in the middle
FUTURE_SHIFTS = (("_KPROCESS", 0x300, 0x80), ("_EPROCESS", 0x300, 0x80), ("_KTHREAD", 0x400, 0x40),
                 ("_ETHREAD", 0x400, 0x40), ("_CM_KEY_CONTROL_BLOCK", 0x48, 0x10))


@cache
def future_profile() -> dict:
    """The test bed's `future` build, a kernel no shipped layout describes: the newest shipped
    layout with the EPROCESS, ETHREAD and key-control-block fields moved and those structures
    (and KPROCESS/KTHREAD inside them) grown; no symbols, no PDB GUID (the builder draws one)."""
    _, newest = max(all_profiles(), key=lambda kp: (kp[1]["build"], kp[1]["version"]))
    profile = copy.deepcopy(newest)
    profile.update(build=FUTURE_BUILD, version=f"10.0.{FUTURE_BUILD}.1000", layout_id=FUTURE, symbols=None,
                   os_label="test bed: a future Windows build", pdb=dict(newest["pdb"], guid=None, age=None,
                                                                           guid_age=None))
    for name, start, step in FUTURE_SHIFTS:
        struct = profile["structs"][name]
        struct["size"] += step
        for field in struct["fields"].values():
            if field and field["offset"] >= start:
                field["offset"] += step
    return profile


def find_profile(spec: str | int) -> tuple[str, dict]:
    """A build number (first match), a full version, a PDB guid_age, or `future`."""
    spec = str(spec)
    if spec == FUTURE:
        return FUTURE, future_profile()
    for key, p in all_profiles():
        if spec in (str(p["build"]), p["version"], p["pdb"]["guid_age"] or ""):
            return key, p
    raise KeyError(f"no profile matches {spec!r}")


class Layout:
    """Structure offsets and bitfields of one profile, with writers into byte buffers."""

    def __init__(self, profile: dict):
        self.profile = profile
        self.structs = profile["structs"]
        self.build = profile["build"]

    def has(self, struct: str, field: str) -> bool:
        return ((self.structs.get(struct) or {}).get("fields") or {}).get(field) is not None

    def field(self, struct: str, field: str) -> dict:
        f = self.structs[struct]["fields"].get(field)
        if f is None:
            if struct == "_KPCR" and field in ("Prcb", "Prcb.CurrentThread"):
                extra = 0 if field == "Prcb" else self.off("_KPRCB", "CurrentThread")
                return {"offset": KPCR_PRCB_FALLBACK + extra, "size": 8}
            raise KeyError(f"{struct}.{field} not in profile {self.profile['version']}")
        return f

    def off(self, struct: str, field: str) -> int:
        return self.field(struct, field)["offset"]

    def size(self, struct: str) -> int | None:
        s = self.structs.get(struct)
        return s["size"] if s else None

    def bits(self, struct: str, field: str) -> tuple[int, int, int]:
        """(byte offset, bit position, bit length) of a bitfield."""
        f = self.field(struct, field)
        return f["offset"], f["bit_position"], f["bit_length"]

    def put(self, buf: bytearray, base: int, struct: str, field: str, value: int) -> None:
        """Write an integer field (or bitfield) of `struct` at buf[base:]."""
        f = self.field(struct, field)
        at = base + f["offset"]
        size = f["size"]
        if "bit_position" in f:
            pos, length = f["bit_position"], f["bit_length"]
            mask = ((1 << length) - 1) << pos
            old = int.from_bytes(buf[at:at + size], "little")
            value = (old & ~mask) | ((value << pos) & mask)
        buf[at:at + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @property
    def is_win7(self) -> bool:
        return self.has("_HANDLE_TABLE_ENTRY", "GrantedAccess")

    @property
    def has_cookie(self) -> bool:
        sym = self.profile["symbols"]
        if sym is not None:
            return sym.get("ObHeaderCookie") is not None
        return self.build >= 10240

    @property
    def has_kpti(self) -> bool:
        return bool(self.profile["kpti"]["KPROCESS_UserDirectoryTableBase"])
