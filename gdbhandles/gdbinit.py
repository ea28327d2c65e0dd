"""Load gdbhandles into gdb: `gdb -x "$(gdbhandles gdbinit)"`, or `source` this file.

gdb's embedded Python knows neither this package nor its dependencies (capstone, …), so put
the directory holding the package on sys.path (a checkout, or the site-packages it was
installed into, which holds the dependencies too), then the site-packages of a matching
venv: the checkout's `.venv`, else `$VIRTUAL_ENV`. Sourcing it twice does nothing new.
The checkout's top-level gdbinit.py runs this file.

Before sourcing, `GDBHANDLES_PREFIX=word` in the environment (or `set $gdbhandles_prefix =
"word"` in gdb) names the command prefix instead of `handle`, which keeps gdb's built-in
`handle SIGNAL ACTIONS` working.
"""

import os
import site
import sys

import gdb


def _site_packages(venv):
    """The venv's site-packages for gdb's own Python version, if it has one."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    path = os.path.join(venv, "lib", version, "site-packages")
    return path if os.path.isdir(path) else None


def _add_paths():
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    for venv in (os.path.join(root, ".venv"), os.environ.get("VIRTUAL_ENV")):
        packages = venv and _site_packages(venv)
        if packages and packages not in sys.path:
            site.addsitedir(packages)
    return root


def _load():
    """Register the commands, or say in one message what is missing and how to install it."""
    root = _add_paths()
    try:
        import capstone  # noqa: F401  (the engine needs it to find unexported globals)
        from gdbhandles.gdb import loader
    except ImportError as exc:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        gdb.write(
            f"gdbhandles: cannot import {exc.name or exc}: gdb's Python {version} needs the "
            f"package and its dependencies; run `python{version} -m venv {root}/.venv && "
            f"{root}/.venv/bin/pip install {root}` (or start gdb in an activated venv of "
            f"Python {version} that has them)\n", gdb.STDERR)
        return
    loader.register()


_load()
