"""Small modules, short functions: no function over 40 lines, no module over 300 lines unless
its docstring says why (it names its length: "… lines")."""

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gdbhandles"
MAX_FUNCTION, MAX_MODULE = 40, 300


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent).as_posix(), path.read_text()


def test_no_function_over_40_lines():
    long = []
    for name, text in _modules():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION:
                    long.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_long_modules_say_why():
    unexplained = []
    for name, text in _modules():
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_MODULE and not re.search(r"\d+ lines", doc):
            unexplained.append(f"{name} ({lines} lines)")
    assert not unexplained, unexplained
