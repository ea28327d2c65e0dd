"""Tab completion of `handle …` arguments: options, process names and pids, object type names.

Names come from the guest as the session last saw it; completing never pauses the VM or
starts a walk, and any failure (no target, running target) just completes nothing.
"""

from __future__ import annotations

import gdb

from gdbhandles.commandspec import Command, Kind
from gdbhandles.errors import HandleError

__all__ = ["candidates"]


def _guest_words(session, kind: Kind) -> list[str]:
    """Process names and pids, or type names, of the stopped guest ([] when it cannot be read)."""
    try:
        if gdb.selected_thread() is None or gdb.selected_thread().is_running():
            return []
        with session.open() as windows:
            if kind is Kind.TYPE:
                return windows.type_names()
            processes = windows.processes()
    except (HandleError, gdb.error):
        return []
    words = sorted({p.name for p in processes}) + [str(p.pid) for p in processes]
    return words + (["all"] if kind is Kind.TARGET else [])


def _expected(command: Command, words: list[str]):
    """The argument the word being completed fills, after the complete `words` before it."""
    options = {a.name: a for a in command.every_argument() if not a.positional}
    positionals = [a for a in command.every_argument() if a.positional]
    if words and words[-1] in options and options[words[-1]].kind is not Kind.FLAG:
        return options[words[-1]]
    taken, skip = 0, False
    for word in words:
        if skip:
            skip = False
        elif word in options:
            skip = options[word].kind is not Kind.FLAG
        elif not word.startswith("-"):
            taken += 1
    return positionals[taken] if taken < len(positionals) else None


def candidates(command: Command, session, text: str, word: str):
    """What gdb's `complete` should offer. gdb breaks words at `.` too, so each candidate is
    returned from where gdb's `word` starts inside the whole token (`lsass.e` -> `exe`)."""
    words = text.split()
    token = words.pop() if text and not text[-1].isspace() else ""
    cut = max(len(token) - len(word or ""), 0)
    options = [a.name for a in command.every_argument() if not a.positional and a.name not in words]
    expected = _expected(command, words)
    if expected is not None and expected.name == "--output":
        return gdb.COMPLETE_FILENAME
    if token.startswith("-") or expected is None:
        found = [o for o in options if o.startswith(token)]
    elif expected.kind in (Kind.PROCESS, Kind.TARGET, Kind.TYPE):
        found = [w for w in _guest_words(session, expected.kind) if w.lower().startswith(token.lower())]
    else:
        found = []
    return [f[cut:] for f in found]
