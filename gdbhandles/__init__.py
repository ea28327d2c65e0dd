"""gdbhandles: Windows x64 handle tables read from a guest's physical memory.

The engine (`gdbhandles.engine.Windows`) knows only what a real guest offers: registers,
physical memory, the kernel image in it, and the layout tables shipped in `data/`.
"""
