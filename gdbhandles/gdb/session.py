"""The engine of the guest gdb is attached to: where its memory comes from, and when it goes stale.

The session owns the memory source. A stopped target is read through QEMU's gdbstub in
physical mode; a running one, when auto-pause is on, through a RAM dump of the VM paused by
QMP (paused.py). Guest memory may change whenever the target ran, so the engine is reopened
after every gdb event that says so; discovery facts (kernel base, DTB) are kept as hints,
which costs a few reads instead of a scan, and discovery starts afresh if they no longer
validate.
"""

from __future__ import annotations

import contextlib

import gdb

from gdbhandles.engine import Windows
from gdbhandles.errors import HandleError
from gdbhandles.gdb import paused, settings
from gdbhandles.gdb.memory import GdbPhysical, TargetRunning, require_stopped_target, vcpu_registers

__all__ = ["Session"]

STUB_SOURCE = "QEMU physical mode (Qqemu.PhyMemMode)"
DUMP_SOURCE = "RAM dump of the VM paused through QMP (auto-pause)"


class Session:
    """One per gdb; `open()` gives a ready engine for the guest as it is now."""

    def __init__(self):
        self.phys: GdbPhysical | None = None
        self.windows: Windows | None = None
        self.isf: str | None = None
        self.fresh = False          # True while nothing ran since self.windows was opened
        self.opens = 0              # how often discovery ran from scratch (handle info shows it)
        self.source = None          # how the last engine read memory (handle info shows it)
        for event in (gdb.events.cont, gdb.events.stop, gdb.events.new_objfile,
                      gdb.events.memory_changed, gdb.events.register_changed):
            event.connect(self._target_changed)
        for event in (gdb.events.exited, gdb.events.connection_removed):
            event.connect(self._target_gone)

    def _target_changed(self, _event=None) -> None:
        self.fresh = False

    def _target_gone(self, _event=None) -> None:
        self.phys = None
        self.windows = None
        self.fresh = False

    def _check_profile(self) -> None:
        isf = settings.value("profile") or None
        if isf != self.isf:
            self.isf = isf
            self._target_gone()

    def memory_text(self) -> str:
        """One line for `handle info`: where the last engine's memory came from."""
        if self.source == DUMP_SOURCE or self.phys is None:
            return f"memory access: {self.source or 'none yet'}; discoveries this session: {self.opens}"
        ram = self.phys.ram
        ram_text = ", ".join(f"{a:#x}-{b:#x}" for a, b in ram) if ram else "unknown (no monitor)"
        return f"memory access: {self.source}; guest RAM: {ram_text}; discoveries this session: {self.opens}"

    @contextlib.contextmanager
    def open(self):
        """Yield a Windows engine for the guest: the stopped target through the gdbstub, or a
        running one through auto-pause."""
        self._check_profile()
        try:
            require_stopped_target()
        except TargetRunning:
            if not settings.value("auto-pause"):
                raise HandleError("the target is running: stop it first (Ctrl-C or `interrupt`), or let "
                                  "gdbhandles pause it: set handle qmp SOCKET, set handle auto-pause on") from None
            with paused.paused_dump() as dump:
                self.windows = self._discover(dump, [])
                self.fresh = False           # the dump is gone after this block
                self.source = DUMP_SOURCE
                yield self.windows
            return
        registers = vcpu_registers()
        if self.phys is None:
            self.phys = GdbPhysical()
        with self.phys.session():
            if not self.fresh or self.windows is None or self.source != STUB_SOURCE:
                self.windows = self._discover(self.phys, registers)
                self.fresh = True
                self.source = STUB_SOURCE
            else:
                self.windows.registers = registers   # the user may have selected another vCPU
            yield self.windows

    def _discover(self, phys, registers: list[dict]) -> Windows:
        """A new engine; the previous one's DTB and kernel base first, as hints."""
        previous = self.windows
        if previous is not None:
            facts = previous.info()
            try:
                windows = Windows.open(phys, registers=registers, dtb=facts.dtb,
                                       kernel_base=facts.kernel_base, isf=self.isf)
            except HandleError:
                pass                 # the guest rebooted or the kernel moved: start over
            else:                    # say how they were found in the first place
                windows.kernel.dtb_source = facts.dtb_source
                windows.kernel.base_source = f"{facts.kernel_base_source}; revalidated after the guest ran"
                return windows
        self.opens += 1
        return Windows.open(phys, registers=registers, isf=self.isf)
