"""A test guest as a user's QEMU command line: what `gdbhandles run/regress --qemu` and the
pytest plugin take, on a private copy of the guest's qcow2 disk."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from boot import machine_arguments
from winguest.cache import guest as cached_guest


def machine(seed: int, where: Path, profile: str = "19041") -> tuple[str, Path, dict]:
    """(QEMU arguments, the disk copy they name, truth) of the default guest of `seed`."""
    directory = cached_guest(profile, "default", seed)
    cfg = json.loads((directory / "guest.json").read_text())
    disk = where / f"disk{seed}.qcow2"
    shutil.copy(directory / cfg["files"]["disk"], disk)
    args = machine_arguments(directory, cfg, disk, cfg["smp"])
    return shlex.join(args), disk, json.loads((directory / "truth.json").read_text())
