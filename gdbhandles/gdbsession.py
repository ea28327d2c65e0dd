"""The engine's view of the guest gdb is attached to, and when it goes stale.

Guest memory may change whenever the target ran, so the engine's page cache is dropped on
every gdb event that says so. Discovery (kernel base, DTB, layout, globals) is kept: the
next command re-opens the engine with those facts as hints, which costs a few reads
instead of a scan, and discovers afresh if the hinted kernel no longer validates.
"""

from __future__ import annotations

import contextlib

import gdb

from gdbhandles.engine import Windows
from gdbhandles.errors import HandleError
from gdbhandles.gdbmemory import GdbPhysical, TargetRunning, require_stopped_target, vcpu_registers


class Session:
    """One per gdb; `open()` gives a ready engine inside physical-mode reads."""

    def __init__(self):
        self.phys: GdbPhysical | None = None
        self.windows: Windows | None = None
        self.isf: str | None = None
        self.fresh = False          # True while nothing ran since self.windows was opened
        self.opens = 0              # how often discovery ran (handle info shows it)
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

    def set_profile(self, isf: str | None) -> None:
        """A user's volatility3 ISF: rediscover with it."""
        self.isf = isf or None
        self._target_gone()

    @contextlib.contextmanager
    def open(self):
        """Yield a Windows engine for the stopped target, reading physical memory throughout;
        for a running one, what auto-pause offers (qmpcommands)."""
        try:
            require_stopped_target()
        except TargetRunning:
            from gdbhandles import qmpcommands      # the QMP layer builds on this one
            with qmpcommands.running_view(self) as windows:
                yield windows
            return
        registers = vcpu_registers()
        if self.phys is None:
            self.phys = GdbPhysical()
        with self.phys.session():
            if not self.fresh or self.windows is None:
                self.windows = self._discover(registers)
                self.fresh = True
            else:
                self.windows.registers = registers   # the user may have selected another vCPU
            yield self.windows

    def _discover(self, registers: list[dict]) -> Windows:
        previous = self.windows
        if previous is not None:
            facts = previous.info()
            try:
                windows = Windows.open(self.phys, registers=registers, dtb=facts.dtb,
                                       kernel_base=facts.kernel_base, isf=self.isf)
            except HandleError:
                pass                 # the guest rebooted or the kernel moved: start over
            else:                    # say how they were found in the first place
                windows.kernel.dtb_source = facts.dtb_source
                windows.kernel.base_source = f"{facts.kernel_base_source}; revalidated after the guest ran"
                return windows
        self.opens += 1
        return Windows.open(self.phys, registers=registers, isf=self.isf)
