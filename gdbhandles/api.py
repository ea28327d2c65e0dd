"""`from gdbhandles import api` inside gdb: the scripting API (gdbhandles/gdb/api.py).

A front end like cli.py: it needs gdb's embedded Python, so it only imports inside gdb."""

from gdbhandles.gdb.api import cid, cids, current, diff, find, free, lookup, processes, walk

__all__ = ["current", "processes", "walk", "lookup", "find", "cid", "cids", "free", "diff"]
