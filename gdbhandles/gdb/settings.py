"""`set/show handle …`: every gdbhandles setting, as gdb parameters, in one place.

Other modules read a setting with `value(name)`; nothing here calls back into the session
(the session notices a changed profile the next time it opens the engine).
"""

from __future__ import annotations

import argparse
import os

import gdb

from gdbhandles import commandspec
from gdbhandles.errors import HandleError
from gdbhandles.gdb.prefix import NAME as PREFIX
from gdbhandles.windows import layouts

__all__ = ["address", "register", "value"]


class _SettingsPrefix(gdb.Command):
    def __init__(self, verb: str):
        self.__doc__ = f"{verb.capitalize()} gdbhandles settings."
        self.verb = verb
        super().__init__(f"{verb} {PREFIX}", gdb.COMMAND_DATA, prefix=True)

    def invoke(self, argument: str, from_tty: bool) -> None:
        if self.verb == "show":
            for name in SETTINGS:
                gdb.execute(f"show {PREFIX} {name}")
        else:
            gdb.execute(f"help set {PREFIX}")


class CheckedParameter(gdb.Parameter):
    """A setting checked when it is set: a value `accept()` refuses is one error line, and the
    setting keeps the value it had (a wrong path or address never lingers until the next walk)."""

    def __init__(self, name: str, kind: int):
        super().__init__(f"{PREFIX} {name}", gdb.COMMAND_DATA, kind)
        self.value = ""
        self.accepted = ""

    def accept(self, text: str) -> str:
        """The value to keep for `text`; HandleError says why it is refused."""
        raise NotImplementedError

    def announce(self, value: str) -> str:
        """What `set` prints for an accepted value."""
        raise NotImplementedError

    def get_set_string(self):
        try:
            self.value = self.accept(self.value or "")
        except HandleError as exc:
            self.value = self.accepted
            raise gdb.GdbError(str(exc)) from None
        self.accepted = self.value
        return self.announce(self.value)


class ProfileParameter(CheckedParameter):
    """A volatility3 ISF file (JSON, optionally .xz/.gz) with the layout and symbols of a kernel build
gdbhandles does not ship. Empty: use the shipped profiles."""

    set_doc = "Set the volatility3 ISF profile file for unknown kernel builds."
    show_doc = "Show the volatility3 ISF profile file."

    def __init__(self):
        super().__init__("profile", gdb.PARAM_OPTIONAL_FILENAME)

    def accept(self, text: str) -> str:
        if text and not os.path.isfile(text):
            raise HandleError(f"no such file: {text}")
        if text:
            layouts.read_isf(text)        # a file that is no ISF is refused now, not at the next walk
        return text

    def announce(self, value: str) -> str:
        return f"gdbhandles will use {value}" if value else "gdbhandles will use its shipped profiles"

    def get_show_string(self, svalue):
        return f"ISF profile: {svalue or '(none: shipped profiles)'}"


class LayoutParameter(gdb.Parameter):
    """Where structure offsets come from: auto (shipped layout by PDB GUID or build, or the ISF of
`set handle profile`; inferred when none fits) or infer (always derived from the kernel's code
and live data, shipped layouts ignored)."""

    set_doc = "Set where structure offsets come from (auto or infer)."
    show_doc = "Show where structure offsets come from."
    default = "auto"

    def __init__(self):
        super().__init__(f"{PREFIX} layout", gdb.COMMAND_DATA, gdb.PARAM_ENUM, ["auto", "infer"])
        self.value = self.default

    def get_set_string(self):
        return "" if self.value == "auto" else "structure offsets will be inferred from the kernel"

    def get_show_string(self, svalue):
        return f"Layout: {svalue}"


class AddressParameter(CheckedParameter):
    """An address that replaces one discovery step (subclasses name it); empty: discover it."""

    name = ""
    what = ""

    def __init__(self):
        super().__init__(self.name, gdb.PARAM_STRING)

    def accept(self, text: str) -> str:
        text = text.strip()
        if text:
            try:
                address = commandspec.number(text)
            except argparse.ArgumentTypeError as exc:
                raise HandleError(f"{PREFIX} {self.name}: {exc}") from None
            if address & 0xFFF:
                raise HandleError(f"{PREFIX} {self.name}: {address:#x} is not page-aligned (it must end in 000)")
        return text

    def announce(self, value: str) -> str:
        return f"{self.what}: {value}" if value else f"{self.what}: discovered"

    def get_show_string(self, svalue):
        return f"{self.what}: {svalue or '(discovered)'}"


class DtbParameter(AddressParameter):
    """The kernel's DTB (physical address of its PML4), when discovery cannot find it. Empty: discover."""

    set_doc = "Set the kernel DTB gdbhandles uses instead of discovering it."
    show_doc = "Show the kernel DTB given to gdbhandles."
    name, what = "dtb", "Kernel DTB"


class KernelBaseParameter(AddressParameter):
    """The ntoskrnl base address, when discovery cannot find it. Empty: discover."""

    set_doc = "Set the kernel base gdbhandles uses instead of discovering it."
    show_doc = "Show the kernel base given to gdbhandles."
    name, what = "kernel-base", "Kernel base"


def address(name: str) -> int | None:
    """`set handle dtb`/`kernel-base` as a number, None when discovery should find it."""
    text = value(name)
    return commandspec.number(text) if text else None


class QmpParameter(gdb.Parameter):
    """QEMU's QMP socket: a unix socket path or tcp:127.0.0.1:PORT (for handle pause/resume)."""

    set_doc = "Set the QMP socket of the QEMU guest."
    show_doc = "Show the QMP socket of the QEMU guest."

    def __init__(self):
        super().__init__(f"{PREFIX} qmp", gdb.COMMAND_DATA, gdb.PARAM_STRING)
        self.value = ""

    def get_set_string(self):
        return f"QMP socket: {self.value}" if self.value else "QMP not used"

    def get_show_string(self, svalue):
        return f"QMP socket: {svalue or '(none)'}"


class BooleanParameter(gdb.Parameter):
    """An on/off `handle` setting: subclasses give its name, texts and default."""

    name = ""
    shown_as = ""
    default = False

    def __init__(self):
        super().__init__(f"{PREFIX} {self.name}", gdb.COMMAND_DATA, gdb.PARAM_BOOLEAN)
        self.value = self.default

    def get_set_string(self):
        return ""

    def get_show_string(self, svalue):
        return f"{self.shown_as}: {svalue}"


class ProgressParameter(BooleanParameter):
    """Whether long walks report their progress."""

    set_doc = "Set whether long walks report progress."
    show_doc = "Show whether long walks report progress."
    name, shown_as, default = "progress", "Progress reports on long walks", True


class AutoPauseParameter(BooleanParameter):
    """Whether a walk or lookup of a running guest pauses the VM through QMP (set handle qmp first)."""

    set_doc = "Set whether walks of a running guest pause the VM through QMP."
    show_doc = "Show whether walks of a running guest pause the VM through QMP."
    name, shown_as = "auto-pause", "Auto-pause of a running guest through QMP"

    def get_set_string(self):
        if self.value and not value("qmp"):
            return "auto-pause is on, but no QMP socket is set (set handle qmp SOCKET)"
        return ""


class FastPathParameter(gdb.Parameter):
    """Read guest RAM straight from a QEMU process on this host (/proc/PID/mem), checked against
the gdbstub first: auto (when available, else the stub), on (fail if unavailable), off (the stub)."""

    set_doc = "Set whether guest RAM is read from the local QEMU process (auto, on, off)."
    show_doc = "Show whether guest RAM is read from the local QEMU process."
    default = "auto"

    def __init__(self):
        super().__init__(f"{PREFIX} fast-path", gdb.COMMAND_DATA, gdb.PARAM_ENUM, ["auto", "on", "off"])
        self.value = self.default

    def get_set_string(self):
        return ""

    def get_show_string(self, svalue):
        return f"Reading guest RAM from the local QEMU process: {svalue} (handle info says whether it is used)"


SETTINGS = {"profile": ProfileParameter, "layout": LayoutParameter, "dtb": DtbParameter,
            "kernel-base": KernelBaseParameter, "qmp": QmpParameter, "progress": ProgressParameter,
            "auto-pause": AutoPauseParameter, "fast-path": FastPathParameter}
_parameters: dict[str, gdb.Parameter] = {}


def value(name: str):
    """The current value of `set handle NAME` (its default before registration)."""
    parameter = _parameters.get(name)
    return parameter.value if parameter is not None else getattr(SETTINGS[name], "default", "")


def register() -> None:
    _SettingsPrefix("set")
    _SettingsPrefix("show")
    for name, cls in SETTINGS.items():
        _parameters[name] = cls()
