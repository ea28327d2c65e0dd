"""Which gdb expressions a handle argument may use: those that only read.

Arguments may be gdb expressions (`$rcx`, `*(long*)($rsp+0x28)`), and gdb would evaluate
anything: `*(long*)0xfffff80... = 4` writes guest memory, `f(1)` and `$fn(1)` run code in the
inferior or in gdb, `x++` writes, and a string literal may be copied into the inferior (which
calls its malloc). The text is checked before gdb sees it, conservatively: after string and
character literals are set aside, any assignment operator, `++`/`--`, string literal, and call
syntax (a name, `)` or `]` followed by `(`) is refused; a parenthesised group followed by `(`
is accepted only when it is a cast to a type (`(long*)($rsp+8)`).
"""

from __future__ import annotations

import re
from typing import Callable

__all__ = ["UnsafeExpression", "check_read_only"]

ASSIGNMENTS = {"=", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "<<=", ">>="}
STEPS = {"++", "--"}
OPERATORS = sorted(["<<=", ">>=", "->*", "==", "!=", "<=", ">=", "&&", "||", "++", "--", "+=", "-=", "*=",
                    "/=", "%=", "&=", "|=", "^=", "<<", ">>", "->", "::"], key=len, reverse=True)
TOKEN = re.compile(r"\s*(?:(?P<char>'(?:\\.|[^'\\])*')|(?P<string>\")|(?P<name>\$?[A-Za-z_][A-Za-z_0-9]*|\$\d*)"
                   r"|(?P<number>[0-9][0-9A-Za-z_.]*)|(?P<op>" + "|".join(map(re.escape, OPERATORS)) +
                   r"|[^\sA-Za-z_0-9]))")
NOT_CALLS = {"sizeof", "alignof", "_Alignof", "__alignof__"}       # look like calls, evaluate nothing
C_TYPE_WORDS = {"char", "short", "int", "long", "signed", "unsigned", "float", "double", "void", "_Bool",
                "const", "volatile", "struct", "union", "enum"}


class UnsafeExpression(ValueError):
    """The text might write guest memory or run code if gdb evaluated it."""


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, at = [], 0
    while at < len(text):
        match = TOKEN.match(text, at)
        if match is None:
            break                           # only white space is left
        kind = match.lastgroup
        if kind == "string":
            raise UnsafeExpression("string literals are not allowed (gdb may copy them into the guest)")
        if match.group(kind) == "'":
            raise UnsafeExpression(f"cannot read {text[at:].strip()!r} (an unterminated character literal)")
        tokens.append((kind, match.group(kind)))
        at = match.end()
    return tokens


def _group_start(tokens: list[tuple[str, str]], close: int) -> int:
    """Index of the `(` that the `)` at `close` closes."""
    depth = 0
    for i in range(close, -1, -1):
        depth += {")": 1, "(": -1}.get(tokens[i][1], 0) if tokens[i][0] == "op" else 0
        if depth == 0:
            return i
    raise UnsafeExpression("unbalanced parentheses")


def _is_cast(inner: list[tuple[str, str]], is_type: Callable[[str], bool]) -> bool:
    """`(type *)`: names and `*`, `&` only, and the names are C type words or a type gdb knows."""
    if not inner or any(kind not in ("name", "op") or (kind == "op" and value not in ("*", "&", "::"))
                        for kind, value in inner):
        return False
    words = [value for kind, value in inner if kind == "name"]
    if not words:
        return False
    if all(word in C_TYPE_WORDS for word in words):
        return True
    named = " ".join(w for w in words if w not in ("const", "volatile"))
    return is_type(named)


def check_read_only(text: str, is_type: Callable[[str], bool] = lambda name: False) -> None:
    """Raise UnsafeExpression unless evaluating `text` can only read. `is_type(name)` says
    whether a name is a type (for casts to typedefs); by default only C's own type words are."""
    tokens = _tokens(text)
    for i, (kind, value) in enumerate(tokens):
        if kind == "op" and value in ASSIGNMENTS:
            raise UnsafeExpression(f"assignment {value!r} is not allowed (handle commands never write guest memory)")
        if kind == "op" and value in STEPS:
            raise UnsafeExpression(f"{value!r} is not allowed (it writes)")
        following = tokens[i + 1][1] if i + 1 < len(tokens) and tokens[i + 1][0] == "op" else None
        if following != "(":
            continue
        if kind == "name" and value not in NOT_CALLS and value not in C_TYPE_WORDS:
            raise UnsafeExpression(f"function calls are not allowed ({value}(...) would run code)")
        if kind == "op" and value == "]":
            raise UnsafeExpression("function calls are not allowed (...](...) would run code)")
        if kind == "op" and value == ")":
            start = _group_start(tokens, i)
            if not _is_cast(tokens[start + 1:i], is_type):
                raise UnsafeExpression("function calls are not allowed ((...)(...) is a call unless the first "
                                       "group is a cast to a known type)")
