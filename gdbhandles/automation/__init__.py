"""Driving QEMU and gdb from outside: QMP client, the gdb/MI driver, scripted runs against
VM snapshots and golden-file regression. Never imported by the gdb front end's core."""
