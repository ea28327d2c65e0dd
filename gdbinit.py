"""Load gdbhandles from this checkout into gdb: `gdb -x gdbinit.py` or `(gdb) source gdbinit.py`.

The loader itself is gdbhandles/gdbinit.py (the file an installed package's
`gdbhandles gdbinit` names); this one only runs it.
"""

import os

_loader = os.path.join(os.path.dirname(os.path.realpath(__file__)), "gdbhandles", "gdbinit.py")
with open(_loader) as _file:
    exec(compile(_file.read(), _loader, "exec"), {"__file__": _loader, "__name__": "gdbhandles_gdbinit"})
