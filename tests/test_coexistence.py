"""gdbhandles beside pwndbg and GEF, in both loading orders, in a real gdb.

Neither can be installed from the package registries here, so the test does what they do at
load time that could collide with us: pwndbg's start-up signal lines (pwndbg/__init__.py:
`handle SIGALRM nostop print nopass`, SIGBUS, SIGPIPE, SIGSEGV), a prompt hook (both set
`gdb.prompt_hook`), and a command of their own (`context`).
"""

import re
from pathlib import Path

import pytest

from gdbhandles.automation.mi import Gdb, MiError

REPO = Path(__file__).resolve().parents[1]
GDBINIT = REPO / "gdbinit.py"
SIGNAL_LINES = {"SIGALRM": ("nostop", "print", "nopass"), "SIGBUS": ("stop", "print", "nopass"),
                "SIGPIPE": ("nostop", "print", "nopass"), "SIGSEGV": ("stop", "print", "nopass")}
THEIR_SETUP = """\
python gdb.prompt_hook = lambda current: 'pwndbg> '
python
class Context(gdb.Command):
    def __init__(self):
        super().__init__('context', gdb.COMMAND_USER)

    def invoke(self, argument, from_tty):
        gdb.write('context ran\\n')
Context()
end
"""


def signal_table(gdb: Gdb, name: str) -> tuple[str, ...]:
    """(stop, print, pass) of one signal as `info signals` shows it."""
    line = next(l for l in gdb.console(f"info signals {name}").splitlines() if l.startswith(name))
    stop, printed, passed = line.split()[1:4]
    return ("stop" if stop == "Yes" else "nostop", "print" if printed == "Yes" else "noprint",
            "pass" if passed == "Yes" else "nopass")


def their_signal_lines(gdb: Gdb) -> list[str]:
    """Issue pwndbg's signal lines one by one; the errors, if any."""
    errors = []
    for name, actions in SIGNAL_LINES.items():
        try:
            gdb.console(f"handle {name} {' '.join(actions)}")
        except MiError as exc:
            errors.append(exc.message)
    return errors


def our_commands_work(gdb: Gdb, prefix: str = "handle") -> None:
    assert gdb.console(f"{prefix} version").startswith("gdbhandles ")
    assert f"{prefix} walk" in gdb.console(f"help {prefix}")
    assert "QMP socket" in gdb.console(f"show {prefix} qmp")


def their_things_work(gdb: Gdb) -> None:
    assert gdb.console("context").strip() == "context ran"
    assert gdb.console("python print(repr(gdb.prompt_hook('(gdb) ')))").strip() == "'pwndbg> '"


@pytest.fixture
def their_setup(tmp_path) -> str:
    """Their prompt hook and command, as a gdb script they would source."""
    script = tmp_path / "their-setup.gdb"
    script.write_text(THEIR_SETUP)
    return f"source {script}"


def test_them_first_then_us(their_setup):
    with Gdb() as gdb:
        assert their_signal_lines(gdb) == []
        gdb.console(their_setup)
        gdb.console(f"source {GDBINIT}")
        our_commands_work(gdb)
        their_things_work(gdb)
        for name, actions in SIGNAL_LINES.items():       # what they set before us stays set
            assert signal_table(gdb, name) == actions


def test_us_first_then_them(their_setup):
    """Signal lines after our `handle` exists cannot reach gdb's built-in: each fails with one line
    that says why and how to avoid it; everything else works in this order too."""
    with Gdb() as gdb:
        gdb.console(f"source {GDBINIT}")
        before = {name: signal_table(gdb, name) for name in SIGNAL_LINES}
        errors = their_signal_lines(gdb)
        assert len(errors) == len(SIGNAL_LINES)
        for error in errors:
            assert "\n" not in error.strip()
            assert "gdb's built-in signal command is replaced by gdbhandles" in error
            assert "GDBHANDLES_PREFIX" in error
        assert {name: signal_table(gdb, name) for name in SIGNAL_LINES} == before    # nothing half-applied
        for line in ("handle all nostop", "handle 14 nostop", "handle 14-15 nostop"):
            with pytest.raises(MiError, match="built-in signal command is replaced"):
                gdb.console(line)
        gdb.console(their_setup)
        our_commands_work(gdb)
        their_things_work(gdb)


@pytest.mark.parametrize("how", ["environment", "convenience variable"])
def test_a_chosen_prefix_keeps_gdbs_handle(how, monkeypatch):
    if how == "environment":
        monkeypatch.setenv("GDBHANDLES_PREFIX", "winhandle")     # gdb inherits it
    with Gdb() as gdb:
        if how == "convenience variable":
            gdb.console('set $gdbhandles_prefix = "winhandle"')
        gdb.console(f"source {GDBINIT}")
        assert their_signal_lines(gdb) == []               # gdb's own `handle` is untouched
        for name, actions in SIGNAL_LINES.items():
            assert signal_table(gdb, name) == actions
        our_commands_work(gdb, "winhandle")
        assert re.search(r"winhandle walk\b", gdb.console("help winhandle"))
