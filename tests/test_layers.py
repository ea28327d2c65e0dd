"""The arrow rule, checked by parsing imports: front ends -> engine -> windows -> memory.

Layers, lowest first: errors; windows (kernel structures, discovery, memory); records, the
engine facade and render; then the front ends: automation (QMP, MI, runs), gdb, cli. A
module may import its own layer and any lower one, never a higher one, and no import cycle
may exist anywhere in the package.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gdbhandles"

RANK = {"gdbhandles.errors": 0, "gdbhandles.windows": 1, "gdbhandles.records": 2, "gdbhandles.diff": 2,
        "gdbhandles.engine": 3, "gdbhandles.queries": 3, "gdbhandles.processes": 3, "gdbhandles.render": 3, "gdbhandles.version": 3,
        "gdbhandles.render_queries": 3,
        "gdbhandles.commandspec": 3, "gdbhandles.expressions": 3, "gdbhandles.automation": 4, "gdbhandles.gdb": 5, "gdbhandles.cli": 6, "gdbhandles.api": 6,
        "gdbhandles.__main__": 6, "gdbhandles.pytest_plugin": 6, "gdbhandles.gdbinit": 7}


def _modules() -> dict[str, set[str]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        found[name] = {d for d in deps if d.startswith("gdbhandles")}
    return found


def _rank(module: str) -> int | None:
    best = None
    for prefix, rank in RANK.items():
        if module == prefix or module.startswith(prefix + "."):
            best = rank
    return best


def test_every_module_has_a_layer():
    unranked = [m for m in _modules() if m != "gdbhandles" and _rank(m) is None]
    assert not unranked, f"add these modules to a layer in RANK: {unranked}"


def test_no_upward_import():
    modules = _modules()
    upward = []
    for module, deps in modules.items():
        mine = _rank(module)
        for dep in deps:
            theirs = _rank(dep) if dep in modules or dep.rsplit(".", 1)[0] in modules else None
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} -> {dep}")
    assert not upward, upward


def test_no_import_cycle():
    modules = _modules()
    graph = {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}
    cycles, done = [], set()

    def visit(module, path):
        if module in path:
            cycles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, cycles
