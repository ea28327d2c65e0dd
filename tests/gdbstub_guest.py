"""A trivial QEMU guest that is not Windows, for the gdb layer's own tests.

A multiboot stub (nasm) that enters long mode, maps the first 64 MiB at KBASE with 2 MiB
pages, drops its identity map, sets GS base, fills 64 KiB at physical 0x400000 with qwords
holding their own physical address, and spins. It lets the MI driver and the physical
memory backend be tested against real QEMU and gdb, and is the "not a Windows guest" target.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

KBASE = 0xFFFFF80000000000
PATTERN_PHYS = 0x400000      # 64 KiB of qwords == their physical address
PATTERN_SIZE = 0x10000
RAM_MIB = 128

STUB_ASM = r"""; A trivial long-mode multiboot guest: not Windows. Upper-half alias of the first
; 64 MiB at KBASE, GS base set, a page of self-describing qwords, then a spin loop.
bits 32
org 0x100000
KBASE equ 0xFFFFF80000000000
MB_MAGIC equ 0x1BADB002
MB_FLAGS equ 0x00010002
header:
    dd MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    dd header, 0x100000, load_end, bss_end, entry
entry:
    cli
    mov edi, pd                 ; 32 x 2 MiB pages = 64 MiB
    xor eax, eax
    mov ecx, 32
.pd: mov edx, eax
    or edx, 0x83
    mov [edi], edx
    mov dword [edi + 4], 0
    add eax, 0x200000
    add edi, 8
    loop .pd
    mov dword [pdpt], pd + 3
    mov dword [pml4], pdpt + 3
    mov dword [pml4 + 496 * 8], pdpt + 3
    mov eax, pml4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20                ; PAE
    mov cr4, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x101               ; LME | SCE
    wrmsr
    mov eax, cr0
    or eax, 0x80010001          ; PG | WP | PE
    mov cr0, eax
    lgdt [gdtr]
    jmp 0x08:long_low
bits 64
long_low:
    mov rax, KBASE + high
    jmp rax
high:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, KBASE + stack_top
    mov qword [rel pml4], 0     ; drop the identity map
    mov rax, cr3
    mov cr3, rax
    mov ecx, 0xC0000101         ; GS base
    mov rax, KBASE + 0x900000
    mov rdx, rax
    shr rdx, 32
    wrmsr
    mov rdi, KBASE + 0x400000   ; 64 KiB of qwords holding their own physical address
    mov rax, 0x400000
    mov ecx, 8192
.fill: mov [rdi], rax
    add rax, 8
    add rdi, 8
    loop .fill
    mov r15, 0x1122334455667788
.spin:
    inc qword [rel counter]
    jmp .spin
align 8
gdt: dq 0, 0x00209A0000000000, 0x0000920000000000
gdtr: dw 23
    dd gdt
counter: dq 0
load_end:
align 4096
pml4: times 4096 db 0
pdpt: times 4096 db 0
pd: times 4096 db 0
times 8192 db 0
stack_top:
bss_end:
"""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bind port 0, read it, close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_stub(directory: Path) -> Path:
    src = directory / "stub.asm"
    out = directory / "stub.bin"
    src.write_text(STUB_ASM)
    subprocess.run(["nasm", "-w-all", "-f", "bin", "-o", str(out), str(src)], check=True)
    return out


@contextlib.contextmanager
def qemu(kernel: bool = True, smp: int = 2, ram_mib: int = RAM_MIB):
    """Boot QEMU (TCG) with the stub (or with nothing bootable); yields the gdbstub port.

    The VM is always killed on exit."""
    with tempfile.TemporaryDirectory(prefix="gdbh-stub-") as tmp:
        port = free_port()
        args = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(ram_mib), "-smp", str(smp),
                "-display", "none", "-monitor", "none", "-serial", "none", "-no-reboot",
                "-gdb", f"tcp:127.0.0.1:{port}"]
        if kernel:
            args += ["-kernel", str(build_stub(Path(tmp)))]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while True:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"QEMU did not start: {proc.stderr.read().decode()}")
                time.sleep(0.02)
            yield port
        finally:
            proc.kill()
            proc.wait()
            proc.stderr.close()


def settle(gdb, timeout: float = 10.0) -> None:
    """Let the stub run until vCPU 0 spins in the upper half (gdb attached, target stopped)."""
    deadline = time.monotonic() + timeout
    while True:
        rip = int(gdb.console("output/x $rip"), 16)
        if rip & (1 << 63) and rip >= KBASE:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"stub guest never reached long mode (rip {rip:#x})")
        gdb.cont()
        time.sleep(0.2)
        gdb.interrupt()
