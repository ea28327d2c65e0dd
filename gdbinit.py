"""Load gdbhandles into gdb: `gdb -x gdbinit.py` or `(gdb) source /path/to/gdbinit.py`.

gdb's embedded Python knows neither this package nor its dependencies (capstone, …), so put
the package next to this file on sys.path, then the site-packages of a matching venv: the
project's `.venv`, else `$VIRTUAL_ENV`. Sourcing it twice does nothing new.
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
    here = os.path.dirname(os.path.realpath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    for venv in (os.path.join(here, ".venv"), os.environ.get("VIRTUAL_ENV")):
        packages = venv and _site_packages(venv)
        if packages and packages not in sys.path:
            site.addsitedir(packages)
    return here


def _load():
    """Register the commands, or say in one message what is missing and how to install it."""
    here = _add_paths()
    try:
        import capstone  # noqa: F401  (the engine needs it to find unexported globals)
        from gdbhandles.gdb import loader
    except ImportError as exc:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        gdb.write(
            f"gdbhandles: cannot import {exc.name or exc}: gdb's Python {version} needs the "
            f"package and its dependencies; run `python{version} -m venv {here}/.venv && "
            f"{here}/.venv/bin/pip install -e {here}` (or start gdb in an activated venv of "
            f"Python {version} that has them)\n", gdb.STDERR)
        return
    loader.register()


_load()
