"""The `handle` commands' own behaviour in a real gdb: loading, help, arguments, settings, errors.

Uses the stub guest (long mode, not Windows) and a QEMU with nothing to boot; the Windows
guests are in test_gdb_live.py.
"""

import shutil
from pathlib import Path

import pytest

from gdbhandles.automation.mi import Gdb, MiError
from gdbstub_guest import qemu, settle

REPO = Path(__file__).resolve().parents[1]
GDBINIT = REPO / "gdbinit.py"


def one_line_error(gdb, command) -> str:
    """Run a command that must fail; its error is one line and no traceback was printed."""
    with pytest.raises(MiError) as exc:
        gdb.console(command)
    message = exc.value.message
    assert "\n" not in message.strip(), message
    assert "Traceback" not in exc.value.log and "Python Exception" not in exc.value.log, exc.value.log
    return message


@pytest.fixture(scope="module")
def loaded():
    """gdb with the extension and no target."""
    with Gdb() as gdb:
        gdb.console(f"source {GDBINIT}")
        yield gdb


def test_help_lists_every_subcommand_and_setting(loaded):
    text = loaded.console("help handle")
    for word in ("handle lookup", "handle walk", "handle ps", "handle info",
                 "set handle profile", "set handle qmp", "set handle progress"):
        assert word in text
    assert "usage: handle walk" in loaded.console("handle walk --help")
    assert "Example: handle lookup" in loaded.console("handle lookup --help")


def test_workflow_commands_and_functions_have_help_with_an_example(loaded):
    assert all(word in loaded.console("help handle") for word in ("find", "cid", "mark", "diff"))
    for name, example in (("find", "handle find 0x"), ("cid", "handle cid 672"), ("mark", "handle mark before"),
                          ("diff", "handle diff before"), ("walk", "walk 672 --free"),
                          ("lookup", "handle lookup $rcx")):
        assert example in loaded.console(f"help handle {name}"), name
    for name in ("handle_object", "handle_type", "handle_name", "handle_access"):
        assert f"Usage: ${name}(HANDLE [, PID])" in loaded.console(f"help function {name}")
    assert "no target" in one_line_error(loaded, "output $handle_type(4)")


def test_sourcing_twice_changes_nothing(loaded):
    before = loaded.console("help handle")
    loaded.console(f"source {GDBINIT}")
    assert loaded.console("help handle") == before


def test_bad_arguments_are_one_line_usage_errors(loaded):
    assert one_line_error(loaded, "handle lookup").startswith(
        "handle lookup: the following arguments are required: handle (usage: handle lookup [-h] [--json] "
        "[--output FILE] [process] handle)")
    assert "unrecognized arguments: --frob" in one_line_error(loaded, "handle walk all --frob")
    assert "not a number or expression: $nosuchvar+" in one_line_error(loaded, "handle lookup 4 $nosuchvar+")
    assert "unknown subcommand 'frob'" in one_line_error(loaded, "handle frob")


def test_integer_arguments_accept_decimal_hex_and_expressions(loaded):
    def ev(text):
        return int(loaded.console(f"python print(__import__('gdbhandles.gdb.commands').gdb.commands.value({text!r}))"))

    loaded.console("set $myhandle = 0x1c")
    assert ev("28") == 28 and ev("0x1c") == 28 and ev("$myhandle") == 28 and ev("$myhandle + 4") == 32
    assert ev("010") == 10                      # decimal, not gdb's octal
    assert ev("-1") == ev("0xffffffffffffffff") == 2**64 - 1
    assert ev("-2") == 2**64 - 2

    def proc(text):
        return loaded.console(f"python print(repr(__import__('gdbhandles.commandspec').commandspec.process({text!r})))")

    assert proc("lsass.exe") == "'lsass.exe'\n" and proc("612") == "612\n" and proc("0x264") == "612\n"


def test_settings(loaded, built_guest):
    assert "(none: shipped profiles)" in loaded.console("show handle profile")
    assert one_line_error(loaded, "set handle profile /no/such/isf.json") == "no such file: /no/such/isf.json"
    assert "(none: shipped profiles)" in loaded.console("show handle profile")
    profile = Path(loaded.console("python print(__import__('gdbhandles').__file__)").strip()).parent
    not_isf = profile / "data" / "windows-x64-offsets.json"
    assert one_line_error(loaded, f"set handle profile {not_isf}") == f"{not_isf} is not a volatility3 ISF (no user_types)"
    assert one_line_error(loaded, "set handle profile /etc/passwd").startswith("cannot read ISF profile /etc/passwd")
    assert "(none: shipped profiles)" in loaded.console("show handle profile")
    isf = built_guest("19041") / "symbols.json"
    loaded.console(f"set handle profile {isf}")
    assert str(isf) in loaded.console("show handle profile")
    loaded.console("set handle profile")
    assert "(none: shipped profiles)" in loaded.console("show handle profile")
    loaded.console("set handle dtb 0x1ad000")        # a refused address keeps the accepted one
    assert one_line_error(loaded, "set handle dtb 0x1234") == "handle dtb: 0x1234 is not page-aligned (it must end in 000)"
    assert loaded.console("show handle dtb").strip() == "Kernel DTB: 0x1ad000"
    assert one_line_error(loaded, "set handle kernel-base nonsense").startswith("handle kernel-base: ")
    assert loaded.console("show handle kernel-base").strip() == "Kernel base: (discovered)"
    loaded.console("set handle dtb")
    assert loaded.console("show handle dtb").strip() == "Kernel DTB: (discovered)"
    loaded.console("set handle progress off")
    assert loaded.console("show handle progress").strip().endswith("off")
    loaded.console("set handle progress on")
    loaded.console("set handle qmp /tmp/some.sock")
    assert "/tmp/some.sock" in loaded.console("show handle qmp")
    shown = loaded.console("show handle")
    assert "ISF profile" in shown and "QMP socket" in shown and "Progress" in shown


def test_no_target(loaded):
    for command in ("handle ps", "handle walk", "handle lookup 4 4", "handle info"):
        assert one_line_error(loaded, command).startswith("no target: connect first")


def test_missing_dependencies_say_how_to_install(tmp_path):
    """gdbinit.py away from its venv and package: one clear message, no traceback."""
    alone = tmp_path / "gdbhandles" / "gdbinit.py"        # the loader, without its package or venv
    alone.parent.mkdir()
    shutil.copy(REPO / "gdbhandles" / "gdbinit.py", alone)
    with Gdb() as gdb:
        result = gdb.source(str(alone))
        message = result.log.strip()
        assert message.startswith("gdbhandles: cannot import") and "pip install" in message, message
        assert "\n" not in message and "Traceback" not in message
        assert "handle lookup" not in gdb.console("help handle")   # still gdb's signal command


@pytest.mark.integration
def test_running_target_and_non_windows_guest():
    with qemu() as port, Gdb() as gdb:
        gdb.console(f"source {GDBINIT}")
        gdb.connect("127.0.0.1", port)
        settle(gdb)
        gdb.cont()
        try:
            assert one_line_error(gdb, "handle walk").startswith("the target is running")
        finally:
            gdb.interrupt()
        for command in ("handle ps", "handle walk all --json", "handle lookup 4 4", "handle info"):
            message = one_line_error(gdb, command)
            assert "Windows" in message or "kernel" in message, message
        # physical mode was switched off again after the failed discovery
        assert gdb.console("maintenance packet qqemu.PhyMemMode").split('"')[-2] == "0"


@pytest.mark.integration
def test_guest_without_any_kernel():
    """QEMU with nothing to boot: the vCPU sits in the BIOS, real mode."""
    with qemu(kernel=False, smp=1) as port, Gdb() as gdb:
        gdb.console(f"source {GDBINIT}")
        gdb.connect("127.0.0.1", port)
        message = one_line_error(gdb, "handle ps")
        assert "Windows" in message or "kernel" in message, message
