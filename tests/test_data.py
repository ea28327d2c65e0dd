"""The layout data we ship must hold every fact the engine and the guest builder read."""
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "gdbhandles" / "data"
PROFILES = json.loads((DATA / "windows-x64-offsets.json").read_text())
EXTRA = json.loads((DATA / "windows-x64-offsets-extra.json").read_text())
INDEX = json.loads((DATA / "windows-x64-layout-index.json").read_text())

NEEDED = {
    "_EPROCESS": ["UniqueProcessId", "ActiveProcessLinks", "ObjectTable", "ImageFileName"],
    "_HANDLE_TABLE": ["TableCode", "NextHandleNeedingPool"],
    "_OBJECT_HEADER": ["TypeIndex", "InfoMask", "Body"],
    "_OBJECT_TYPE": ["Name", "Index"],
    "_UNICODE_STRING": ["Length", "Buffer"],
    "_FILE_OBJECT": ["FileName"],
    "_CM_KEY_BODY": ["KeyControlBlock"],
    "_CM_KEY_CONTROL_BLOCK": ["NameBlock", "ParentKcb"],
    "_CM_NAME_CONTROL_BLOCK": ["Compressed", "NameLength", "Name"],
    "_ETHREAD": ["Cid"],
}


def test_counts():
    assert len(PROFILES) == 40
    assert len(EXTRA) == 8
    assert len(INDEX["files"]) == 213


@pytest.mark.parametrize("profile", PROFILES + EXTRA, ids=lambda p: p["version"])
def test_profile_has_what_we_read(profile):
    structs = profile["structs"]
    for struct, fields in NEEDED.items():
        assert structs[struct] is not None, struct
        for field in fields:
            assert structs[struct]["fields"].get(field) is not None, f"{struct}.{field}"
    entry = structs["_HANDLE_TABLE_ENTRY"]
    assert entry["size"] == 16
    if profile["build"] >= 9200:
        bits = entry["fields"]["ObjectPointerBits"]
        assert bits["bit_position"] + bits["bit_length"] == 64
        assert entry["fields"]["Attributes"]["bit_length"] == 3
        assert entry["fields"]["GrantedAccessBits"]["bit_length"] == 25
    else:
        assert entry["fields"]["Object"]["offset"] == 0
        assert entry["fields"]["GrantedAccess"]["offset"] == 8


def test_index_rows_point_at_profiles():
    ids = {p["pdb"]["guid_age"] for p in PROFILES}
    for row in INDEX["files"]:
        assert row["same_layout_profile"] in ids, row["guid_age"]
        assert row["symbols"]["PsInitialSystemProcess"], row["guid_age"]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p["version"])
def test_isf_profiles_have_the_full_image_name(profile):
    """SeAuditProcessCreationInfo.ImageFileName → _OBJECT_NAME_INFORMATION.Name, on every
    ISF-derived build (the vergilius-derived extra builds do not have it)."""
    structs = profile["structs"]
    audit = structs["_EPROCESS"]["fields"]["SeAuditProcessCreationInfo.ImageFileName"]
    assert audit["size"] == 8 and audit["type"] == "_OBJECT_NAME_INFORMATION*"
    assert audit["offset"] > structs["_EPROCESS"]["fields"]["ImageFileName"]["offset"]
    assert audit["offset"] == structs["_EPROCESS"]["fields"]["SeAuditProcessCreationInfo"]["offset"]
    assert structs["_OBJECT_NAME_INFORMATION"]["fields"]["Name"] == \
        {"offset": 0, "type": "_UNICODE_STRING", "size": structs["_UNICODE_STRING"]["size"]}
