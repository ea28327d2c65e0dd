"""Files a user names, checked before they are read: a FIFO as a dump does not block, a device
as a profile is not read for ever, a broken user ISF stops discovery even for a shipped GUID,
a truncated dump says so, and golden files are validated and written atomically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gdbhandles.automation import regress
from gdbhandles.engine import Windows
from gdbhandles.errors import HandleError
from gdbhandles.windows.memory import DumpFile

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "gdbhandles.cli"]


def gdbhandles(*args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=300)


def one_line_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    return run.stderr.strip()


def test_fifo_as_dump_does_not_block(tmp_path):
    fifo = tmp_path / "dump.fifo"
    os.mkfifo(fifo)
    with pytest.raises(HandleError, match="is a FIFO, not a regular file"):
        DumpFile(fifo)
    assert "is a FIFO" in one_line_error(gdbhandles("ps", "--dump", str(fifo)))


def test_devices_are_not_read(built_guest):
    dump = built_guest("19041") / "memory.raw"
    for device, kind in (("/dev/zero", "a character device"), ("/dev/null", "a character device")):
        assert f"is {kind}" in one_line_error(gdbhandles("ps", "--dump", str(dump), "--profile", device))
        assert f"is {kind}" in one_line_error(gdbhandles("ps", "--dump", device))
    assert "is a directory" in one_line_error(gdbhandles("ps", "--dump", str(dump), "--profile", "/tmp"))


def test_a_broken_user_isf_stops_even_when_the_guid_is_shipped(built_guest, tmp_path):
    dump = built_guest("19041") / "memory.raw"          # its GUID is one we ship
    assert gdbhandles("ps", "--dump", str(dump)).returncode == 0
    broken = tmp_path / "broken.json"
    broken.write_text('{"user_types": ')
    assert "cannot read ISF profile" in one_line_error(gdbhandles("ps", "--dump", str(dump), "--profile", str(broken)))
    missing = tmp_path / "missing.json"
    assert "missing.json" in one_line_error(gdbhandles("ps", "--dump", str(dump), "--profile", str(missing)))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000)
    assert "cannot read ISF profile" in one_line_error(gdbhandles("ps", "--dump", str(dump), "--profile", str(deep)))
    bomb = tmp_path / "bomb.json.xz"            # 300 MiB of spaces, a few KiB compressed
    subprocess.run(f"head -c 300M /dev/zero | tr '\\0' ' ' | xz -1 > {bomb}", shell=True, check=True)
    assert "larger than 256 MiB" in one_line_error(gdbhandles("ps", "--dump", str(dump), "--profile", str(bomb)))


def test_a_truncated_dump_says_truncated(built_guest, tmp_path):
    whole = (built_guest("19041") / "memory.raw").read_bytes()
    for size in (1 << 20, 16 << 20):
        cut = tmp_path / f"cut{size}.raw"
        cut.write_bytes(whole[:size])
        assert "the dump is truncated" in one_line_error(gdbhandles("walk", "--dump", str(cut)))
        with pytest.raises(HandleError, match="truncated"):
            list(Windows.open(DumpFile(cut)).walk())


def test_output_to_a_full_device_is_one_line(built_guest):
    dump = built_guest("19041") / "memory.raw"
    with open("/dev/full", "w") as full:
        run = gdbhandles("walk", "--dump", str(dump), stdout=full)
    assert "No space left on device" in one_line_error(run)


RECORD = {"pid": 4, "process": "System", "handle": 4, "object": 0xffff8000, "type": "File", "name": None,
          "granted_access": 0x1f, "attributes": 0}
BAD_GOLDEN = {
    "not JSON": ("[{", "is not JSON"),
    "not a list": ('{"pid": 4}', "is not a list of handle records"),
    "a string record": ('["x"]', "record 0 is not an object"),
    "missing field": (json.dumps([{k: v for k, v in RECORD.items() if k != "object"}]), "record 0 has no 'object'"),
    "pid as a list": (json.dumps([{**RECORD, "pid": [4]}]), "field 'pid' is list, not int"),
    "handle as a string": (json.dumps([{**RECORD, "handle": "0x4"}]), "field 'handle' is str, not int"),
    "bool handle": (json.dumps([{**RECORD, "handle": True}]), "field 'handle' is bool"),
    "negative pid": (json.dumps([{**RECORD, "pid": -4}]), "field 'pid' is out of range"),
    "huge object": (json.dumps([{**RECORD, "object": 1 << 70}]), "field 'object' is out of range"),
    "name as a number": (json.dumps([{**RECORD, "name": 5}]), "field 'name' is int, not str"),
    "repeated record": (json.dumps([RECORD, RECORD]), "repeats pid 4 handle 0x4"),
    "deep nesting": ("[" * 100000, "is not JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_GOLDEN))
def test_bad_golden_files_exit_2_before_qemu_starts(tmp_path, case):
    text, message = BAD_GOLDEN[case]
    golden = tmp_path / "golden.json"
    golden.write_text(text)
    run = gdbhandles("regress", "--qemu", "-machine none", "--expect", str(golden))
    assert message in one_line_error(run)


def test_golden_paths_that_cannot_be_used(tmp_path):
    fifo = tmp_path / "golden.fifo"
    os.mkfifo(fifo)
    assert "is a FIFO" in one_line_error(gdbhandles("regress", "--qemu", "-machine none", "--expect", str(fifo)))
    assert "no golden file" in one_line_error(
        gdbhandles("regress", "--qemu", "-machine none", "--expect", str(tmp_path / "none.json")))
    missing_dir = tmp_path / "no" / "such" / "golden.json"
    assert "no directory" in one_line_error(
        gdbhandles("regress", "--qemu", "-machine none", "--expect", str(missing_dir), "--update"))
    assert "no closing quotation" in one_line_error(gdbhandles("run", "--qemu", "-name 'abc", "--", "ps"))


def test_gdb_missing_from_path(tmp_path):
    bin_dir = tmp_path / "bin"                 # QEMU is found, gdb is not
    bin_dir.mkdir()
    qemu = subprocess.run(["which", "qemu-system-x86_64"], capture_output=True, text=True).stdout.strip()
    (bin_dir / "qemu-system-x86_64").symlink_to(qemu)
    run = subprocess.run([*CLI, "run", "--qemu", "-machine pc -nodefaults -display none", "--", "ps"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PATH": str(bin_dir), "TMPDIR": str(tmp_path)})
    assert "gdb not found in PATH" in one_line_error(run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]      # no QEMU, no private dir


def test_golden_save_is_atomic_and_validated(tmp_path):
    golden = tmp_path / "golden.json"
    regress.save(golden, [RECORD])
    assert regress.load(golden) == [RECORD]
    with pytest.raises(HandleError, match="field 'pid'"):
        regress.save(golden, [{**RECORD, "pid": "4"}])
    assert regress.load(golden) == [RECORD]              # the old file stayed whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["golden.json"]
    assert golden.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
