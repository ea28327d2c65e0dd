"""Discovery in order: the kernel (kernel.py), its layout (shipped, ISF, or inferred), its
globals (kernel_globals.py), then the invariants every later step relies on (validate.py)."""

from __future__ import annotations

from gdbhandles.windows import (infer, infer_cpu, infer_keys, infer_threads, kernel as kernel_module, kernel_globals,
                                layouts, validate)
from gdbhandles.windows.kernel import Kernel
from gdbhandles.windows.memory import PhysicalMemory

LAYOUT_MODES = ("auto", "infer")


def discover(phys: PhysicalMemory, registers: list[dict] | None = None, dtb: int | None = None,
             kernel_base: int | None = None, isf: str | None = None, layout: str = "auto",
             progress=None) -> Kernel:
    """The running kernel with every fact it found and how; `layout="infer"` ignores shipped layouts.
    `progress(text)` hears of long steps (the PML4 scan of a large dump)."""
    registers = registers or []
    found = kernel_module.locate(phys, registers, dtb, kernel_base, progress)
    space = found.space
    build = kernel_module.build_number(space, found.base, found.image)
    chosen, symbols = kernel_module.choose_layout(found.image, build, isf, infer=layout == "infer")
    kernel = Kernel(phys, space, found.dtb_source, found.base, found.base_source, found.image, build,
                    chosen or infer.nearest_base(build),
                    layout_own=isinstance(chosen, layouts.ProfileLayout) and chosen is symbols)
    inferred = None
    if chosen is None:
        inferred = kernel.layout = infer.InferredLayout(kernel.layout, build)
        system = space.u64(kernel_globals.export(kernel, "PsInitialSystemProcess"))
        infer.infer_process(kernel, inferred, system)
        infer_cpu.check_dtb(kernel, inferred)          # its first way only: no process list yet
        infer_threads.infer_thread_code(kernel, inferred)
    kernel_globals.resolve(kernel, symbols)
    if inferred is not None:
        infer_threads.check_threads(kernel, inferred)
        infer_cpu.check_dtb(kernel, inferred)
        infer_cpu.check_current_thread(kernel, inferred, registers)
        infer_keys.infer_kcb(kernel, inferred)
    validate.run(kernel)
    return kernel
