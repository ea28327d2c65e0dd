"""Kernels we have never seen: disassembly of varied code, layouts inferred from the kernel,
invariants checked before use, against truth.json (no QEMU).

The builder's `--code-variants random` draws, per guest, one of several equivalent encodings of
each exported function the engine reads (registers, cookie as xor/movzx/mov memory operand,
RIP-relative or through a `lea` register, reordering, chunks reached by a jump, a worker behind
a call and a tail jump, decoy loads).
"""
from __future__ import annotations

import json
import random

import pytest

from gdbhandles.engine import Windows
from gdbhandles.windows import disasm, layouts
from gdbhandles.windows.memory import DumpFile

from test_engine_guests import check_handles, check_lookups, check_processes
from winguest.kernel_image import build_kernel_image
from winguest.profiles import Layout, all_profiles

BASE = 0xFFFFF8016E800000
PROFILES = [p["version"] for p in layouts.shipped_profiles()]
SEEDS = range(4)
INFERRED = ("_EPROCESS.UniqueProcessId", "_EPROCESS.ActiveProcessLinks", "_EPROCESS.ImageFileName",
            "_EPROCESS.ObjectTable", "_EPROCESS.Pcb.DirectoryTableBase", "_ETHREAD.Cid",
            "_KTHREAD.ApcState.Process", "_KPCR.Prcb.CurrentThread")


def image_reader(image):
    return lambda va, size: bytes(image.data[va - BASE:va - BASE + size])


def exported(image, read, name):
    return disasm.traces(read, BASE + image.exports[name])


def first(pairs):
    return [address for address, _ in pairs]


@pytest.mark.parametrize("profile", [p for _, p in all_profiles()], ids=lambda p: p["version"])
def test_disassembly_finds_every_global_in_every_variant(profile):
    forms = set()
    for seed in SEEDS:
        image = build_kernel_image(profile, guid="0" * 32, age=1, base=BASE, rng=random.Random(seed),
                                   code_variants=True)
        read, va = image_reader(image), lambda name: BASE + image.symbols[name]  # noqa: E731
        forms.update(f"{k}={v}" for k, v in image.code_forms.items())
        assert va("PspCidTable") in first(disasm.constant_loads(exported(image, read, "PsLookupProcessByProcessId"), 8))
        get_type = exported(image, read, "ObGetObjectType")
        assert first(disasm.indexed_tables(get_type, 8)) == [va("ObTypeIndexTable")]
        cookies = first(disasm.constant_loads(get_type, 1))
        assert cookies == ([va("ObHeaderCookie")] if Layout(profile).has_cookie else [])
        assert first(disasm.indexed_tables(exported(image, read, "ObQueryNameString"), 1)) == \
            [va("ObpInfoMaskToOffset")]
        assert va("ObpKernelHandleTable") in first(disasm.constant_loads(
            exported(image, read, "ObReferenceObjectByHandle"), 8))
        pid = disasm.field_reads(exported(image, read, "PsGetProcessId")[:1], ("arg", 0), 8)
        assert pid[0][0] == Layout(profile).off("_EPROCESS", "UniqueProcessId")
    assert len(forms) >= 6, forms


@pytest.fixture(scope="module")
def guest(built_guest):
    def get(profile, **kw):
        directory = built_guest(profile, **kw)
        return directory, json.loads((directory / "truth.json").read_text())
    return get


@pytest.mark.parametrize("profile", PROFILES)
def test_infer_mode_equals_truth_on_every_profile(guest, profile):
    directory, truth = guest(profile)
    windows = Windows.open(DumpFile(directory / "memory.raw"), layout="infer")
    info = windows.info()
    assert info.profile.startswith("inferred")
    assert set(INFERRED) <= set(info.inferred), info.inferred
    check_processes(windows, truth)
    check_handles(windows, truth)
    check_lookups(windows, truth, every=29)
    failed = [c for c in info.checks if not c[1]]
    assert not failed and len(info.checks) >= 10, info.checks


@pytest.mark.parametrize("profile", ["7601", "9200", "9600", "10586", "14393", "17763", "19041", "22000",
                                     "22631"])
@pytest.mark.parametrize("layout", ["auto", "infer"])
def test_varied_code_guests_equal_truth(guest, profile, layout):
    directory, truth = guest(profile, guid="random", code_variants="random")
    assert truth["code_forms"]
    windows = Windows.open(DumpFile(directory / "memory.raw"), layout=layout)
    info = windows.info()
    for name in ("PspCidTable", "ObTypeIndexTable", "ObpKernelHandleTable"):
        assert info.globals[name] == truth["globals"][name], name
        assert "checked" in info.sources[name]
    assert info.header_cookie == truth["header_cookie"]
    check_processes(windows, truth)
    check_handles(windows, truth)
    assert all(passed for _, passed, _ in info.checks), info.checks
