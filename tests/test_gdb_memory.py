"""gdbmemory.py inside a real gdb attached to real QEMU (the stub guest, not Windows)."""

import json
import textwrap
import time
from pathlib import Path

import pytest

from gdbhandles.automation.mi import Gdb, MiError
from gdbstub_guest import KBASE, PATTERN_PHYS, PATTERN_SIZE, RAM_MIB, qemu, settle

REPO = Path(__file__).resolve().parents[1]

HELPERS = textwrap.dedent(f"""
    import json, struct, sys, time
    sys.path.insert(0, {str(REPO)!r})
    import gdb
    from gdbhandles.gdb import memory as gdbmemory

    def phymode():
        return gdb.execute("maintenance packet qqemu.PhyMemMode", to_string=True).split('"')[-2]

    def out(value):
        gdb.write(json.dumps(value) + "\\n")

    def pattern_check():
        phys = gdbmemory.GdbPhysical()
        started = time.perf_counter()
        data = phys.read({PATTERN_PHYS:#x}, {PATTERN_SIZE:#x})
        elapsed = time.perf_counter() - started
        words = struct.unpack(f"<{{len(data) // 8}}Q", data)
        across = phys.read({PATTERN_PHYS + 0xff8:#x}, 16)
        out({{"ok": all(w == {PATTERN_PHYS:#x} + 8 * i for i, w in enumerate(words)),
              "size": len(data), "seconds": elapsed, "across": across.hex(),
              "mode_after": phymode(), "ram": phys.ram}})

    def mode_restored_after_error():
        phys = gdbmemory.GdbPhysical()
        try:
            with phys.session():
                inside = phymode()
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        out({{"inside": inside, "after": phymode()}})

    def past_ram():
        phys = gdbmemory.GdbPhysical()
        try:
            phys.read({RAM_MIB << 20:#x}, 8)
        except gdbmemory.UnreadablePage as exc:
            out({{"error": str(exc)}})
        else:
            out({{"error": None}})

    def long_read(started):
        phys = gdbmemory.GdbPhysical()
        with phys.session():
            phys.read({PATTERN_PHYS:#x}, 4096)
            open(started, "w").close()          # the test interrupts once this exists
            end = time.monotonic() + 30
            while time.monotonic() < end:
                phys.read({PATTERN_PHYS:#x}, 4096)

    def registers():
        out(gdbmemory.vcpu_registers() + [{{"selected_after": gdb.selected_thread().num}}])

    def target_state():
        try:
            gdbmemory.require_stopped_target()
        except gdbmemory.HandleError as exc:
            out({{"error": type(exc).__name__, "message": str(exc)}})
        else:
            out({{"error": None}})
""")


@pytest.fixture(scope="module")
def stub_gdb(tmp_path_factory):
    with qemu() as port, Gdb() as gdb:
        load_helpers(gdb, tmp_path_factory.mktemp("gdbmem"))
        gdb.connect("127.0.0.1", port)
        settle(gdb)
        yield gdb


def load_helpers(gdb, directory: Path) -> None:
    """The helpers as a module `gdbmem_helpers` inside gdb's Python."""
    (directory / "gdbmem_helpers.py").write_text(HELPERS)
    gdb.console(f"python import sys; sys.path.insert(0, {str(directory)!r}); import gdbmem_helpers as h")


def call(gdb, function):
    return json.loads(gdb.console(f"python h.{function}()"))


@pytest.mark.integration
def test_physical_reads_match_the_guest_pattern(stub_gdb):
    result = call(stub_gdb, "pattern_check")
    assert result["ok"] and result["size"] == PATTERN_SIZE
    assert result["across"] == (PATTERN_PHYS + 0xff8).to_bytes(8, "little").hex() + \
        (PATTERN_PHYS + 0x1000).to_bytes(8, "little").hex()
    assert result["mode_after"] == "0"
    assert result["seconds"] < 1.0, "64 KiB over the stub should take milliseconds"
    assert any(a <= 0x100000 and b == RAM_MIB << 20 for a, b in result["ram"])
    # virtual reads through gdb still see the virtual view (dcache flushed, mode off)
    text = stub_gdb.console(f"x/gx {KBASE + PATTERN_PHYS + 8:#x}")
    assert text.split()[1] == f"0x{PATTERN_PHYS + 8:016x}"


@pytest.mark.integration
def test_physical_mode_is_switched_off_after_an_error(stub_gdb):
    assert call(stub_gdb, "mode_restored_after_error") == {"inside": "1", "after": "0"}


@pytest.mark.integration
def test_ctrl_c_in_a_long_read_switches_physical_mode_off(stub_gdb, tmp_path):
    started_file = tmp_path / "reading"
    token = stub_gdb.send(f'-interpreter-exec console "python h.long_read(\'{started_file}\')"')
    deadline = time.monotonic() + 60
    while not started_file.exists():            # physical mode is on and reads are under way
        assert time.monotonic() < deadline, "the long read never started"
        time.sleep(0.02)
    stub_gdb.ctrl_c()
    started = time.monotonic()
    with pytest.raises(MiError) as exc:
        stub_gdb.result(token, timeout=10)
    assert time.monotonic() - started < 5
    assert "KeyboardInterrupt" in exc.value.log
    assert stub_gdb.console("maintenance packet qqemu.PhyMemMode").split('"')[-2] == "0"


@pytest.mark.integration
def test_reads_past_ram_are_refused(stub_gdb):
    error = call(stub_gdb, "past_ram")["error"]
    assert error == f"unreadable physical address {RAM_MIB << 20:#x} (not guest RAM)"


@pytest.mark.integration
def test_registers_of_every_vcpu_selected_first(stub_gdb):
    regs = call(stub_gdb, "registers")
    assert [r["thread"] for r in regs[:2]] == [1, 2] and regs[2] == {"selected_after": 1}
    cpu0 = regs[0]
    assert cpu0["gs_base"] == KBASE + 0x900000          # masked: gdb gives it negative
    assert cpu0["rip"] >= KBASE and cpu0["cs"] == 8 and cpu0["efer"] & 0x500 == 0x500
    assert cpu0["cr3"] & ~0xfff and regs[1]["cr0"] & 0x80000000 == 0   # the AP never left real mode
    stub_gdb.console("thread 2")
    try:
        regs = call(stub_gdb, "registers")
        assert [r["thread"] for r in regs[:2]] == [2, 1] and regs[2] == {"selected_after": 2}
    finally:
        stub_gdb.console("thread 1")


@pytest.mark.integration
def test_running_target_is_refused(stub_gdb):
    assert call(stub_gdb, "target_state") == {"error": None}
    stub_gdb.cont()
    try:
        time.sleep(0.05)
        state = call(stub_gdb, "target_state")
    finally:
        stub_gdb.interrupt()
    assert state["error"] == "TargetRunning" and "running" in state["message"]


def test_no_target_is_refused(tmp_path):
    with Gdb() as gdb:
        load_helpers(gdb, tmp_path)
        state = call(gdb, "target_state")
    assert state["error"] == "NoTarget" and "target remote" in state["message"]


def test_no_physical_mode_without_qemu(tmp_path):
    """Without a target gdb refuses the packet: the backend says it is unsupported."""
    with Gdb() as gdb:
        load_helpers(gdb, tmp_path)
        assert gdb.console("python h.out(h.gdbmemory.GdbPhysical().supported)") .strip() == "false"
        with pytest.raises(MiError) as exc:
            gdb.console("python h.gdbmemory.GdbPhysical().read(0, 8)")
        assert "no physical memory mode (Qqemu.PhyMemMode)" in exc.value.log
