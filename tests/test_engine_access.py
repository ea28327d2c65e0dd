"""Granted-access masks decoded per object type, and the text/JSON renderers."""
import json

import pytest

from gdbhandles import render
from gdbhandles.windows import access
from gdbhandles.records import HANDLE_KEYS, HandleRecord


@pytest.mark.parametrize("type_name,mask,text", [
    ("Event", 0x1F0003, "0x1f0003 EVENT_ALL_ACCESS"),
    ("Event", 0x100002, "0x100002 EVENT_MODIFY_STATE|SYNCHRONIZE"),
    ("File", 0x120089, "0x120089 FILE_GENERIC_READ"),
    ("File", 0x12019F, "0x12019f FILE_GENERIC_READ|FILE_GENERIC_WRITE"),
    ("Key", 0x20019, "0x20019 KEY_READ"),
    ("Key", 0xF003F, "0xf003f KEY_ALL_ACCESS"),
    ("Process", 0x1FFFFF, "0x1fffff PROCESS_ALL_ACCESS"),
    ("Process", 0x1410, "0x1410 PROCESS_VM_READ|PROCESS_QUERY_INFORMATION|PROCESS_QUERY_LIMITED_INFORMATION"),
    ("Thread", 0x1FFFFF, "0x1fffff THREAD_ALL_ACCESS"),
    ("Token", 0x8, "0x8 TOKEN_QUERY"),
    ("Section", 0x4, "0x4 SECTION_MAP_READ"),
    ("Mutant", 0x1F0001, "0x1f0001 MUTANT_ALL_ACCESS"),
    ("Semaphore", 0x100003, "0x100003 SEMAPHORE_QUERY_STATE|SEMAPHORE_MODIFY_STATE|SYNCHRONIZE"),
    ("Directory", 0x3, "0x3 DIRECTORY_QUERY|DIRECTORY_TRAVERSE"),
    ("Unknown", 0xF0000, "0xf0000 STANDARD_RIGHTS_REQUIRED"),
    ("Event", 0x80000000, "0x80000000 GENERIC_READ"),
    ("Event", 0x100008, "0x100008 SYNCHRONIZE|0x8"),
    ("Event", 0, "0x0"),
    ("WaitCompletionPacket", 0x1, "0x1"),              # no names known: the mask once
])
def test_rights(type_name, mask, text):
    assert access.describe(type_name, mask) == text


def test_attribute_names():
    assert access.attribute_names(7) == ["ProtectFromClose", "Inherit", "Audit"]
    assert access.attribute_names(0) == []


def test_handle_json_is_the_truth_shape():
    record = HandleRecord(4, "System", 8, 0xFFFF9E0D12345670, "Key", "\\REGISTRY\\MACHINE", 0x20019, 2)
    [item] = json.loads(render.handles_json([record]))
    assert tuple(item) == HANDLE_KEYS
    assert item["object"] == 0xFFFF9E0D12345670 and item["name"] == "\\REGISTRY\\MACHINE"


@pytest.mark.parametrize("count", [0, 1, 4])
def test_handle_json_is_json_dumps_of_the_records_text_for_text(count):
    """The walk's JSON is written record by record (huge walks); its text stays exactly what
    json.dumps(indent=1) gives, with hostile and non-ASCII names, damaged records and a record
    not holding an int where one belongs (the template's %d would refuse it)."""
    records = [HandleRecord(4, "Sys\ntem\u202e\x00", 8, 1 << 63, "Key", '\\R"x\u1234\U0001f600', 3, 2, ["a\nb", "c"]),
               HandleRecord(5, "x", 12, 5, None, None, 0, 0),
               HandleRecord(6, "\u00e9", 16, 7, "Token", "\ud800", 0x1F0003, 1),
               HandleRecord(7, "y", 20, None, "File", "n", 1, 0)][:count]
    assert render.handles_json(records) == json.dumps([r.to_json() for r in records], indent=1) + "\n"


def test_handle_table_columns():
    records = [HandleRecord(612, "lsass.exe", 0x1C, 0xFFFF9E0D12345670, "Event", None, 0x1F0003, 0),
               HandleRecord(612, "lsass.exe", 0x20, 0xFFFF9E0D12345700, "Desktop", "Default", 0xF01FF, 3)]
    lines = render.handles_table(records).splitlines()
    assert lines[0].split() == ["PID", "Process", "Handle", "Object", "Type", "Access", "Attributes", "Name"]
    assert lines[2].split() == ["612", "lsass.exe", "0x1c", "0xffff9e0d12345670", "Event",
                                "0x1f0003", "EVENT_ALL_ACCESS", "-"]
    cells = lines[3].split()
    assert cells[5] == "0xf01ff" and cells[6].endswith("...") and len(cells[5] + " " + cells[6]) == 40
    assert cells[7:] == ["ProtectFromClose|Inherit", "Default"]
