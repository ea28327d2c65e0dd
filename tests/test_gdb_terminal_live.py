"""gdb on a terminal (a pty, as a user runs it): colours through gdb's `style enabled`, the
prompt last after an auto-paused command (and back after `handle pause`'s SIGINT line), and
JSON through `pipe` while the walk's side lines stay on the terminal."""

from __future__ import annotations

import json
import re

import pytest

from boot import booted                       # vm-images/, put on sys.path by conftest.py
from pty_gdb import ANSI, READLINE, PtyGdb
from test_gdb_live import GDBINIT, key
from winguest.cache import guest as cached_guest

pytestmark = pytest.mark.integration

BOLD, CYAN = "\x1b[1m", "\x1b[36m"


@pytest.fixture(scope="module")
def terminal():
    directory = cached_guest("19041", "default")
    truth = json.loads((directory / "truth.json").read_text())
    with booted(directory) as vm, PtyGdb("-ex", f"source {GDBINIT}", "-ex",
                                         f"target remote {vm.gdb}") as gdb:
        gdb.expect(r"\(gdb\) ")
        yield gdb, truth, vm


def test_colours_follow_gdb_style_setting(terminal):
    gdb, truth, _ = terminal
    kind = truth["handles"][-1]["type"]
    text = gdb.command(f"handle walk all --type {kind}")
    assert re.search(r"\x1b\[1m *PID", text) and f"{CYAN}{kind}" in text      # header bold, types in colour
    assert ANSI.sub("", text).split()[0] == "PID"
    lookup = gdb.command("handle lookup 4 0x4")
    assert CYAN in lookup and "type" in ANSI.sub("", lookup)
    error = gdb.command("handle walk all --type NoSuchType")
    assert "\x1b[31munknown object type" in error                        # errors in colour
    gdb.command("set style enabled off")
    try:
        for command in (f"handle walk all --type {kind}", "handle ps", "handle lookup 4 0x4",
                        "handle walk all --type NoSuchType"):
            assert not ANSI.search(gdb.command(command)), command
    finally:
        gdb.command("set style enabled on")


def test_pipe_of_json_gets_only_json_on_a_terminal(terminal, tmp_path):
    gdb, truth, _ = terminal
    out = tmp_path / "walk.json"
    text = gdb.command(f"pipe handle walk all --json | python3 -m json.tool > {out}")
    assert sorted(json.loads(out.read_text()), key=key) == sorted(truth["handles"], key=key)
    assert re.search(r"\d+ processes, \d+ handles", text)              # the summary: on the terminal
    assert gdb.command("print $_shell_exitcode").strip().endswith("= 0")


def test_auto_paused_commands_end_with_their_prompt(terminal):
    """Auto-pause holds the VM in a way gdb does not see: no SIGINT stop after the command, the
    prompt is the last thing on the terminal. `handle pause` is a stop gdb reports: the prompt
    comes back below its SIGINT line."""
    gdb, truth, vm = terminal
    gdb.command(f"set handle qmp {vm.qmp}")
    gdb.command("set handle auto-pause on")
    gdb.command("continue &")
    try:
        for command in ("handle ps", "handle walk 4 --type File"):
            text = gdb.command(command)
            assert "SIGINT" not in text and ANSI.sub("", text).split()[0] in ("PID", "4"), text
            after_prompt = gdb.mark
            gdb.send("handle vmstatus")                  # the next line typed: nothing came between
            echo = gdb.expect(re.escape("handle vmstatus"))
            assert READLINE.sub("", gdb.seen[after_prompt:echo.start()]) == ""
            gdb.expect(r"\(gdb\) ")
            assert "QEMU: running; gdb: running" in gdb.seen[echo.end():gdb.mark]
        assert "gdb reports the stop" in gdb.command("handle pause")
        gdb.expect(r"Program received signal SIGINT, Interrupt\.[^\n]*\n[^\n]*\n")
        gdb.expect(r"\(gdb\) ")
        assert "QEMU: paused; gdb: stopped" in gdb.command("handle vmstatus")
    finally:
        gdb.command("set handle auto-pause off")
