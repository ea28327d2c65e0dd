"""Handle arguments never write and never wrap: the read-only check of gdb expressions, and the
range rules of numbers (the live proof, guest RAM unchanged by a hostile session, is in
test_faults.py)."""

from __future__ import annotations

import argparse

import pytest

from gdbhandles import commandspec
from gdbhandles.expressions import UnsafeExpression, check_read_only

READS = ["$rcx", "$rsp+8", "*(long*)($rsp+0x28)", "*(unsigned long long *)($rsp + 0x28)", "$rax == 4",
         "$rax != 4", "$rax <= 4", "$rax >= 4", "$rax << 2", "$rax >> 2", "sizeof(long)", "(long)$rcx",
         "'='", "'\\''", "$rax ? 4 : 8", "{long}($rsp+8)", "-$rax", "$1", "$$2", "(char)(4)",
         "*(HANDLE *)($rsp+8)"]
WRITES = {
    "*(unsigned long long*)0xfffff8010e805ba2 = 0x4": "assignment '='",
    "$rax=4": "assignment '='", "$rax += 4": "assignment '+='", "$rax <<= 1": "assignment '<<='",
    "$rax >>= 1": "assignment '>>='", "$rax|=1": "assignment '|='", "$rax++": "'++'", "--$rax": "'--'",
    "malloc(16)": "malloc(...) would run code", "$_strlen(\"x\")": "string literals",
    "$_as_string(1)": "$_as_string(...) would run code", "f (1)": "f(...) would run code",
    "(*(long(*)())0x1000)()": "function calls", "(f)(1)": "(...)(...) is a call",
    "(*fp)(1)": "(...)(...) is a call", "fp[0](1)": "...](...)", "\"abc\"": "string literals",
    "'a": "unterminated", "(HANDLE)(4)": "(...)(...) is a call",
    "*(long*)($rsp) = '='": "assignment '='", "1, $rax = 2": "assignment '='",
}


@pytest.mark.parametrize("text", READS)
def test_reads_are_accepted(text):
    check_read_only(text, is_type=lambda name: name == "HANDLE")


@pytest.mark.parametrize("text", sorted(WRITES))
def test_writes_and_calls_are_refused(text):
    with pytest.raises(UnsafeExpression) as exc:
        check_read_only(text)
    assert WRITES[text] in str(exc.value)


def test_numbers_do_not_wrap():
    assert commandspec.number("0xffffffffffffffff") == (1 << 64) - 1
    assert commandspec.handle_value("-1") == (1 << 64) - 1
    assert commandspec.handle_value("-2") == (1 << 64) - 2
    for text, message in ((str((1 << 64) + 4), "larger than 64 bits"), ("0x10000000000000004", "larger than 64"),
                          ("-4", "negative"), ("-3", "negative")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            commandspec.handle_value(text)
    with pytest.raises(argparse.ArgumentTypeError, match="negative"):
        commandspec.process("-4")
    with pytest.raises(argparse.ArgumentTypeError, match="negative"):
        commandspec.number("-1")
