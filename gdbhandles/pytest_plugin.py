"""pytest fixtures for regression suites against VM snapshots (loaded through the `pytest11`
entry point, so `pip install gdbhandles` is enough).

- `windows_vm`: the user's QEMU command line booted paused at a snapshot, with its gdbstub on
  a unix socket in a 0700 directory and a 0600 QMP socket, and a real gdb with the extension attached;
  stopped when the test ends, also on failure. Command line and snapshot come from the
  fixture's parameter (`@pytest.mark.parametrize("windows_vm", [{"snapshot": "s1"}],
  indirect=True)`), else `--gdbhandles-qemu`/`--gdbhandles-snapshot`, else the ini settings
  `gdbhandles_qemu`/`gdbhandles_snapshot`.
- `handles`: `handle walk all` of that VM, as the JSON records.
- `golden`: `golden(path, records)` fails with `gdbhandles regress`'s +/-/~ diff when the
  records differ from the golden file; `--gdbhandles-update` rewrites the file instead.

Under pytest-xdist every test gets its own QEMU, ports and sockets. A qcow2 file can be
opened by one QEMU at a time, so `--gdbhandles-disk FILE` (or a `disk` key) names the disk
of the command line: each test then runs on a private copy of it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from gdbhandles.automation import regress, runner
from gdbhandles.automation.mi import Gdb
from gdbhandles.errors import HandleError

__all__ = ["WindowsVm"]

KEYS = ("qemu", "snapshot", "disk")


def pytest_addoption(parser):
    group = parser.getgroup("gdbhandles", "regression runs against Windows VM snapshots")
    group.addoption("--gdbhandles-qemu", metavar="ARGS", help="QEMU arguments of the machine (quoted)")
    group.addoption("--gdbhandles-snapshot", metavar="NAME", help="qcow2 snapshot each test starts from")
    group.addoption("--gdbhandles-disk", metavar="FILE",
                    help="the qcow2 file ARGS names: each test runs on a private copy (needed under xdist)")
    group.addoption("--gdbhandles-update", action="store_true", help="rewrite golden files instead of comparing")
    for key in KEYS:
        parser.addini(f"gdbhandles_{key}", f"default for --gdbhandles-{key}")


@dataclass
class WindowsVm:
    """A booted VM with gdb attached; `run` takes `handle` commands and returns their JSON."""
    gdb: Gdb
    qemu: str
    snapshot: str | None

    def run(self, command: str):
        return runner.run_commands(self.gdb, [command])[0]

    def walk(self, target: str = "all") -> list[dict]:
        return self.run(f"walk {target}")


def _setting(request, key: str) -> str | None:
    param = getattr(request, "param", None) or {}
    if not isinstance(param, dict) or set(param) - set(KEYS):
        raise pytest.UsageError(f"windows_vm parameters are dicts with keys {', '.join(KEYS)}: got {param!r}")
    return param.get(key) or request.config.getoption(f"--gdbhandles-{key}") or \
        request.config.getini(f"gdbhandles_{key}") or None


def _private_disk(qemu: str, disk: str, directory: Path) -> str:
    """The command line with `disk` replaced by a copy in `directory`."""
    if disk not in qemu:
        raise pytest.UsageError(f"--gdbhandles-disk {disk} does not appear in the QEMU arguments")
    copy = directory / Path(disk).name
    shutil.copyfile(disk, copy)
    return qemu.replace(disk, str(copy))


@pytest.fixture
def windows_vm(request, tmp_path):
    qemu, snapshot, disk = (_setting(request, key) for key in KEYS)
    if not qemu:
        pytest.fail("gdbhandles: no QEMU command line: give --gdbhandles-qemu \"ARGS\", the ini setting "
                    "gdbhandles_qemu, or a {'qemu': ...} fixture parameter", pytrace=False)
    if disk:
        qemu = _private_disk(qemu, disk, tmp_path)
    try:
        with runner.session(qemu, snapshot, None, None) as gdb:
            yield WindowsVm(gdb, qemu, snapshot)
    except HandleError as exc:
        pytest.fail(f"gdbhandles: {exc}", pytrace=False)


@pytest.fixture
def handles(windows_vm) -> list[dict]:
    return windows_vm.walk()


@pytest.fixture
def golden(request):
    """golden(path, records): compare with the golden file, or rewrite it with --gdbhandles-update."""
    update = request.config.getoption("--gdbhandles-update")

    def check(path: str | Path, records: list[dict]) -> None:
        if update:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            regress.save(path, records)
            return
        try:
            expected = regress.load(path)
        except HandleError as exc:
            pytest.fail(f"gdbhandles: {exc}", pytrace=False)
        diff = regress.compare(expected, records)
        if diff:
            pytest.fail(f"handles differ from {path}:\n{regress.report(diff)}", pytrace=False)
    return check
