"""gdbhandles: Windows x64 handle tables read from a guest's physical memory.

The engine (`gdbhandles.engine.Windows`) knows only what a real guest offers: registers,
physical memory, the kernel image in it, and the layout tables shipped in `data/`.
The version below is the one place it is written (pyproject reads it).
"""

__version__ = "0.2.0"
