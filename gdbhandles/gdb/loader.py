"""What gdbinit.py calls: create the `handle` commands and settings once."""

from gdbhandles.gdb import commands, functions, qmp_commands, workflow_commands  # noqa: F401  (command bodies)

_registered = False


def register() -> None:
    """Sourcing gdbinit.py twice changes nothing."""
    global _registered
    if not _registered:
        commands.register()
        functions.register()
        _registered = True
