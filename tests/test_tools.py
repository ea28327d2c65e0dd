"""The README's two shell entry points on a real machine: tools/demo.sh prints the README's
"A session" block and exits 0 leaving no file behind; tools/install.sh keeps its log private."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]

# What may differ between two honest runs: the gdbstub's free port or private socket directory, where vCPU 0 was in its idle
# loop when gdb attached, QEMU's process id (the fast path reads /proc/PID/mem), elapsed times.
VARIABLE = [(re.compile(r"127\.0\.0\.1:\d+"), "127.0.0.1:PORT"),
            (re.compile(r"/\S*/gh-boot-[^/\s]+/gdb\.sock"), "/PRIVATE/gdb.sock"),
            (re.compile(r"/proc/\d+/mem"), "/proc/PID/mem"),
            (re.compile(r"^0x[0-9a-f]+ in \?\? \(\)$", re.M), "RIP in ?? ()"),
            (re.compile(r"\b\d+\.\d\d s\b"), "T s")]


def normal(text: str) -> str:
    for pattern, replacement in VARIABLE:
        text = pattern.sub(replacement, text)
    return text


def readme_session() -> str:
    """The fenced block after "What `bash tools/demo.sh` prints" in README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index("What `bash tools/demo.sh` prints")
    fence = text.index("```\n", start) + 4
    return text[fence:text.index("```\n", fence)]


def test_demo_prints_the_readme_session_exits_0_and_leaves_no_file(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHON": sys.executable}
    run = subprocess.run(["bash", "tools/demo.sh", "--no-install"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr == ""
    assert normal(run.stdout) == normal(readme_session())
    assert list(tmp.iterdir()) == []          # the boot log, the command file, boot.py's sockets


@pytest.mark.skipif(os.geteuid() != 0, reason="install.sh runs apt-get as root")
def test_install_writes_no_fixed_temp_file(tmp_path):
    """The old log path /tmp/gdbhandles-apt.log is neither written nor followed: a symlink planted
    there keeps its target intact (or a file already there stays as it was)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    fixed = Path("/tmp/gdbhandles-apt.log")
    planted = not (fixed.is_symlink() or fixed.exists())
    if planted:
        fixed.symlink_to(victim)
    before = fixed.lstat()
    try:
        run = subprocess.run(["bash", "tools/install.sh"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "TMPDIR": str(tmp)}, timeout=600)
        after = fixed.lstat()
    finally:
        if planted:
            fixed.unlink()
    assert run.returncode == 0, run.stdout + run.stderr
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (before.st_mtime_ns, before.st_size, before.st_ino)
    assert victim.read_text() == "keep me\n"
    assert list(tmp.iterdir()) == []
