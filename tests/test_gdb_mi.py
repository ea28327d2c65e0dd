"""The MI driver (gdbhandles/mi.py) against a real gdb and a real QEMU (the stub guest)."""

import os
import time

import pytest

from gdbhandles.automation.mi import Gdb, MiError, MiTimeout, quote
from gdbstub_guest import KBASE, PATTERN_PHYS, qemu, settle


def test_quote_escapes_for_mi_cstrings():
    assert quote('a "b" \\c\nd') == '"a \\"b\\" \\\\c\\nd"'


def test_gdb_alone_console_json_and_errors():
    with Gdb() as gdb:
        assert gdb.console("output 6*7") == "42"
        assert gdb.json("python print('[1, {\"a\": null}]')") == [1, {"a": None}]
        with pytest.raises(MiError, match="Undefined command"):
            gdb.console("frobnicate")
        with pytest.raises(MiError, match="printed no JSON"):
            gdb.json("echo hello\\n")
        with pytest.raises(MiError) as exc:
            gdb.console("python raise ValueError('boom')")
        assert "boom" in exc.value.log
        # the driver stays usable after errors
        assert gdb.console("output 1+1") == "2"


def test_timeout_is_reported():
    with Gdb() as gdb:              # the short limit only for the command (gdb starts slowly under load)
        with pytest.raises(MiTimeout):
            gdb.console("python import time; time.sleep(2)", timeout=0.5)


def test_close_leaves_no_gdb_process():
    gdb = Gdb()
    pid = gdb.pid
    assert os.path.exists(f"/proc/{pid}")
    gdb.close()
    assert not os.path.exists(f"/proc/{pid}")
    gdb.close()   # idempotent


def test_a_command_to_a_killed_gdb_is_an_mi_error_not_a_broken_pipe():
    """The race CI met: gdb SIGKILLed, then a write to its stdin. Said as gdb's exit, like a read
    finding it gone (a BrokenPipeError would pass for `| head` closing our stdout)."""
    with Gdb() as gdb:
        os.kill(gdb.pid, 9)
        gdb._ctrl.gdb_process.wait()            # no reader left: the write fails with EPIPE
        with pytest.raises(MiError, match="gdb exited with status -9"):
            gdb.send("-gdb-version")


@pytest.mark.integration
def test_attach_read_run_interrupt():
    with qemu() as port, Gdb() as gdb:
        started = time.monotonic()
        gdb.connect("127.0.0.1", port)
        assert time.monotonic() - started < 5
        settle(gdb)
        assert int(gdb.console("output/x $rip"), 16) >= KBASE
        out = gdb.console(f"x/2gx {KBASE + PATTERN_PHYS + 8:#x}")
        assert out.split()[1:3] == [f"0x{PATTERN_PHYS + 8:016x}", f"0x{PATTERN_PHYS + 16:016x}"]
        threads = gdb.console("info threads")
        assert "CPU#0" in threads and "CPU#1" in threads
        gdb.cont()
        with pytest.raises(MiError, match="running"):
            gdb.console(f"x/gx {KBASE + PATTERN_PHYS:#x}")
        stop = gdb.interrupt()
        assert stop["payload"]["reason"] == "signal-received"
        assert gdb.console("output/x $r15") == "0x1122334455667788"


@pytest.mark.integration
def test_stop_record_read_with_the_interrupt_answer_is_kept():
    """A loaded machine reads gdb late: `^done` of -exec-interrupt and the `*stopped` that
    follows it then arrive in one read. The stop must still be there for wait_async."""
    with qemu() as port, Gdb(timeout=30) as gdb:
        gdb.connect("127.0.0.1", port)
        for _ in range(3):
            gdb.cont()
            token = gdb.send("-exec-interrupt")
            time.sleep(1)       # a busy reader: gdb has answered and reported the stop meanwhile
            gdb.result(token)
            stop = gdb.wait_async("stopped", timeout=10)
            assert stop["payload"]["reason"] == "signal-received"
