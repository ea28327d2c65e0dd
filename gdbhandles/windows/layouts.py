"""Structure offsets: the one place the engine asks where a field lives.

Sources, as kernel.py chooses them: a shipped profile (`data/windows-x64-offsets*.json`,
keyed by PDB GUID through `data/windows-x64-layout-index.json`, or by build number), or a
user's volatility3 ISF. The extra profiles come from headers that miss a few members
(null there, e.g. _KPCR.Prcb.CurrentThread on 22621): those are borrowed from the nearest
build that has them, and `Layout.borrowed` says so.
"""

from __future__ import annotations

import functools
import gzip
import json
import lzma
from dataclasses import dataclass
from pathlib import Path

from gdbhandles.errors import ProfileError
from gdbhandles.windows.files import FileError, open_regular, read_capped

DATA = Path(__file__).resolve().parent.parent / "data"
POINTER_SIZE = 8


@dataclass(frozen=True)
class Field:
    offset: int
    size: int
    bit_position: int | None = None
    bit_length: int | None = None

    def extract(self, data: bytes, base: int = 0) -> int:
        """The field's value from `data`, where the structure starts at `base`."""
        start = base + self.offset
        value = int.from_bytes(data[start:start + self.size], "little")
        if self.bit_length is not None:
            value = (value >> self.bit_position) & ((1 << self.bit_length) - 1)
        return value

    def read(self, read, address: int) -> int:
        """The field of the structure at `address`, through `read(address, size)`."""
        return self.extract(read(address + self.offset, self.size), -self.offset)


@functools.cache
def shipped_profiles() -> tuple[dict, ...]:
    """Every shipped profile: the 40 ISF-derived ones first, then the 8 extra builds."""
    profiles = json.loads((DATA / "windows-x64-offsets.json").read_text())
    for profile in profiles:
        profile["file"] = "offsets"
    extra = json.loads((DATA / "windows-x64-offsets-extra.json").read_text())
    for profile in extra:
        profile["file"] = "extra"
    return tuple(profiles + extra)


@functools.cache
def _index() -> dict[str, dict]:
    rows = json.loads((DATA / "windows-x64-layout-index.json").read_text())["files"]
    return {row["guid_age"].upper(): row for row in rows}


def guid_age(guid: str, age: int) -> str:
    """The key the shipped data uses: 32 hex digits of the GUID, then the age in hex."""
    return f"{guid.upper()}{age:X}"


def _revision(version: str) -> int:
    return int(version.rsplit(".", 1)[-1])


def _profile_by_id(key: str) -> dict:
    return next(p for p in shipped_profiles() if p["pdb"]["guid_age"] == key)


class Layout:
    """Offsets and sizes of one kernel build, plus its symbol RVAs when known."""

    def __init__(self, build: int, version: str, source: str, symbols: dict[str, int | None] | None):
        self.build = build
        self.version = version
        self.source = source                  # shown by `handle info`
        self.symbols = symbols or {}          # name -> RVA; empty when unknown
        self.borrowed: dict[str, str] = {}    # "struct.field" -> version it came from
        self.structs: dict[type, object] = {}  # structure type -> its Struct bound to this layout (Struct.of)

    def _own(self, struct: str, path: str) -> Field | None:
        raise NotImplementedError

    def _own_size(self, struct: str) -> int | None:
        raise NotImplementedError

    def _fallbacks(self) -> list[dict]:
        return []

    def find(self, struct: str, path: str) -> Field | None:
        """The field, or None if this build has no such member."""
        found = self._own(struct, path)
        if found is None:
            for profile in self._fallbacks():
                found = _profile_field(profile, struct, path)
                if found is not None:
                    self.borrowed[f"{struct}.{path}"] = profile["version"]
                    break
        return found

    def field(self, struct: str, path: str) -> Field:
        found = self.find(struct, path)
        if found is None:
            raise ProfileError(f"the layout ({self.source}) has no {struct}.{path}")
        return found

    def offset(self, struct: str, path: str) -> int:
        return self.field(struct, path).offset

    def size(self, struct: str) -> int | None:
        """sizeof(struct), or None if this build lacks the type (e.g. audit info on Win7)."""
        return self._own_size(struct)


def _profile_field(profile: dict, struct: str, path: str) -> Field | None:
    entry = profile["structs"].get(struct)
    if not entry:
        return None
    raw = entry["fields"].get(path)
    if raw is None:
        return None
    return Field(raw["offset"], raw["size"], raw.get("bit_position"), raw.get("bit_length"))


class ProfileLayout(Layout):
    """A shipped profile; symbols from the exact kernel's index row when the GUID is known."""

    def __init__(self, profile: dict, source: str, symbols: dict[str, int | None] | None):
        super().__init__(profile["build"], profile["version"], source, symbols)
        self.profile = profile

    def _own(self, struct, path):
        return _profile_field(self.profile, struct, path)

    def _own_size(self, struct):
        entry = self.profile["structs"].get(struct)
        return entry["size"] if entry else None

    def _fallbacks(self):
        if self.profile["file"] != "extra":
            return []
        others = [p for p in shipped_profiles() if p is not self.profile]
        return sorted(others, key=lambda p: (abs(p["build"] - self.build), p["file"] != "offsets"))

    def find(self, struct, path):
        entry = self.profile["structs"].get(struct)
        if entry is not None and path not in entry["fields"]:
            return None               # not a member of this build at all
        return super().find(struct, path)


def for_guid(guid: str, age: int) -> ProfileLayout | None:
    """The layout of a kernel we know by PDB GUID+age, with its own symbol RVAs."""
    row = _index().get(guid_age(guid, age))
    if row is None:
        return None
    profile = _profile_by_id(row["same_layout_profile"])
    source = "shipped profile of this very kernel (matched by its PDB GUID)" \
        if profile["version"] == row["version"] else \
        f"shipped profile {profile['version']} (the same structures; matched by the kernel's PDB GUID)"
    return ProfileLayout(profile, source, dict(row["symbols"]))


def for_build(build: int, revision: int | None = None) -> ProfileLayout | None:
    """A shipped layout of the same build (the nearest revision); no symbols."""
    same = [p for p in shipped_profiles() if p["build"] == build]
    if not same:
        return None
    if revision is None:
        chosen = max(same, key=lambda p: _revision(p["version"]))
    else:
        chosen = min(same, key=lambda p: abs(_revision(p["version"]) - revision))
    return ProfileLayout(chosen, f"shipped profile {chosen['version']} (same build {build}, nearest "
                                 f"revision; PDB GUID unknown)", None)


MAX_ISF = 256 << 20         # bytes of JSON: real ISFs hold some 10-60 MiB


def read_isf(path: str | Path) -> dict:
    """A volatility3 ISF file: .json, .json.xz or .json.gz."""
    path = Path(path)
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix)
    try:
        with open(open_regular(path, "ISF profile"), "rb") as raw:
            handle = opener(raw) if opener else raw
            isf = json.loads(read_capped(handle, MAX_ISF, "ISF profile", path))
    except FileError as exc:
        raise ProfileError(str(exc)) from None
    except (OSError, ValueError, EOFError, lzma.LZMAError, RecursionError) as exc:
        raise ProfileError(f"cannot read ISF profile {path}: {str(exc)[:200]}") from None
    if not isinstance(isf, dict) or "user_types" not in isf:
        raise ProfileError(f"{path} is not a volatility3 ISF (no user_types)")
    return isf


def isf_pdb(isf: dict) -> tuple[str, int] | None:
    """(GUID, age) an ISF was made for, if it says."""
    pdb = isf.get("metadata", {}).get("windows", {}).get("pdb")
    if not pdb or not pdb.get("GUID"):
        return None
    return pdb["GUID"].replace("-", "").upper(), int(pdb.get("age", 0))


class IsfLayout(Layout):
    """A user's volatility3 ISF: structure offsets resolved through its types."""

    def __init__(self, isf: dict, path: str, build: int, with_symbols: bool):
        symbols = None
        if with_symbols:
            symbols = {name: entry.get("address") for name, entry in isf.get("symbols", {}).items()}
        super().__init__(build, f"ISF {Path(path).name}", f"ISF {path}", symbols)
        self.isf = isf

    def _type_size(self, type_: dict) -> int:
        kind = type_.get("kind")
        if kind == "pointer":
            return POINTER_SIZE
        if kind == "base":
            return self.isf["base_types"][type_["name"]]["size"]
        if kind in ("struct", "union", "class"):
            return self.isf["user_types"][type_["name"]]["size"]
        if kind == "enum":
            return self.isf["enums"][type_["name"]]["size"]
        if kind == "array":
            return type_["count"] * self._type_size(type_["subtype"])
        if kind == "bitfield":
            return self._type_size(type_["type"])
        raise ProfileError(f"ISF type of kind {kind!r} not understood")

    def _own(self, struct, path):
        offset = 0
        current = struct
        parts = path.split(".")
        for depth, part in enumerate(parts):
            entry = self.isf["user_types"].get(current)
            if entry is None or part not in entry["fields"]:
                return None
            member = entry["fields"][part]
            offset += member["offset"]
            type_ = member["type"]
            if depth < len(parts) - 1:
                if type_.get("kind") not in ("struct", "union"):
                    return None
                current = type_["name"]
        if type_.get("kind") == "bitfield":
            return Field(offset, self._type_size(type_["type"]), type_["bit_position"], type_["bit_length"])
        return Field(offset, self._type_size(type_))

    def _own_size(self, struct):
        entry = self.isf["user_types"].get(struct)
        return entry["size"] if entry else None


def known_kernels() -> int:
    """How many kernels (PDB GUID + age) the shipped index knows by name."""
    return len(_index())
