"""Built guests cached by their inputs: vm-images/cache/<hash>/, rebuilt only when missing."""
from __future__ import annotations

import fcntl
import hashlib
import shutil
from pathlib import Path

from .guest import build, write

VM_IMAGES = Path(__file__).resolve().parents[1]
CACHE = VM_IMAGES / "cache"
SOURCES = [VM_IMAGES / "build.py", *sorted((VM_IMAGES / "winguest").glob("*.py")),
           VM_IMAGES / "winguest" / "loader.asm", *sorted((VM_IMAGES.parent / "gdbhandles" / "data").glob("*.json"))]


def key(profile: str, scenario: str, seed: int, guid: str | None) -> str:
    h = hashlib.sha256(f"{profile}|{scenario}|{seed}|{guid}".encode())
    for src in SOURCES:
        h.update(src.name.encode() + src.read_bytes())
    return h.hexdigest()[:20]


def guest(profile: str | int, scenario: str = "default", seed: int = 0, guid: str | None = None) -> Path:
    """The directory of a built guest; builds it (once, under a lock) if missing."""
    out = CACHE / key(str(profile), scenario, seed, guid)
    if (out / "done").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").exists():
            tmp = out.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp, build(str(profile), scenario, seed, guid))
            (tmp / "done").write_text("")
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out
