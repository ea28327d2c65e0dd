"""The independent check: unmodified volatility3 reads a dump of the running guest (QMP
pmemsave) with the guest's symbols.json, and its processes and handles equal truth.json.

Only formatting is normalised: volatility names a Process `image Pid N` (with the 15-byte
ImageFileName where truth has the full image name) and a Thread
`Tid T Pid P`, leaves `\\REGISTRY\\` off key paths, prints "" for no name, shows addresses
without the upper-half sign extension, and on Windows 7 reports GrantedAccess with the
ProtectFromClose bit (0x2000000) that Windows keeps in it.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_boot import pmemsave

pytestmark = [pytest.mark.integration, pytest.mark.slow]
VOL = Path(sys.executable).with_name("vol")
ADDRESS = (1 << 48) - 1


def volatility(tmp_path: Path, dump: Path, symbols: Path, plugin: str) -> list[dict]:
    isf = json.loads(symbols.read_text())["metadata"]["windows"]["pdb"]
    table = tmp_path / "symbols" / "windows" / "ntkrnlmp.pdb"
    table.mkdir(parents=True, exist_ok=True)
    shutil.copy(symbols, table / f"{isf['GUID']}-{isf['age']}.json")
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    run = subprocess.run([str(VOL), "-q", "-r", "json", "--offline", "--cache-path", str(cache),
                          "-s", str(tmp_path / "symbols"), "-f", str(dump), plugin],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


def as_volatility(record: dict, truth: dict) -> tuple:
    name, kind = record["name"], record["type"]
    if kind == "Process":
        image, _, pid = name.rpartition("(")
        name = f"{image[:15]} Pid {pid.rstrip(')')}"
    elif kind == "Thread":
        owner = {str(t["tid"]): p["pid"] for p in truth["processes"] for t in p["threads"]}[name]
        name = f"Tid {name} Pid {owner}"
    elif kind == "Key":
        name = name.removeprefix("\\REGISTRY\\")
    access = record["granted_access"]
    if truth["profile"]["build"] < 9200 and record["attributes"] & 1:
        access |= 0x2000000
    return record["pid"], record["handle"], record["object"] & ADDRESS, kind, name or "", access


@pytest.mark.parametrize("profile", ["7601", "9600", "14393", "17763", "18362", "19041", "20348", "22000"])
def test_volatility_agrees_with_truth(booted_guest, tmp_path, profile):
    g = booted_guest(profile)
    dump = pmemsave(g, tmp_path / "dump.raw")
    symbols = g.dir / "symbols.json"

    processes = volatility(tmp_path, dump, symbols, "windows.pslist")
    assert sorted((p["PID"], p["ImageFileName"]) for p in processes) == \
        sorted((p["pid"], p["image_file_name"]) for p in g.truth["processes"])

    handles = volatility(tmp_path, dump, symbols, "windows.handles")
    got = sorted((h["PID"], h["HandleValue"], h["Offset"], h["Type"], h["Name"] or "", h["GrantedAccess"])
                 for h in handles)
    want = sorted(as_volatility(r, g.truth) for r in g.truth["handles"])
    assert len(got) == len(want) and got == want
