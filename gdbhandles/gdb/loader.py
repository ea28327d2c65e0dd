"""What gdbinit.py calls: create the `handle` commands and settings once."""

from gdbhandles.gdb import commands, qmp_commands  # noqa: F401  (qmp_commands declares subcommands)

_registered = False


def register() -> None:
    """Sourcing gdbinit.py twice changes nothing."""
    global _registered
    if not _registered:
        commands.register()
        _registered = True
