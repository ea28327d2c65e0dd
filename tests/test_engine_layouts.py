"""Layouts: shipped profiles by GUID and by build, and volatility3 ISF files read the same way."""
from pathlib import Path

import pytest

from gdbhandles.windows import layouts
from gdbhandles.errors import ProfileError

ORACLES = sorted(Path("/work/shared/profiles/isf/windows/ntkrnlmp.pdb").glob("*.json"))


def test_exact_guid_gives_structs_and_own_symbols():
    layout = layouts.for_guid("BBED7C2955FBE4522AAA23F4B8677AD9", 1)
    assert layout.build == 19041
    assert layout.offset("_EPROCESS", "ObjectTable") == 0x570
    assert layout.field("_HANDLE_TABLE_ENTRY", "ObjectPointerBits").bit_position == 20
    assert layout.symbols["PspCidTable"]
    assert layouts.for_guid("00000000000000000000000000000000", 1) is None


def test_same_build_without_guid_has_no_symbols():
    layout = layouts.for_build(9600)
    assert layout.version.startswith("6.3.9600.") and layout.symbols == {}
    assert layouts.for_build(12345) is None
    assert layouts.for_build(19041, 900).version == "10.0.19041.867"          # nearest revision
    assert layouts.for_build(19041).version == "10.0.19041.3570"


def test_members_a_build_lacks_are_not_borrowed():
    win7 = layouts.for_build(7601)
    assert win7.find("_HANDLE_TABLE_ENTRY", "ObjectPointerBits") is None
    assert win7.size("_OBJECT_HEADER_AUDIT_INFO") is None


def test_extra_profiles_borrow_what_their_headers_missed():
    layout = layouts.for_build(22621)
    assert layout.offset("_KPCR", "Prcb.CurrentThread") == 0x188
    assert "_KPCR.Prcb.CurrentThread" in layout.borrowed


def test_bad_isf(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(ProfileError, match="not a volatility3 ISF"):
        layouts.read_isf(path)
    with pytest.raises(ProfileError, match="cannot read"):
        layouts.read_isf(tmp_path / "missing.json")


@pytest.mark.skipif(not ORACLES, reason="the original JPCERT ISF files are not on this machine")
@pytest.mark.parametrize("path", ORACLES, ids=lambda p: p.stem)
def test_original_isf_reads_like_the_shipped_profile(path):
    isf = layouts.read_isf(path)
    guid, age = layouts.isf_pdb(isf)
    shipped = layouts.for_guid(guid, age)
    from_isf = layouts.IsfLayout(isf, str(path), shipped.build, with_symbols=True)
    compared = 0
    for struct, entry in shipped.profile["structs"].items():
        if not entry:
            continue
        assert from_isf.size(struct) == entry["size"], struct
        for name, raw in entry["fields"].items():
            if raw is not None:
                assert from_isf.find(struct, name) == shipped.find(struct, name), f"{struct}.{name}"
                compared += 1
    assert compared > 90
    for name, rva in shipped.symbols.items():
        if rva is not None:
            assert from_isf.symbols[name] == rva, name
