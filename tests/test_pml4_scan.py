"""The last-resort PML4 scan: finds the kernel's page tables in a dump without registers or
start block, and on a large dump that is not Windows it is bounded and says how far it read."""
from __future__ import annotations

import json

import pytest

from gdbhandles.engine import Windows
from gdbhandles.errors import NotWindows
from gdbhandles.windows import kernel
from gdbhandles.windows.memory import DumpFile, PhysicalMemory
from test_engine_guests import patched_copy


def test_scan_finds_the_kernel_without_the_start_block(built_guest, tmp_path):
    directory = built_guest("19041")
    truth = json.loads((directory / "truth.json").read_text())
    copy = patched_copy(directory / "memory.raw", tmp_path / "nostub.raw",
                        {truth["low_stub"]: bytes(0x1000)})      # no processor start block
    windows = Windows.open(DumpFile(copy))
    info = windows.info()
    assert info.dtb_source == "self-referencing PML4 scan" and info.dtb == truth["kernel_dtb"]
    assert len(list(windows.walk())) == len(truth["handles"])


def test_scan_of_a_large_dump_that_is_not_windows_is_bounded(tmp_path, monkeypatch):
    """(With the bound lowered to 512 MiB, so the test reads 512 MiB rather than 4 GiB.)"""
    PML4_SCAN_LIMIT = 512 << 20
    monkeypatch.setattr(kernel, "PML4_SCAN_LIMIT", PML4_SCAN_LIMIT)
    dump = tmp_path / "large.raw"
    size = 2 * PML4_SCAN_LIMIT
    with open(dump, "wb") as f:
        f.truncate(size)
        for at in (0x200000, PML4_SCAN_LIMIT // 2, PML4_SCAN_LIMIT + 0x1000):
            f.seek(at)
            f.write(bytes(range(256)) * 64)      # data a scan must look at, but no page table
    memory = PhysicalMemory(DumpFile(dump))
    said = []
    with pytest.raises(NotWindows) as error:
        Windows.open(memory, progress=said.append)
    message = str(error.value)
    assert f"first {PML4_SCAN_LIMIT >> 20} MiB of {size >> 20} MiB" in message and "\n" not in message
    assert memory.stats.bytes <= PML4_SCAN_LIMIT + (1 << 20)
    scans = [text for text in said if text.startswith("scanning physical memory")]
    assert len(scans) == PML4_SCAN_LIMIT // (256 << 20) - 1
