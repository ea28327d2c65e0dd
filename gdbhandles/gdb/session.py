"""The engine of the guest gdb is attached to: where its memory comes from, and when it goes stale.

The session owns the memory source. When QEMU runs on this host and we may read its memory,
guest RAM is read straight from the QEMU process (the fast path, fastpath.py), after the
mapping was checked against the gdbstub; otherwise a stopped target is read through QEMU's
gdbstub in physical mode. A running target, when auto-pause is on, is paused through QMP
and read through the fast path, or else through a RAM dump (paused.py). Guest memory may change whenever the target ran, so the engine is reopened
after every gdb event that says so; discovery facts (kernel base, DTB) are kept as hints,
which costs a few reads instead of a scan, and discovery starts afresh if they no longer
validate.
"""

from __future__ import annotations

import contextlib

import gdb

from gdbhandles.engine import Windows
from gdbhandles.errors import HandleError
from gdbhandles.gdb import fastpath, paused, settings
from gdbhandles.gdb.memory import (GdbPhysical, TargetRunning, require_stopped_target, stub_answers,
                                   vcpu_registers)

__all__ = ["Session"]

STUB_SOURCE = "QEMU physical mode (Qqemu.PhyMemMode)"
DUMP_SOURCE = "RAM dump of the VM paused through QMP (auto-pause)"
FAST_SOURCE = "QEMU process memory"


class Session:
    """One per gdb; `open()` gives a ready engine for the guest as it is now."""

    def __init__(self):
        self.phys: GdbPhysical | None = None
        self.windows: Windows | None = None
        self.isf: str | None = None
        self.layout = "auto"        # `set handle layout`
        self.dtb: int | None = None             # set handle dtb / kernel-base: given, not discovered
        self.kernel_base: int | None = None
        self.fresh = False          # True while nothing ran since self.windows was opened
        self.opens = 0              # how often discovery ran from scratch (handle info shows it)
        self.source = None          # how the last engine read memory (handle info shows it)
        self.fast = {}              # QemuRam of the QEMU process by how it was found ("stub", "qmp")
        self.fast_ram = None        # the one the last engine used
        self.fast_reason = ""       # why the fast path is not used
        self._fast_tried = {}       # the fast-path setting each way was last tried for
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
        for ram in self.fast.values():
            ram.close()
        self.fast, self.fast_ram, self.fast_reason, self._fast_tried = {}, None, "", {}

    def _check_profile(self) -> None:
        """A changed profile, layout choice, DTB or kernel base (`set handle …`): discovery afresh."""
        given = (settings.value("profile") or None, settings.value("layout"), settings.address("dtb"),
                 settings.address("kernel-base"))
        if given != (self.isf, self.layout, self.dtb, self.kernel_base):
            self.isf, self.layout, self.dtb, self.kernel_base = given
            self._target_gone()

    def memory_text(self) -> str:
        """Lines for `handle info`: where the last engine's memory came from, and why not faster."""
        if self.source == FAST_SOURCE and self.fast_ram is not None:
            ram = ", ".join(f"{r.start:#x}-{r.end:#x}" for r in self.fast_ram.ranges)
            where = (f"{FAST_SOURCE} (/proc/{self.fast_ram.pid}/mem, the fast path); guest RAM: {ram}; "
                     f"mapping checked: {self.fast_ram.verified}")
        elif self.source == DUMP_SOURCE or self.phys is None:
            where = self.source or "none yet"
        else:
            ram = self.phys.ram
            where = f"{self.source}; guest RAM: " + (", ".join(f"{a:#x}-{b:#x}" for a, b in ram) if ram
                                                       else "unknown (no monitor)")
        text = f"memory access: {where}; discoveries this session: {self.opens}"
        if self.source != FAST_SOURCE and self.fast_reason:
            text += f"\nfast path not used: {self.fast_reason}"
        return text

    def _fast_path(self, origin: str, mapper):
        """The checked QemuRam found through `origin` ("stub" or "qmp"), mapped with `mapper()`
        once per value of the setting; None (the reason in fast_reason) if unavailable; a
        one-line error under `set handle fast-path on`."""
        mode = settings.value("fast-path")
        if mode == "off":
            self.fast_reason = "set handle fast-path off"
            return None
        if origin not in self.fast and self._fast_tried.get(origin) != mode:
            self._fast_tried[origin] = mode
            try:
                self.fast[origin] = mapper()
            except HandleError as exc:
                self.fast_reason = str(exc)
        ram = self.fast.get(origin)
        if ram is None and mode == "on":
            raise HandleError(f"fast path unavailable (set handle fast-path auto or off): {self.fast_reason}")
        return ram

    @contextlib.contextmanager
    def _paused_memory(self, q):
        """The paused VM's memory: the QEMU process behind the QMP socket, else a RAM dump."""
        stub = self.fast.get("stub")
        try:
            same = stub is not None and stub.pid == fastpath.qmp_pid(q)
        except HandleError:
            same = False
        ram = stub if same else self._fast_path("qmp", lambda: fastpath.from_qmp(q))
        if ram is not None:
            self.fast_ram = ram
            yield ram, FAST_SOURCE
            return
        with paused.ram_dump(q) as dump:
            yield dump, DUMP_SOURCE

    @contextlib.contextmanager
    def open(self, in_condition: bool = False):
        """Yield a Windows engine for the guest: the stopped target through the fast path or the
        gdbstub, or a running one through auto-pause. `in_condition`: called from an expression
        (the $handle_* functions), which gdb may evaluate in a breakpoint condition, when the
        vCPUs are stopped but gdb still calls the thread running."""
        self._check_profile()
        try:
            require_stopped_target()
            in_condition = False
        except TargetRunning:
            if not (in_condition and stub_answers()):
                with self._paused() as windows:
                    yield windows
                return
            self.fresh = False      # gdb may resume after a false condition without telling us
        registers = vcpu_registers(in_condition)
        if self.phys is None:
            self.phys = GdbPhysical()
        fast = self._fast_path("stub", lambda: self._map_through_stub(registers))
        if fast is not None:
            self.fast_ram = fast
        with contextlib.ExitStack() as stack:
            if fast is None:
                stack.enter_context(self.phys.session())
            source = FAST_SOURCE if fast is not None else STUB_SOURCE
            if not self.fresh or self.windows is None or self.source != source:
                self.windows = self._discover(fast or self.phys, registers)
                self.fresh = True
                self.source = source
            else:
                self.windows.registers = registers   # the user may have selected another vCPU
            yield self.windows
        if in_condition:
            self.fresh = False

    @contextlib.contextmanager
    def _paused(self):
        """A running target: an engine on the VM paused through QMP (fast path or RAM dump)."""
        if not settings.value("auto-pause"):
            raise HandleError("the target is running: stop it first (Ctrl-C or `interrupt`), or let "
                              "gdbhandles pause it: set handle qmp SOCKET, set handle auto-pause on")
        with paused.paused_vm() as q, self._paused_memory(q) as (memory, source):
            self.windows = self._discover(memory, [])
            self.fresh = False           # the VM runs again after this block
            self.source = source
            yield self.windows

    def _map_through_stub(self, registers: list[dict]):
        with self.phys.session():
            return fastpath.from_stub(self.phys.read, registers)

    def _discover(self, phys, registers: list[dict]) -> Windows:
        """A new engine; the previous one's DTB and kernel base first, as hints."""
        previous = self.windows
        if previous is not None:
            facts = previous.kernel       # not info(): that runs the whole-list checks
            try:
                windows = Windows.open(phys, registers=registers, dtb=facts.space.dtb,
                                       kernel_base=facts.base, isf=self.isf, layout=self.layout)
            except HandleError:
                pass                 # the guest rebooted or the kernel moved: start over
            else:                    # say how they were found in the first place
                windows.kernel.dtb_source = facts.dtb_source
                windows.kernel.base_source = f"{facts.base_source}; revalidated after the guest ran"
                return windows
        self.opens += 1
        return Windows.open(phys, registers=registers, dtb=self.dtb, kernel_base=self.kernel_base, isf=self.isf,
                            layout=self.layout)
