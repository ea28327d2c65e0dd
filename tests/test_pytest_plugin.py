"""The pytest plugin as a user's CI runs it: a suite of snapshot tests in a separate pytest
process, spread over two workers by pytest-xdist, with JUnit XML; real QEMU and gdb."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from machines import machine

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]

USER_SUITE = '''
import json
import pytest

SNAPSHOTS = json.loads({snapshots!r})


@pytest.mark.parametrize("windows_vm", SNAPSHOTS.values(), indirect=True, ids=SNAPSHOTS.keys())
def test_handles_match_golden(request, handles, golden):
    golden(f"goldens/{{request.node.callspec.id}}.json", handles)
'''


def gdbhandles(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "gdbhandles", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr


def key(records):
    return sorted(records, key=lambda r: (r["pid"], r["handle"]))


# The plugin by module name whether or not this checkout's entry point is installed yet
# (test_package.py checks the entry point of an installed wheel).
PLUGIN = ("-p", "no:cacheprovider", "-p", "no:gdbhandles", "-p", "gdbhandles.pytest_plugin")
ENV = {**os.environ, "PYTHONPATH": str(REPO)}       # this checkout's package, wherever pytest runs


def user_pytest(suite: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", *PLUGIN, "-n", "2", "--junitxml", "junit.xml", *args],
                          capture_output=True, text=True, timeout=900, cwd=suite, env=ENV)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Three snapshots of two guests, goldens written from the guests' truth."""
    where = tmp_path_factory.mktemp("suite")
    (where / "goldens").mkdir()
    snapshots, truths = {}, {}
    for seed, names in ((0, ("base", "later")), (1, ("base",))):
        qemu, disk, truth = machine(seed, where)
        for name in names:
            gdbhandles("snapshot", "--qemu", qemu, "--name", name, "--wait", "0.5")
            snapshots[f"guest{seed}-{name}"] = {"qemu": qemu, "snapshot": name, "disk": str(disk)}
            (where / "goldens" / f"guest{seed}-{name}.json").write_text(json.dumps(truth["handles"]))
            truths[f"guest{seed}-{name}"] = truth["handles"]
    (where / "test_snapshots.py").write_text(USER_SUITE.format(snapshots=json.dumps(snapshots)))
    return where, snapshots, truths


def test_suite_passes_on_two_workers_with_one_junit_case_per_snapshot(suite):
    where, snapshots, _ = suite
    done = user_pytest(where)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 workers" in done.stdout
    cases = ET.parse(where / "junit.xml").getroot().iter("testcase")
    names = sorted(case.get("name") for case in cases)
    assert names == sorted(f"test_handles_match_golden[{name}]" for name in snapshots)


def test_a_changed_golden_fails_with_the_regress_diff_and_update_rewrites_it(suite):
    where, snapshots, truths = suite
    golden = where / "goldens" / "guest1-base.json"
    records = truths["guest1-base"]
    changed = [dict(r) for r in records[1:]]
    changed[0]["granted_access"] ^= 1
    golden.write_text(json.dumps(changed))
    failed = user_pytest(where)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    first, second = records[0], records[1]
    assert f"+ pid {first['pid']} ({first['process']}) handle {first['handle']:#x}:" in failed.stdout
    assert f"~ pid {second['pid']} ({second['process']}) handle {second['handle']:#x}: granted_access" \
        in failed.stdout
    assert "1 added, 0 removed, 1 changed" in failed.stdout
    failures = [c for c in ET.parse(where / "junit.xml").getroot().iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failures] == ["test_handles_match_golden[guest1-base]"]

    updated = user_pytest(where, "--gdbhandles-update")
    assert updated.returncode == 0, updated.stdout + updated.stderr
    assert key(json.loads(golden.read_text())) == key(records)
    assert user_pytest(where).returncode == 0


def test_missing_qemu_is_one_clear_failure(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_walk(handles):\n    assert handles\n")
    done = subprocess.run([sys.executable, "-m", "pytest", *PLUGIN, "-q"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=ENV)
    assert done.returncode == 1
    assert "gdbhandles: no QEMU command line: give --gdbhandles-qemu" in done.stdout
    assert "Traceback" not in done.stdout
