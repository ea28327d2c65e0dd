"""What a gdb user meets around the answers, in a real gdb on a booted guest: JSON that pipes,
files written atomically, help, completion, tables that fit `width`, advice that works in gdb,
the kernel's own version, and guest strings that cannot drive the terminal."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from boot import booted                       # vm-images/, put on sys.path by conftest.py
from gdbhandles import commandspec
from gdbhandles.automation.mi import Gdb
from gdbhandles.windows.memory import AddressSpace, DumpFile, PhysicalMemory
from test_gdb_live import GDBINIT, by_pid, key, live_guest
from winguest.cache import guest as cached_guest

pytestmark = pytest.mark.integration

EVIL_NAME = "\x1b]0;T\x07\r\n\u202e"              # retitle the window, CR/LF, right-to-left override
EVIL_NAME_SHOWN = "\\e]0;T\\x07\\r\\n\\u202e"
EVIL_PROCESS = b"l\x1b]0;\x07\r\n\x9b"             # 9 bytes, as "lsass.exe": ESC, BEL, CR, LF, C1 CSI
EVIL_PROCESS_SHOWN = "l\\e]0;\\x07\\r\\n\\x9b"
CLI_FLAGS = ("--dtb", "--kernel-base", "--profile", "--dump")


@pytest.fixture(scope="module")
def guest():
    with live_guest("19041", "default") as live:
        yield live


def one_process(truth: dict) -> dict:
    """A process with a table, a unique name and a few handles."""
    names = [p["name"] for p in truth["processes"]]
    return next(p for p in truth["processes"] if p["handle_table"] and p["pid"] != 4 and names.count(p["name"]) == 1)


# --- JSON and files -----------------------------------------------------------------------------

def test_json_output_is_only_json_through_pipe(guest, tmp_path):
    """`pipe handle walk all --json | python3 -m json.tool` works: no summary or progress in it."""
    checks = {"handle walk all --json": lambda r: sorted(r, key=key) == sorted(guest.truth["handles"], key=key),
              "handle ps --json": lambda r: [p["pid"] for p in r] == [p["pid"] for p in guest.truth["processes"]],
              "handle info --json": lambda r: r["kernel_base"] == guest.truth["kernel_base"],
              "handle lookup 4 0x4 --json": lambda r: r == [h for h in guest.truth["handles"]
                                                            if (h["pid"], h["handle"]) == (4, 4)]}
    for number, (command, check) in enumerate(checks.items()):
        out = tmp_path / f"{number}.json"
        guest.gdb.console(f"pipe {command} | python3 -m json.tool > {out}")
        assert guest.gdb.console("print $_shell_exitcode").split("=")[-1].strip() == "0", command
        assert check(json.loads(out.read_text())), command


def test_output_file_is_written_atomically(guest, tmp_path):
    process = one_process(guest.truth)
    target = tmp_path / "walk.json"
    target.write_text("old")
    os.link(target, tmp_path / "old-link")
    result = guest.gdb.console_result(f"handle walk {process['pid']} --json --output {target}")
    assert result.console == ""
    assert json.loads(target.read_text()) == by_pid(guest.truth)[process["pid"]]
    assert f"{target}: " in result.log and "1 processes, " in result.log        # beside the file, not in it
    assert (tmp_path / "old-link").read_text() == "old"          # replaced by a rename, never rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old-link", "walk.json"]     # no temporary left
    table = tmp_path / "ps.txt"
    guest.gdb.console(f"handle ps --output {table}")
    lines = table.read_text().splitlines()
    assert lines[0].split() == ["PID", "Name", "EPROCESS", "HandleTable", "Level", "Handles"]
    assert len(lines) == 2 + len(guest.truth["processes"])
    message = guest.error(f"handle ps --output {tmp_path}/no/such/dir/ps.txt")
    assert message.startswith(f"cannot write {tmp_path}/no/such/dir/ps.txt") and "\n" not in message


# --- help and completion --------------------------------------------------------------------------

def test_help_shows_usage_options_and_example_of_every_subcommand(guest):
    for command in commandspec.COMMANDS.values():
        if "gdb" not in command.front_ends:
            continue
        text = guest.gdb.console(f"help handle {command.name}")
        assert text.startswith(command.summary), text
        assert f"Usage: handle {command.name}" in text and f"Example: handle {command.name}" in text, text
        for argument in command.every_argument():
            assert (argument.shown if argument.positional else argument.name) in text, (command.name, argument)
            assert argument.help in text, (command.name, argument.name)
    assert "set pagination off" in guest.gdb.console("help handle")


def test_tab_completion_of_processes_pids_types_and_options(guest):
    process = one_process(guest.truth)
    name, pid = process["name"], process["pid"]

    def complete(line):
        return guest.gdb.console(f"complete {line}").splitlines()

    assert f"handle walk {name}" in complete(f"handle walk {name[:2]}")
    assert complete(f"handle walk {name[:-1]}") == [f"handle walk {name}"]     # gdb breaks words at '.'
    assert f"handle lookup {pid}" in complete(f"handle lookup {str(pid)[:-1]}")
    assert "handle walk all" in complete("handle walk al")
    kind = next(t for t in guest.truth["types"].values() if t and len(t) > 4)
    assert f"handle walk {pid} --type {kind}" in complete(f"handle walk {pid} --type {kind[:3]}")
    assert complete("handle walk all --t") == ["handle walk all --type"]
    options = {a.name for a in commandspec.COMMANDS["walk"].every_argument() if not a.positional}
    assert {"--type", "--name", "--json", "--output"} <= options
    assert set(complete("handle walk all --")) == {f"handle walk all {o}" for o in options}
    assert complete("handle ps --j") == ["handle ps --json"]


# --- tables --------------------------------------------------------------------------------------

def test_tables_fit_gdb_width(guest):
    longest = max((h for h in guest.truth["handles"] if h["name"]), key=lambda h: len(h["name"]))
    try:
        for columns in (80, 120):
            guest.gdb.console(f"set width {columns}")
            for command in ("handle walk all", f"handle walk {longest['pid']}", "handle ps"):
                lines = guest.gdb.console(command).splitlines()
                assert max(len(line) for line in lines) <= columns, (command, columns)
                assert set(lines[1]) == {"-", " "}                 # the rule line, no wider than the rest
        text = guest.gdb.console(f"handle walk {longest['pid']}")
        assert longest["name"] not in text and "..." in text      # cut, with a visible marker
        lookup = guest.gdb.console(f"handle lookup {longest['pid']} {longest['handle']:#x}")
        assert longest["name"] in lookup                            # lookup keeps everything
        assert json.loads(guest.gdb.console(f"handle walk {longest['pid']} --json")) == by_pid(guest.truth)[longest["pid"]]
    finally:
        guest.gdb.console("set width 0")
    assert longest["name"] in guest.gdb.console(f"handle walk {longest['pid']}")     # unlimited: all of it


# --- errors --------------------------------------------------------------------------------------

def test_errors_give_advice_that_works_in_gdb(guest, tmp_path):
    messages = []
    messages.append(guest.error("handle lookup 99999 4"))
    assert messages[-1] == "no process with pid 99999 (0x1869f); `handle ps` lists them"
    types = guest.truth["types"].values()
    for wrong in ("NoSuchType", "Fil"):
        messages.append(guest.error(f"handle walk all --type {wrong}"))
        assert messages[-1].startswith(f"unknown object type '{wrong}'; this guest's types: ")
        assert all(t in messages[-1] for t in types if t), messages[-1]
    exiting = next(p for p in guest.truth["processes"] if not p["handle_table"])
    messages.append(guest.error(f"handle walk {exiting['pid']}"))
    assert messages[-1] == guest.error(f"handle lookup {exiting['pid']} 4")      # walk explains as lookup does
    assert "has no handle table" in messages[-1]
    messages.append(guest.error("set handle dtb 0x1234"))
    assert "not page-aligned" in messages[-1]
    try:
        guest.gdb.console(f"set handle dtb {guest.truth['kernel_dtb'] + 0x10000:#x}")
        messages.append(guest.error("handle ps"))
        assert messages[-1].startswith("not a Windows x64 guest") and "set handle dtb ADDRESS" in messages[-1]
    finally:
        guest.gdb.console("set handle dtb")
    guest.gdb.console(f"set handle dtb {guest.truth['kernel_dtb']:#x}")        # a right DTB, given
    try:
        assert "given by the user" in guest.gdb.console("handle info")
    finally:
        guest.gdb.console("set handle dtb")
    messages.append(guest.error("set handle profile /etc/passwd"))
    assert messages[-1].startswith("cannot read ISF profile /etc/passwd")
    assert "(none: shipped profiles)" in guest.gdb.console("show handle profile")
    other = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'vm-images'); "
                            "from winguest.cache import guest; print(guest('22000'))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    guest.gdb.console(f"set handle profile {other}/symbols.json")
    try:
        messages.append(guest.error("handle ps"))
        assert "is the ISF of ntkrnlmp.pdb" in messages[-1] and "not of this kernel" in messages[-1]
    finally:
        guest.gdb.console("set handle profile")
    for message in messages:
        assert "\n" not in message and not any(flag in message for flag in CLI_FLAGS), message
    assert guest.json("handle ps --json")[0]["pid"] == 4                       # and all is well again


# --- handle info ---------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["19041", "22000"])
def test_info_reports_the_kernels_own_version_and_the_layout_apart(profile):
    with live_guest(profile, "default") as live:
        record = live.json("handle info --json")
        text = live.gdb.console("handle info")
    own = live.truth["profile"]["version"]
    assert record["version"] == own and f"version      {own} (the kernel's FileVersion)" in text
    layout_line = next(line for line in text.splitlines() if line.startswith("layout"))
    if record["layout"] == own:          # 19041.329: its own profile, the version said once
        assert own not in layout_line, layout_line
    else:                                # 22000 is served by the 20348 layout: say so
        assert record["layout"] in layout_line and "same structures" in layout_line, layout_line
    assert "absent from this build (shipped RVA" not in text and "same layout as" not in text


# --- terminal safety -----------------------------------------------------------------------------

def _patches(directory) -> dict[int, bytes]:
    """Physical address -> bytes: an object named EVIL_NAME (was KnownDlls), a process named
    EVIL_PROCESS (was lsass.exe), and one torn page of a level-1 handle table."""
    raw = (directory / "memory.raw").read_bytes()
    truth = json.loads((directory / "truth.json").read_text())
    known = "KnownDlls".encode("utf-16-le")
    assert raw.count(known) == 1 and raw.count(b"lsass.exe\0") == 1
    victim = next(p for p in truth["processes"] if p["level"] == 1 and p["pid"] != 4)
    space = AddressSpace(PhysicalMemory(DumpFile(directory / "memory.raw")), truth["kernel_dtb"])
    return {raw.index(known): EVIL_NAME.encode("utf-16-le"), raw.index(b"lsass.exe\0"): EVIL_PROCESS,
            space.translate((victim["table_code"] & ~3) + 8): struct.pack("<Q", 0xFFFF8F0000000000)}


def test_guest_strings_cannot_drive_the_terminal(tmp_path):
    """Names with ESC ] 0 ; title BEL, CR/LF and U+202E, a process name with C0/C1 controls, and a
    torn table: both front ends show escapes, never the characters, and one warning format."""
    directory = cached_guest("19041", "default")
    patches = _patches(directory)
    dump = tmp_path / "evil.raw"
    with open(directory / "memory.raw", "rb") as src, open(dump, "wb") as dst:
        dst.write(src.read())
        for address, data in patches.items():
            dst.seek(address)
            dst.write(data)
    with booted(directory) as vm, Gdb(timeout=120) as gdb:
        gdb.source(str(GDBINIT))
        gdb.connect(vm.gdb)
        gdb.console("maintenance packet Qqemu.PhyMemMode:1")
        for address, data in patches.items():
            gdb.console(f"python gdb.selected_inferior().write_memory({address:#x}, bytes.fromhex('{data.hex()}'))")
        gdb.console("maintenance packet Qqemu.PhyMemMode:0")
        walk = gdb.console_result("handle walk all")
        outputs = {"walk": walk.console, "ps": gdb.console("handle ps"),
                   "lookup": gdb.console("handle lookup 672 0x4")}
        gdb_warnings = [line for line in walk.log.splitlines() if line.startswith("warning:")]
    cli = [sys.executable, "-m", "gdbhandles.cli"]
    cli_walk = subprocess.run(cli + ["walk", "--dump", str(dump)], capture_output=True, text=True, timeout=120)
    outputs["cli walk"] = cli_walk.stdout
    outputs["cli ps"] = subprocess.run(cli + ["ps", "--dump", str(dump)], capture_output=True, text=True).stdout
    outputs["cli lookup"] = subprocess.run(cli + ["lookup", "--dump", str(dump), "672", "0x4"],
                                           capture_output=True, text=True).stdout
    for what, text in outputs.items():
        assert not any(c in text for c in "\x1b\x07\r\u202e\x9b"), what
        assert EVIL_PROCESS_SHOWN in text, what
    for what in ("walk", "lookup", "cli walk", "cli lookup"):
        assert EVIL_NAME_SHOWN in outputs[what], what
    cli_warnings = [line for line in cli_walk.stderr.splitlines() if line.startswith("warning:")]
    assert gdb_warnings and gdb_warnings == cli_warnings           # one format, the handle value in it
    # the torn page's warning names the process and the handle or table it costs; the patched
    # ImageFileName also gets its own (the full image path no longer ends in it)
    torn = [line for line in gdb_warnings if "unreadable page at 0xffff8f0000000000" in line]
    assert len(torn) == 1 and ("handle 0x" in torn[0] or "handle table 0x" in torn[0]), gdb_warnings
    assert any("full image name unreadable" in line for line in gdb_warnings), gdb_warnings
