"""Every failure a user can meet, as one-line messages (the gdb layer makes them GdbErrors).

A message says what went wrong, never which command or flag to try: that depends on where
the user is (gdb or the shell). An error names the kind of advice that helps (`Advice`),
and each front end appends its own words for it.
"""

import enum


class Advice(enum.Enum):
    """What would help, in front-end-neutral terms."""
    LIST_PROCESSES = "list the processes"
    LOCATE_KERNEL = "give the kernel's DTB and base yourself"
    SUPPLY_PROFILE = "supply a volatility3 ISF"
    STOP_TARGET = "stop the target or let gdbhandles pause it"


class HandleError(Exception):
    """Base of all gdbhandles errors; str() is the one line shown to the user, `advice` what helps."""

    advice: Advice | None = None

    def __init__(self, message: str = "", advice: Advice | None = None):
        super().__init__(message)
        if advice is not None:
            self.advice = advice


class NotWindows(HandleError):
    """No Windows x64 kernel could be found in the guest."""

    advice = Advice.LOCATE_KERNEL


class UnknownBuild(HandleError):
    """The kernel's build has no shipped layout and no ISF was given."""

    advice = Advice.SUPPLY_PROFILE


class ProfileError(HandleError):
    """A user-supplied ISF cannot be read or lacks what we need."""


class MissingGlobal(HandleError):
    """A kernel global (PspCidTable, ...) could not be located by any means."""

    advice = Advice.SUPPLY_PROFILE


class UnreadablePage(HandleError):
    """A virtual or physical address whose page is not present or not backed by memory."""

    def __init__(self, address: int, what: str = "page", physical: bool = False):
        self.address = address
        kind = "physical address" if physical else "page at"
        super().__init__(f"unreadable {kind} {address:#x}" + (f" ({what})" if what != "page" else ""))


class ProcessNotFound(HandleError):
    """No process with that pid or name (or a name matching several)."""

    advice = Advice.LIST_PROCESSES


class UnknownType(HandleError):
    """An object type name this guest does not have (the message lists the guest's types)."""


class NoHandleTable(HandleError):
    """A process whose ObjectTable is NULL (exiting): it has no handles to walk or look up."""


class BadHandle(HandleError):
    """A handle value that does not name a valid entry; `record` is the LookupRecord."""

    def __init__(self, message: str, record=None, advice: Advice | None = None):
        super().__init__(message, advice)
        self.record = record


class CorruptTable(HandleError):
    """A handle table or process list whose structure contradicts itself."""


class DamagedChain(CorruptTable):
    """A chain of kernel structures shared by many objects (key control blocks up ParentKcb,
    object directories up Directory) that loops or runs too deep: said once, not per object."""
