"""The gdb front end: everything that imports gdb (memory through the stub, the session,
commands, settings, QMP commands). gdbinit.py calls `loader.register()`."""
