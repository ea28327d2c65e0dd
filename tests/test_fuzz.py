"""Random damage: bytes of the guest's kernel structures flipped (seeded, a few hundred cases).

The structures are the ones a walk reads: the process list links and fields, _HANDLE_TABLEs,
top and low-level table pages, object headers and the optional headers before them, name
strings, File names and devices, key control blocks, ObTypeIndexTable. Each case patches 1-4
of them below the engine's cache, then runs `processes()`, a full walk and a few lookups.
Whatever the damage, only our errors (HandleError) may come out, the backend reads stay under
a budget (a runaway walk raises Runaway, which is no HandleError, so the test fails), and the
records stay under what the damaged tables can hold.
"""
from __future__ import annotations

import dataclasses
import json
import random

import pytest

from gdbhandles.engine import Windows
from gdbhandles.errors import HandleError
from gdbhandles.windows.memory import AddressSpace, DumpFile, PhysicalMemory

READ_BUDGET = 60_000           # backend reads per case; a clean open + walk needs about 4,000
PER_FLIP_RECORDS = 255 * 512   # one damaged pointer can bring in one table's worth of pages
CASES = {"19041": 150, "7601": 100}


class Runaway(Exception):
    """More backend reads than any honest walk of this guest needs (deliberately no HandleError)."""


class PatchedDump:
    """A dump with bytes overwritten (by physical address), counting backend reads."""

    def __init__(self, dump: DumpFile, patches: dict[int, int]):
        self.dump = dump
        self.patches = patches
        self.reads = 0

    def read(self, paddr: int, size: int) -> bytes:
        self.reads += 1
        if self.reads > READ_BUDGET:
            raise Runaway(f"{self.reads} backend reads")
        data = self.dump.read(paddr, size)
        hits = [a for a in self.patches if paddr <= a < paddr + size]
        if not hits:
            return data
        out = bytearray(data)
        for address in hits:
            out[address - paddr] = self.patches[address]
        return bytes(out)


def targets(windows: Windows, truth: dict) -> list[tuple[int, int]]:
    """(virtual address, size) of every structure a walk reads, from truth and the clean memory."""
    layout, space = windows.kernel.layout, windows.kernel.space
    off = lambda s, f: layout.field(s, f).offset  # noqa: E731
    out = [(truth["globals"]["ObTypeIndexTable"], 8 * len(truth["types"]) + 24)]
    for p in truth["processes"]:
        for name in ("ActiveProcessLinks", "ObjectTable", "UniqueProcessId", "ImageFileName"):
            f = layout.field("_EPROCESS", name)
            out.append((p["eprocess"] + f.offset, f.size))
        if p["handle_table"]:
            out.append((p["handle_table"], 0x40))
            top = p["table_code"] & ~3
            out.append((top, 0x1000 if p["level"] == 0 else 8 * (p["next_handle_needing_pool"] // 0x400)))
    for h in truth["handles"][::3]:
        header = h["object"] - 0x30
        out.append((header - 0x40, 0x70))
        if h["type"] == "File":
            out.append((h["object"] + off("_FILE_OBJECT", "DeviceObject"), 8))
            out.append((h["object"] + off("_FILE_OBJECT", "FileName"), 16))
        if h["type"] == "Key":
            kcb = space.u64(h["object"] + off("_CM_KEY_BODY", "KeyControlBlock"))
            out.append((kcb + off("_CM_KEY_CONTROL_BLOCK", "ParentKcb"), 8))
            out.append((kcb + off("_CM_KEY_CONTROL_BLOCK", "NameBlock"), 8))
    return out


def flip(rng: random.Random, space: AddressSpace, spans, patches: dict[int, int]) -> None:
    """Spoil one structure at a random place: a random byte, a bit, all ones or zero, or (one
    time in four) an aligned qword made to point at another structure (loops, aliases)."""
    while True:
        va, size = rng.choice(spans)
        try:
            at = space.translate(va + rng.randrange(size))
            break
        except HandleError:            # the span reaches into an unmapped page: choose again
            continue
    if rng.random() < 0.25:
        pointer = rng.choice(spans)[0].to_bytes(8, "little")
        at &= ~7
        patches.update({at + i: pointer[i] for i in range(8)})
        return
    old = space.phys.backend.read(at, 1)[0]
    patches[at] = rng.choice([rng.randrange(256), old ^ (1 << rng.randrange(8)), 0xFF, 0])


@pytest.mark.parametrize("profile", sorted(CASES))
def test_random_damage_raises_only_our_errors_and_stays_bounded(built_guest, profile):
    directory = built_guest(profile)
    truth = json.loads((directory / "truth.json").read_text())
    dump = DumpFile(directory / "memory.raw")
    clean = Windows.open(PhysicalMemory(dump))
    spans = targets(clean, truth)
    kernel = clean.kernel
    handles = [(h["pid"], h["handle"]) for h in truth["handles"]]
    for case in range(CASES[profile]):
        rng = random.Random(f"{profile}|{case}")
        patches: dict[int, int] = {}
        flips = rng.randrange(1, 5)
        for _ in range(flips):
            flip(rng, kernel.space, spans, patches)
        backend = PatchedDump(dump, patches)
        phys = PhysicalMemory(backend)
        windows = Windows(dataclasses.replace(kernel, phys=phys, space=AddressSpace(phys, kernel.space.dtb)), [])
        records, said = 0, []
        try:
            windows.processes()
        except HandleError:
            pass
        try:
            for _ in windows.walk(warn=said.append):
                records += 1
        except HandleError:
            pass
        assert all("\n" not in str(w) for w in said + windows.warnings), f"case {case}"
        for pid, handle in rng.sample(handles, 3):
            try:
                windows.lookup(pid, handle)
            except HandleError:
                pass
        assert records <= len(handles) + flips * PER_FLIP_RECORDS, f"case {case}: {records} records"
