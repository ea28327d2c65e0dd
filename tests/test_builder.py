"""The guest builder: deterministic, every profile builds, truth.json matches the memory."""
from __future__ import annotations

import json

import pytest

from guest_check import check_guest
from winguest.guest import build, write
from winguest.profiles import all_profiles


@pytest.mark.parametrize("profile", ["7601", "9200", "19041", "22000", "22631"])
def test_default_guest_matches_truth(built_guest, profile):
    d = built_guest(profile)
    check_guest(d / "memory.raw", json.loads((d / "truth.json").read_text()))


def test_same_inputs_same_bytes():
    a, b = build("19041", "default", 3), build("19041", "default", 3)
    for name in ("loader.bin", "memory.bin", "lowstub", "truth", "guest", "symbols"):
        assert a[name] == b[name], name
    c = build("19041", "default", 4)
    assert c["memory.bin"] != a["memory.bin"]
    assert c["truth"]["kernel_base"] != a["truth"]["kernel_base"]


@pytest.mark.parametrize("version", [p["version"] for _, p in all_profiles()])
def test_every_profile_builds(tmp_path, version):
    g = build(version, "default")
    write(tmp_path, g)
    check_guest(tmp_path / "memory.raw", g["truth"])
