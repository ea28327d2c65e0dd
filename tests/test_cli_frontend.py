"""The shell front end on built guests' memory.raw: advice that works on the shell, one-line
errors, JSON only on stdout, --output written atomically, tables that fit the terminal, and
render.escape on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gdbhandles import commandspec, render

REPO = Path(__file__).resolve().parents[1]
GDB_WORDS = ("handle ps", "handle walk", "handle lookup", "handle info", "set handle", "`handle")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gdbhandles.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=180, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def guest(built_guest):
    directory = built_guest("19041")
    return directory, json.loads((directory / "truth.json").read_text())


def error(*args) -> str:
    result = cli(*args)
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gdbhandles: "), result.stderr
    assert not any(word in result.stderr for word in GDB_WORDS), result.stderr
    return result.stderr.strip().removeprefix("gdbhandles: ")


def test_errors_give_advice_that_works_on_the_shell(guest, tmp_path, built_guest):
    directory, truth = guest
    dump = directory / "memory.raw"
    assert error("lookup", "--dump", dump, 99999, 4).endswith("`gdbhandles ps --dump FILE` lists them")
    for wrong in ("NoSuchType", "Fil"):
        message = error("walk", "--dump", dump, "--type", wrong)
        assert message.startswith(f"unknown object type '{wrong}'; this guest's types: ")
        assert all(t in message for t in truth["types"].values() if t)
    exiting = next(p for p in truth["processes"] if not p["handle_table"])
    assert error("walk", "--dump", dump, exiting["pid"]) == error("lookup", "--dump", dump, exiting["pid"], 4)
    assert "not page-aligned" in error("ps", "--dump", dump, "--dtb", "0x1234")
    message = error("ps", "--dump", dump, "--dtb", hex(truth["kernel_dtb"] + 0x10000))
    assert message.startswith("not a Windows x64 guest") and message.endswith("--dtb ADDRESS, --kernel-base ADDRESS")
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    assert error("ps", "--dump", empty) == f"dump {empty} is empty"
    foreign = tmp_path / "foreign.raw"
    foreign.write_bytes(os.urandom(1 << 20))
    assert error("ps", "--dump", foreign).startswith("not a Windows x64 guest")
    assert error("ps", "--dump", dump, "--profile", "/etc/passwd").startswith("cannot read ISF profile /etc/passwd")
    other = built_guest("22000") / "symbols.json"
    assert "is the ISF of ntkrnlmp.pdb" in error("ps", "--dump", dump, "--profile", other)
    assert error("ps", "--dump", tmp_path / "missing.raw").startswith("cannot read dump")


def test_json_only_on_stdout_and_output_files(guest, tmp_path):
    directory, truth = guest
    dump = directory / "memory.raw"
    result = cli("walk", "--dump", dump, "--json")
    assert json.loads(result.stdout) == truth["handles"] and "handles," in result.stderr
    target = tmp_path / "walk.json"
    target.write_text("old")
    os.link(target, tmp_path / "old-link")
    result = cli("walk", "--dump", dump, "--json", "--output", target)
    assert result.returncode == 0 and result.stdout == ""
    assert json.loads(target.read_text()) == truth["handles"]
    assert (tmp_path / "old-link").read_text() == "old"              # replaced by a rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old-link", "walk.json"]
    table = tmp_path / "ps.txt"
    assert cli("ps", "--dump", dump, "--output", table).stdout == ""
    assert table.read_text().splitlines()[0].split()[:2] == ["PID", "Name"]


def test_help_of_every_command_has_its_example():
    for command in commandspec.COMMANDS.values():
        if "cli" in command.front_ends:
            text = " ".join(cli(command.name, "--help").stdout.split())       # argparse rewraps
            assert command.summary in text and f"Example: gdbhandles {command.name}" in text, text
            assert all(" ".join(a.help.split()) in text for a in command.arguments), text


def test_escape_shows_controls_and_bidi_and_cuts_visibly():
    evil = "a\x1b]0;title\x07b\r\nc\u202ed\u2066e\x9bf\x00"
    shown = render.escape(evil)
    assert shown == "a\\e]0;title\\x07b\\r\\nc\\u202ed\\u2066e\\x9bf\\x00"
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f or 0x202a <= ord(c) <= 0x202e
                   or 0x2066 <= ord(c) <= 0x2069 for c in shown)
    assert render.escape("x" * 50, 10) == "xxxxxxx..." and render.escape("\\Device\\Null") == "\\Device\\Null"
    assert render.escape(None) == ""


def test_tables_fit_narrow_terminals(guest):
    directory, truth = guest
    from gdbhandles.engine import Windows
    from gdbhandles.windows.memory import DumpFile
    windows = Windows.open(DumpFile(directory / "memory.raw"))
    records = list(windows.walk())
    for width in (60, 80, 100, 132):
        for text in (render.handles_table(records, width), render.processes_table(windows.processes(), width),
                     render.handles_table([r for r in records if r.pid == records[-1].pid], width)):
            lines = text.splitlines()
            assert max(map(len, lines)) <= width and len(lines) >= 3, width
    wide = render.handles_table(records)
    longest = max((r.name or "" for r in records), key=len)
    assert longest in wide and longest not in render.handles_table(records, 80)


def test_narrow_tables_widen_no_column(guest):
    """Shrinking to fit never pads a column past its content: at 80 columns one process's File
    handles have a Type column as wide as "File", and the Name column gets the room left."""
    directory, truth = guest
    from gdbhandles.engine import Windows
    from gdbhandles.windows.memory import DumpFile
    windows = Windows.open(DumpFile(directory / "memory.raw"))
    lsass = next(p["pid"] for p in truth["processes"] if p["name"] == "lsass.exe")
    lines = render.handles_table(list(windows.walk(lsass, type="File")), 80).splitlines()
    assert lines[0].split() == ["Handle", "Object", "Type", "Access", "Attributes", "Name"]
    assert "  Type  Access" in lines[0] and max(map(len, lines)) == 80, lines[:3]


def on_terminal(*args, columns=80, env=None) -> str:
    """The CLI with its stdout on a pty of `columns` columns (as a user's terminal)."""
    import fcntl
    import struct
    import termios
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    environment = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR")}
    proc = subprocess.Popen([sys.executable, "-m", "gdbhandles.cli", *map(str, args)], stdout=slave,
                            stderr=subprocess.DEVNULL, cwd=REPO, env={**environment, **(env or {})})
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:            # the pty closes when the CLI exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=120)
    os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


def test_cli_tables_fit_the_terminal_with_colours_unless_no_color(guest):
    directory, truth = guest
    dump = directory / "memory.raw"
    for columns in (80, 100):
        text = on_terminal("walk", "--dump", dump, columns=columns)
        plain = render_plain(text)
        *lines, summary = [line for line in plain.splitlines() if line]
        assert max(map(len, lines)) <= columns and lines[0].split()[0] == "PID", columns
        assert summary.startswith(f"{len({h['pid'] for h in truth['handles']})} processes, {len(truth['handles'])} handles")
        assert "\x1b[1m" in text and "\x1b[36m" in text                 # header and types in colour
    assert "\x1b[" not in on_terminal("ps", "--dump", dump, env={"NO_COLOR": "1"})
    longest = max((h["name"] or "" for h in truth["handles"]), key=len)
    assert longest in cli("walk", "--dump", dump).stdout                 # not a terminal: nothing cut


def render_plain(text: str) -> str:
    import re
    return re.sub(r"\x1b\[[0-9;]*m", "", text).replace("\r", "")


def test_progress_and_warning_lines_are_escaped():
    from gdbhandles.records import WalkWarning
    lines = []
    progress = render.Progress(lines.append, every=0)
    progress("process 1/2: x\x1b]0;T\x07\r\n\u202e(4), 0 handles so far")
    assert lines == ["process 1/2: x\\e]0;T\\x07\\r\\n\\u202e(4), 0 handles so far\n"]
    warning = WalkWarning(672, "ls\x1b[2J\u202e", "entry \r\nbroken", 0x1c)
    assert render.warning_line(warning) == "warning: ls\\e[2J\\u202e(672) handle 0x1c: entry \\r\\nbroken"
    render.Progress(None)("nothing is written without a sink")


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_paused_for_a_command_and_left_as_it_was(enabled):
    """A command runs without the cycle collector (a walk's million tuples would make it walk gdb's
    heap again and again); afterwards it is on or off as the host had it, also after an error."""
    import gc
    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.raises(KeyError):
            with commandspec.collector_paused():
                assert not gc.isenabled()
                raise KeyError("a command failed")
        assert gc.isenabled() == enabled
    finally:
        gc.enable()
