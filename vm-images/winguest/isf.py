"""symbols.json: a volatility3 ISF (format 6.x) for one guest.

The real build's structures as the profile data holds them (every member with its offset and
type, bitfields as ISF bitfields), the base types of a Microsoft PDB, the few small types the
profile's members refer to without describing, and this guest's symbols (RVAs of its globals
and functions) under the kernel's PDB GUID and age, so that unmodified volatility3 can read the
guest the way it reads a real Windows memory image.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

# Members volatility3's pslist and handles read that the profile data lacks, with their real
# offsets, for the 40 shipped builds (from their ISFs in JPCERTCC/Windows-Symbol-Tables, the source
# of the profile data, BSD-3-Clause; by PDB GUID). The extra layouts' symbols.json go without them.
VOLATILITY_MEMBERS = json.loads((Path(__file__).with_name("volatility_members.json")).read_text())

BASE_TYPES = {
    "char": ("char", True, 1), "unsigned char": ("char", False, 1), "short": ("int", True, 2),
    "unsigned short": ("int", False, 2), "int": ("int", True, 4), "unsigned int": ("int", False, 4),
    "long": ("int", True, 4), "unsigned long": ("int", False, 4), "long long": ("int", True, 8),
    "unsigned long long": ("int", False, 8), "wchar": ("int", True, 2), "pointer": ("int", False, 8),
    "HRESULT": ("int", False, 4), "f32": ("float", True, 4), "double": ("float", True, 8),
    "void": ("void", True, 0),
}

# Types the profile's members name but do not describe: (kind, size, {member: (offset, type)}).
# Sizes and members are those of every x64 build (they never changed).
STUBS = {
    "_LIST_ENTRY": ("struct", 16, {"Flink": (0, "_LIST_ENTRY*"), "Blink": (8, "_LIST_ENTRY*")}),
    "_EX_FAST_REF": ("struct", 8, {"Object": (0, "void*"), "Value": (0, "unsigned long long")}),
    "_EX_PUSH_LOCK": ("struct", 8, {"Value": (0, "unsigned long long"), "Ptr": (0, "void*")}),
    "_LARGE_INTEGER": ("union", 8, {"LowPart": (0, "unsigned long"), "HighPart": (4, "long"),
                                    "QuadPart": (0, "long long")}),
    "_QUAD": ("struct", 8, {"UseThisFieldToCopy": (0, "long long")}),
    "_DEVICE_OBJECT": ("struct", 0x150, {"Type": (0, "short"), "Size": (2, "unsigned short")}),
    "_SE_AUDIT_PROCESS_CREATION_INFO": ("struct", 8, {"ImageFileName": (0, "_OBJECT_NAME_INFORMATION*")}),
}
STUB_SIZE = 8               # any other type named only through a pointer
# Types volatility3's Windows symbol table insists on (it attaches its classes to them).
VOLATILITY_TYPES = ("_ERESOURCE", "_TOKEN", "_CMHIVE", "_CM_KEY_NODE", "_CM_KEY_VALUE", "_HMAP_ENTRY",
                    "_MMVAD_SHORT", "_MMVAD", "_KSYSTEM_TIME", "_KMUTANT", "_DRIVER_OBJECT", "_OBJECT_SYMBOLIC_LINK",
                    "_CONTROL_AREA", "_SHARED_CACHE_MAP", "_VACB", "_POOL_TRACKER_BIG_PAGES", "_IMAGE_DOS_HEADER",
                    "_KTIMER", "_LDR_DATA_TABLE_ENTRY")


def _type(spec: str, kinds: dict[str, str]) -> dict:
    """'_KPROCESS*', 'unsigned char[15]', 'wchar' … as an ISF type descriptor."""
    spec = spec.strip()
    if spec.endswith("*"):
        return {"kind": "pointer", "subtype": _type(spec[:-1], kinds)}
    array = re.fullmatch(r"(.+)\[(\d+)\]", spec)
    if array:
        return {"kind": "array", "count": int(array.group(2)), "subtype": _type(array.group(1), kinds)}
    if spec in BASE_TYPES:
        return {"kind": "base", "name": spec}
    return {"kind": kinds.get(spec, "struct"), "name": spec}


def _named(descriptor: dict) -> list[str]:
    """User types a descriptor refers to."""
    if descriptor["kind"] in ("pointer", "array"):
        return _named(descriptor["subtype"])
    if descriptor["kind"] == "bitfield":
        return _named(descriptor["type"])
    return [descriptor["name"]] if descriptor["kind"] in ("struct", "union") else []


def user_types(profile: dict) -> dict:
    structs = {name: s for name, s in profile["structs"].items() if s}
    kinds = {name: s.get("kind", "struct") for name, s in structs.items()}
    kinds.update({name: stub[0] for name, stub in STUBS.items() if name not in kinds})
    out = {}
    for name, s in structs.items():
        fields = {}
        for member, f in s["fields"].items():
            if not f or "." in member:                 # nested members live in their own types
                continue
            descriptor = _type(f["type"], kinds)
            if "bit_position" in f:
                descriptor = {"kind": "bitfield", "bit_position": f["bit_position"],
                              "bit_length": f["bit_length"], "type": descriptor}
            fields[member] = {"offset": f["offset"], "type": descriptor}
        fields.update(VOLATILITY_MEMBERS.get(profile["pdb"]["guid"] or "", {}).get(name, {}))
        out[name] = {"kind": kinds[name], "size": s["size"], "fields": fields}
    for name, (kind, size, members) in STUBS.items():
        out.setdefault(name, {"kind": kind, "size": size,
                              "fields": {m: {"offset": o, "type": _type(t, kinds)} for m, (o, t) in members.items()}})
    missing = {n for t in out.values() for f in t["fields"].values() for n in _named(f["type"])}
    missing = (missing | set(VOLATILITY_TYPES)) - set(out)
    for name in sorted(missing):
        out[name] = {"kind": kinds.get(name, "struct"), "size": STUB_SIZE, "fields": {}}
    return out


def build_isf(profile: dict, image, guid: str, age: int) -> dict:
    base = {name: {"endian": "little", "kind": kind, "signed": signed, "size": size}
            for name, (kind, signed, size) in BASE_TYPES.items()}
    return {
        "metadata": {"format": "6.2.0",
                     "producer": {"name": "gdbhandles-test-guest", "version": "1"},
                     "windows": {"pdb": {"GUID": guid, "age": age, "database": "ntkrnlmp.pdb",
                                         "machine_type": 34404}}},
        "base_types": base,
        "user_types": user_types(profile),
        "enums": {},
        "symbols": {name: {"address": rva} for name, rva in sorted(image.symbols.items())},
    }
