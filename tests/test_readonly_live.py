"""The read-only promise, measured: guest RAM (hashed through QMP) and every register are the
same before and after a gdb session that runs every handle command, every setting and every
hostile argument we know of. The last step writes one byte on purpose, to show the hash sees it."""

from __future__ import annotations

import hashlib

import pytest

from boot import booted
from gdbhandles import commandspec
from gdbhandles.automation.mi import Gdb, MiError
from gdbhandles.automation.qmp import Qmp
from test_qmp_live import attach
from winguest.cache import guest as cached_guest

pytestmark = pytest.mark.integration

# hostile handle arguments: (text, what the one-line error must say)
HOSTILE = [
    ("'*(unsigned long long*)$rsp = 0x4'", "assignment '='"),
    ("'*(unsigned long long*)($rsp+8) |= 1'", "assignment '|='"),
    ("'$rsp = 0'", "assignment '='"), ("'$rax++'", "'++'"), ("-- '--$rcx'", "'--'"),
    ("'$rax <<= 1'", "assignment '<<='"),
    ("'malloc(16)'", "would run code"), ("'$_as_string(1)'", "would run code"),
    ("'(*(long(*)())$rip)()'", "function calls"), ("'\"abc\"'", "string literals"),
    (str((1 << 64) + 4), "larger than 64 bits"), ("0x10000000000000004", "larger than 64 bits"),
    ("-4", "negative"), ("-3", "negative"),
]


def ram_hash(q: Qmp, path) -> str:
    q.pmemsave(str(path), q.ram_size())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.unlink()
    return digest


def registers(gdb: Gdb) -> str:
    return gdb.console("info registers") + gdb.console("info all-registers")


def session_of_everything(gdb: Gdb, settings: list[str]) -> int:
    """Every gdb command (example and --help), every setting, every hostile argument; how many ran."""
    ran = 0
    for command in commandspec.COMMANDS.values():
        if "gdb" not in command.front_ends or command.name == "resume":      # resume runs the guest
            continue
        for text in (command.example, f"{command.name} --help") + \
                ((f"{command.example} --json",) if command.json else ()):
            try:
                gdb.console(f"handle {text}", timeout=120)
            except MiError as exc:
                assert "\n" not in exc.message.strip() and "Traceback" not in exc.log, exc.log
            ran += 1
    for name in settings:
        for value in ("/dev/zero", "on", "off", ""):
            try:
                gdb.console(f"set handle {name} {value}")
            except MiError:
                pass
            gdb.console(f"show handle {name}")
            ran += 1
    for process in ("4", "672", "lsass.exe"):
        for text, message in HOSTILE:
            with pytest.raises(MiError) as exc:
                gdb.console(f"handle lookup {process} {text}")
            assert message in exc.value.message and "\n" not in exc.value.message.strip(), exc.value.message
            ran += 1
    for text in ("-4", str(1 << 64)):
        with pytest.raises(MiError, match="negative|larger than 64 bits"):
            gdb.console(f"handle lookup {text} 4")
        ran += 1
    return ran


def test_a_hostile_session_changes_no_byte_of_guest_ram(tmp_path):
    with booted(cached_guest("19041", "default")) as vm, Gdb(timeout=120) as gdb:
        attach(vm, gdb)                            # gdb holds the VM stopped from here on
        settings = gdb.console("python from gdbhandles.gdb import settings; print(' '.join(settings.SETTINGS))")
        with Qmp(vm.qmp) as q:
            before, regs_before = ram_hash(q, tmp_path / "ram.raw"), registers(gdb)
        ran = session_of_everything(gdb, settings.split())
        gdb.console(f"set handle qmp {vm.qmp}")
        assert ran > 60
        with Qmp(vm.qmp) as q:
            assert ram_hash(q, tmp_path / "ram.raw") == before
            assert registers(gdb) == regs_before
            gdb.console("set var *(unsigned char*)$rsp = *(unsigned char*)$rsp ^ 1")   # the control
            assert ram_hash(q, tmp_path / "ram.raw") != before
