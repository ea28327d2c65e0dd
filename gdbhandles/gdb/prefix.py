"""The word that starts every gdbhandles command: `handle` unless chosen before loading.

gdb 13 has no way to keep its built-in `handle SIGNAL ACTIONS` once a Python command takes
the name (an alias made before follows the new command; a multi-word alias needs `handle`
to be a prefix, which the built-in is not). So a user who needs signal lines after loading
picks another word: `GDBHANDLES_PREFIX=word` in the environment or `set $gdbhandles_prefix
= "word"` before sourcing. Signal lines given to our `handle` get one line saying so.
"""

from __future__ import annotations

import os
import re

import gdb

__all__ = ["NAME", "SIGNAL_LINE", "signal_line_error"]

DEFAULT = "handle"
# What gdb's own `handle` takes first: a signal name, a number or range, or `all`.
SIGNAL_LINE = re.compile(r"(SIG[A-Z0-9]+|EXC_[A-Z_]+|all|\d+(-\d+)?)$", re.IGNORECASE)


def _chosen() -> str:
    value = os.environ.get("GDBHANDLES_PREFIX", "")
    if not value:
        variable = gdb.convenience_variable("gdbhandles_prefix")
        value = variable.string() if variable is not None else ""
    if not value:
        return DEFAULT
    if not re.fullmatch(r"[a-z][a-z0-9-]*", value) or value in ("set", "show", "info", "help"):
        gdb.write(f"gdbhandles: prefix {value!r} is not a plain command word; using {DEFAULT!r}\n", gdb.STDERR)
        return DEFAULT
    return value


NAME = _chosen()


def signal_line_error(argument: str) -> str | None:
    """The one line for `handle SIGINT nostop` once the built-in is replaced; None otherwise."""
    words = argument.split()
    if NAME != DEFAULT or not words or not SIGNAL_LINE.match(words[0]):
        return None
    return (f"`handle {argument.strip()}`: gdb's built-in signal command is replaced by gdbhandles; give "
            "signal settings before loading gdbhandles, or load it with GDBHANDLES_PREFIX=<word> "
            "(see the README)")
