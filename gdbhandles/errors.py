"""Every failure a user can meet, as one-line messages (the gdb layer makes them GdbErrors)."""


class HandleError(Exception):
    """Base of all gdbhandles errors; str() is the one line shown to the user."""


class NotWindows(HandleError):
    """No Windows x64 kernel could be found in the guest."""


class UnknownBuild(HandleError):
    """The kernel's build has no shipped layout and no ISF was given."""


class ProfileError(HandleError):
    """A user-supplied ISF cannot be read or lacks what we need."""


class MissingGlobal(HandleError):
    """A kernel global (PspCidTable, ...) could not be located by any means."""


class UnreadablePage(HandleError):
    """A virtual or physical address whose page is not present or not backed by memory."""

    def __init__(self, address: int, what: str = "page", physical: bool = False):
        self.address = address
        kind = "physical address" if physical else "page at"
        super().__init__(f"unreadable {kind} {address:#x}" + (f" ({what})" if what != "page" else ""))


class ProcessNotFound(HandleError):
    """No process with that pid or name (or a name matching several)."""


class BadHandle(HandleError):
    """A handle value that does not name a valid entry; `record` is the LookupRecord."""

    def __init__(self, message: str, record=None):
        super().__init__(message)
        self.record = record


class CorruptTable(HandleError):
    """A handle table or process list whose structure contradicts itself."""
