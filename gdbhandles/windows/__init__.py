"""Windows kernel structures and their discovery, from physical memory up: memory and page
walk, layouts, PE, disassembly, kernel discovery, and one module per kernel structure.
Nothing here knows gdb, QMP or the output formats."""
