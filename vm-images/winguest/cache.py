"""Built guests cached by their inputs: vm-images/cache/<hash>/, rebuilt only when missing.

The hash covers the build inputs and every source file of the builder and the layout data;
guests built by older sources are deleted when a new one is built."""
from __future__ import annotations

import fcntl
import hashlib
import shutil
from pathlib import Path

from .guest import build, write

VM_IMAGES = Path(__file__).resolve().parents[1]
CACHE = VM_IMAGES / "cache"


def sources_digest() -> str:
    files = [VM_IMAGES / "build.py", *sorted((VM_IMAGES / "winguest").glob("*.py")),
             VM_IMAGES / "winguest" / "loader.asm",
             *sorted((VM_IMAGES.parent / "gdbhandles" / "data").glob("*.json"))]
    h = hashlib.sha256()
    for src in files:
        h.update(src.name.encode() + src.read_bytes())
    return h.hexdigest()[:20]


def guest(profile: str | int, scenario: str = "default", seed: int = 0, guid: str | None = None,
          corrupt: tuple = (), code_variants: str | None = None) -> Path:
    """The directory of a built guest; builds it (once, under a lock) if missing."""
    digest = sources_digest()
    damage = "+".join(corrupt)
    name = hashlib.sha256(f"{profile}|{scenario}|{seed}|{guid}|{damage}|{code_variants}|{digest}".encode()).hexdigest()[:20]
    out = CACHE / name
    if (out / "done").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").exists():
            prune(digest)
            tmp = CACHE / f"{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp, build(str(profile), scenario, seed, guid, corrupt, code_variants))
            (tmp / "done").write_text(digest)
            tmp.rename(out)
    return out


def prune(digest: str) -> None:
    """Remove guests of other builder sources (called under the lock)."""
    for d in CACHE.iterdir():
        done = d / "done"
        if d.is_dir() and (not done.exists() or done.read_text() != digest):
            shutil.rmtree(d, ignore_errors=True)
