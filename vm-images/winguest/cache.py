"""Built guests cached by their inputs: vm-images/cache/<hash>/, rebuilt only when missing.

The hash covers the build inputs and every source file of the builder and the layout data;
guests built by older sources are deleted when a new one is built, and so are the least recently
used ones while the cache holds more than GDBHANDLES_GUEST_CACHE_MIB (default 2048) on disk,
except guests used in the last IDLE seconds (another test process may be booting them)."""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from pathlib import Path

from .guest import build, write

VM_IMAGES = Path(__file__).resolve().parents[1]
CACHE = VM_IMAGES / "cache"
LIMIT_MIB = int(os.environ.get("GDBHANDLES_GUEST_CACHE_MIB", "2048"))
IDLE = 600.0


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
        _used(out)
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


def _used(directory: Path) -> None:
    """The mtime of `done` is the guest's last use (for the size limit)."""
    try:
        os.utime(directory / "done")
    except OSError:                      # pruned meanwhile by another process: it will be rebuilt
        pass


def _disk_usage(directory: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in directory.iterdir() if f.is_file())


def prune(digest: str) -> None:
    """Remove guests of other builder sources, then the least recently used idle ones while the
    cache is over its limit (called under the lock)."""
    current = []
    for d in CACHE.iterdir():
        done = d / "done"
        if d.is_dir() and (not done.exists() or done.read_text() != digest):
            shutil.rmtree(d, ignore_errors=True)
        elif d.is_dir():
            current.append((done.stat().st_mtime, _disk_usage(d), d))
    total = sum(size for _, size, _ in current)
    idle_before = time.time() - IDLE
    for used, size, d in sorted(current):
        if total <= LIMIT_MIB << 20 or used > idle_before:
            break
        shutil.rmtree(d, ignore_errors=True)
        total -= size
