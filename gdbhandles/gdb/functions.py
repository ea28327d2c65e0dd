"""gdb convenience functions for breakpoint conditions and expressions:
`$handle_object(h [, pid])`, `$handle_type(h [, pid])`, `$handle_name(h [, pid])`,
`$handle_access(h [, pid])`. Without a pid the handle belongs to the current process of the
selected vCPU. An invalid handle is a gdb error naming why, never 0 or "" (a condition that
silently compares with 0 would hide the mistake).

    break *0xfffff80112345678 if $_streq($handle_type($rdx), "File")
"""

from __future__ import annotations

import gdb

from gdbhandles import queries
from gdbhandles.errors import HandleError
from gdbhandles.gdb.commands import session
from gdbhandles.windows.memory import MASK64

__all__ = ["register"]



def _string(text: str | None) -> gdb.Value:
    """A char array gdb prints and $_streq compares; "" for none (gdb.Value("") would be 0x0)."""
    return gdb.Value(text) if text else gdb.parse_and_eval('""')


def _unsigned(value: int, type_name: str) -> gdb.Value:
    """A gdb value of an unsigned type holding `value` (gdb.Value(int) is signed)."""
    signed = value - (1 << 64) if value >= 1 << 63 else value
    return gdb.Value(signed).cast(gdb.lookup_type(type_name))


def _process(value: gdb.Value) -> int | str:
    """A pid, or an image name given as a string ("lsass.exe")."""
    code = value.type.strip_typedefs().code
    if code in (gdb.TYPE_CODE_ARRAY, gdb.TYPE_CODE_PTR) and \
            value.type.strip_typedefs().target().strip_typedefs().code == gdb.TYPE_CODE_INT and \
            value.type.strip_typedefs().target().sizeof == 1:
        return value.string()
    return int(value)


class _HandleFunction(gdb.Function):
    """Base: look the handle up, then give one field of the record."""

    def __init__(self, name: str, summary: str):
        self.__doc__ = (f"{summary}\nUsage: ${name}(HANDLE [, PID]); PID (or an image name in quotes) "
                        "defaults to the current process.")
        self.function = name
        super().__init__(name)

    def invoke(self, handle, pid=None):
        target = None if pid is None else _process(pid)
        try:
            with session.open(in_condition=True) as windows:
                if target is None:
                    target = queries.current_process(windows)[0].pid
                record = windows.lookup(target, int(handle) & MASK64)
        except HandleError as exc:
            raise gdb.GdbError(f"${self.function}: {exc}") from None
        return self.value(record)

    def value(self, record) -> gdb.Value:
        raise NotImplementedError


class _Object(_HandleFunction):
    def value(self, record):
        return _unsigned(record.object, "unsigned long long")


class _Type(_HandleFunction):
    def value(self, record):
        return _string(record.type)


class _Name(_HandleFunction):
    def value(self, record):
        return _string(record.name)


class _Access(_HandleFunction):
    def value(self, record):
        return _unsigned(record.granted_access, "unsigned int")


def register() -> None:
    _Object("handle_object", "The object body address a handle refers to.")
    _Type("handle_type", 'The object type name of a handle ("File", "Key", ...), for $_streq.')
    _Name("handle_name", "The object name of a handle (empty if the object has none).")
    _Access("handle_access", "The granted access mask of a handle.")
