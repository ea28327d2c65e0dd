"""The package as a user installs it: a wheel built by `python -m build`, installed into a fresh
venv of the system Python (the one gdb embeds), then loaded in gdb without the source tree."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gdbhandles import __version__

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"


def run(*args, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), cwd=REPO)
    built, = out.glob("gdbhandles-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv, away from the checkout, with the wheel and its dependencies."""
    where = tmp_path_factory.mktemp("venv") / "v"
    run(SYSTEM_PYTHON, "-m", "venv", str(where))
    run(str(where / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel), "pytest")
    return where


def test_wheel_holds_package_data_and_entry_points(wheel):
    assert wheel.name.startswith(f"gdbhandles-{__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("gdbhandles/gdbinit.py", "gdbhandles/pytest_plugin.py", "gdbhandles/data/NOTICE.md",
                   "gdbhandles/data/windows-x64-offsets.json", "gdbhandles/windows/handle_table.py",
                   "gdbhandles/gdb/commands.py", "gdbhandles/automation/runner.py"):
        assert needed in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "gdbhandles = gdbhandles.cli:main" in text and "[pytest11]" in text


def test_installed_commands(venv):
    clean = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    for command in ([str(venv / "bin" / "gdbhandles"), "--version"],
                    [str(venv / "bin" / "python"), "-m", "gdbhandles", "--version"]):
        out = run(*command, cwd="/", env=clean).stdout
        assert out.startswith(f"gdbhandles {__version__}\nlayouts: 48 shipped profiles"), out
    gdbinit = run(str(venv / "bin" / "gdbhandles"), "gdbinit", cwd="/", env=clean).stdout.strip()
    assert gdbinit.startswith(str(venv)) and gdbinit.endswith("site-packages/gdbhandles/gdbinit.py")
    plugins = run(str(venv / "bin" / "python"), "-m", "pytest", "--help", cwd="/", env=clean).stdout
    assert "--gdbhandles-qemu" in plugins and "--gdbhandles-update" in plugins


def test_installed_extension_loads_in_gdb(venv):
    """gdb knows nothing of the venv (no VIRTUAL_ENV): `gdb -x "$(gdbhandles gdbinit)"` is enough."""
    clean = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    gdbinit = run(str(venv / "bin" / "gdbhandles"), "gdbinit", cwd="/", env=clean).stdout.strip()
    out = run("gdb", "-nx", "-q", "-batch", "-x", gdbinit, "-ex", "handle version",
              "-ex", "python import gdbhandles, json; print(json.dumps(gdbhandles.__file__))",
              cwd="/", env=clean)
    assert "cannot import" not in out.stderr, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"gdbhandles {__version__}"
    assert json.loads(lines[-1]).startswith(str(venv))          # the installed copy, not the checkout
