"""Builder of Windows-like x64 test guests: memory that looks like a real kernel's.

Independent of the `gdbhandles` engine on purpose: both implement the same Windows
facts and the tests check one against the other.
"""
