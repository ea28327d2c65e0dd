"""Files a user names (dumps, ISF profiles, golden files): regular files only, opened without
blocking and read with a size cap.

A FIFO given as a dump would block `open()` for ever and `/dev/zero` as a profile would be read
for ever; a file is therefore opened with O_NONBLOCK and checked with fstat before anything
is read from it.
"""

from __future__ import annotations

import os
import stat

from gdbhandles.errors import HandleError

__all__ = ["FileError", "open_regular", "read_capped"]


class FileError(HandleError):
    """A named file that is missing, unreadable, not a regular file, or too large."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, what: str) -> int:
    """A read-only descriptor of `path` (blocking mode again), or FileError in one line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise FileError(f"cannot read {what} {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FileError(f"{what} {path} is {_kind(mode)}, not a regular file")
    os.set_blocking(fd, True)
    return fd


def read_capped(file, limit: int, what: str, path) -> bytes:
    """All of `file` (any object with read()), but FileError past `limit` bytes."""
    data = file.read(limit + 1)
    if len(data) > limit:
        raise FileError(f"{what} {path} is larger than {limit >> 20} MiB")
    return data
