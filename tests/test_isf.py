"""symbols.json as a volatility3 ISF: every member the profile data knows, with its offset and
type, every type it names defined, the guest's symbols and PDB identity in the metadata."""
import random

import pytest

from winguest.isf import build_isf
from winguest.kernel_image import build_kernel_image
from winguest.profiles import all_profiles

PROFILES = all_profiles()


def referenced(descriptor):
    if descriptor["kind"] in ("pointer", "array"):
        return referenced(descriptor["subtype"])
    if descriptor["kind"] == "bitfield":
        return referenced(descriptor["type"])
    return [(descriptor["kind"], descriptor["name"])]


@pytest.mark.parametrize("profile", [p for _, p in PROFILES], ids=[p["version"] for _, p in PROFILES])
def test_isf_of_every_profile(profile):
    guid = profile["pdb"]["guid"] or "00112233445566778899AABBCCDDEEFF"
    image = build_kernel_image(profile, guid=guid, age=3, base=0xFFFFF80000000000, rng=random.Random(0))
    isf = build_isf(profile, image, guid, 3)
    assert isf["metadata"]["format"].startswith("6.")
    assert isf["metadata"]["windows"]["pdb"] == {"GUID": guid, "age": 3, "database": "ntkrnlmp.pdb",
                                                  "machine_type": 34404}
    types = isf["user_types"]
    for name, struct in profile["structs"].items():
        if not struct:
            continue
        assert types[name]["size"] == struct["size"]
        for member, field in struct["fields"].items():
            if field and "." not in member:
                got = types[name]["fields"][member]
                assert got["offset"] == field["offset"], f"{name}.{member}"
                if "bit_position" in field:
                    assert (got["type"]["bit_position"], got["type"]["bit_length"]) == \
                        (field["bit_position"], field["bit_length"])
    for struct in types.values():
        for field in struct["fields"].values():
            for kind, name in referenced(field["type"]):
                assert name in (isf["base_types"] if kind == "base" else types), name
    assert {"_LIST_ENTRY", "_EX_FAST_REF", "_ERESOURCE", "_DEVICE_OBJECT"} <= set(types)
    if profile["symbols"]:                 # shipped builds: what volatility3's pslist/handles read
        assert {"ActiveThreads", "CreateTime", "ExitTime"} <= set(types["_EPROCESS"]["fields"])
        assert "Flags" in types["_CM_KEY_CONTROL_BLOCK"]["fields"]
    assert {name: s["address"] for name, s in isf["symbols"].items()} == image.symbols
