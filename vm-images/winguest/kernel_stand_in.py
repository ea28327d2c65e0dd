"""TEMPORARY STAND-IN for kernel_image.py/isf.py until they land (then this file goes).

Not a PE: data with the globals at the profile's RVAs, an idle loop, a counter loop and 256
IDT stubs. Enough to boot and to check processes and handles; nothing here is a realistic
ntoskrnl, and symbols.json from it is empty.
"""
from dataclasses import dataclass, field
import struct

@dataclass
class Section:
    name: str; rva: int; vsize: int; characteristics: int

@dataclass
class KernelImage:
    base: int; data: bytearray; symbols: dict; exports: dict; sections: list
    def va(self, name): return self.base + self.symbols[name]
    def put(self, name, value_bytes):
        r = self.symbols[name]; self.data[r:r+len(value_bytes)] = value_bytes

def build_kernel_image(profile, *, guid, age, base, rng, size_hint=None):
    size = 0xB00000 if profile["build"] >= 9200 else 0x580000
    if profile["symbols"]:
        size = max(size, (max(v["rva"] for v in profile["symbols"].values() if v) + 0x101000) & ~0xfff)
    data = bytearray(size)
    data[0:2] = b"MZ"
    g = bytes.fromhex(guid)
    data[0x2800:0x2800 + 40] = (b"RSDS" + g[3::-1] + g[5:3:-1] + g[7:5:-1] + g[8:]
                                + struct.pack("<I", age) + b"ntkrnlmp.pdb\0")
    syms = {}
    if profile["symbols"]:
        for k, v in profile["symbols"].items():
            if v: syms[k] = v["rva"]
    else:
        for i, k in enumerate(["PsActiveProcessHead","PspCidTable","ObpKernelHandleTable","ObTypeIndexTable","ObHeaderCookie","ObpInfoMaskToOffset","PsInitialSystemProcess","NtBuildNumber","KiKvaShadow"]):
            syms[k] = 0x800000 + i * 0x1000
    code = 0x1000
    syms["KiIdleLoop"] = code; data[code:code+4] = bytes([0xf3, 0x90, 0xeb, 0xfc])
    syms["KiCounterLoop"] = code + 0x10
    # lock inc qword [rip+X]; jmp
    data[code+0x10:code+0x20] = bytes([0x48,0xff,0x05]) + struct.pack("<i", 0x7f0000 - (code+0x17)) + bytes([0xeb,0xf7])
    syms["KiGuestCounter"] = 0x7f0000 + code
    syms["KiGuestChurnParameters"] = 0x7f0100
    syms["KiGuestChurn"] = code + 0x40
    data[code + 0x40:code + 0x40 + 0x100] = _churn_code(code + 0x40, 0x7f0100)
    for i in range(256):
        syms[f"KiIdtHandler{i:02X}"] = 0x2000 + i * 16
        data[0x2000+i*16:0x2000+i*16+2] = b"\xeb\xfe"
    data[0x3000:0x4000] = b"\xcc" * 0x1000
    secs = [Section(".text", 0x1000, 0x2000, 0x60000020), Section("KVASCODE", 0x3000, 0x1000, 0x60000020),
            Section(".text", 0x4000, 0x7ec000, 0x60000020), Section(".data", 0x7f0000, size-0x7f0000, 0xC0000040)]
    return KernelImage(base, data, syms, {}, secs)


def build_isf(profile, image, guid, age):
    return {}


CHURN_ASM = """bits 64
org %(org)#x
params equ %(params)#x
    lea rbx, [rel $$ + (params - %(org)#x)]
.loop:
    mov rsi, [rbx + 0x10]
    mov r9d, [rbx + 0x34]
    call copy
    mov rsi, [rbx + 0x08]
    mov r9d, [rbx + 0x30]
    call copy
    jmp .loop
copy:
    mov rdx, [rbx + 0x20]
    lock inc qword [rdx]
    mov rdi, [rbx]
    mov rcx, [rbx + 0x18]
.entry:
    mov rax, [rsi]
    mov [rdi], rax
    mov rax, [rsi + 8]
    mov [rdi + 8], rax
    add rsi, 16
    add rdi, 16
    mov r8, [rbx + 0x38]
.delay:
    pause
    dec r8
    jnz .delay
    dec rcx
    jnz .entry
    mov rdx, [rbx + 0x28]
    test rdx, rdx
    jz .done
    mov [rdx], r9d
.done:
    mov rdx, [rbx + 0x20]
    lock inc qword [rdx]
    mov r8, [rbx + 0x38]
    shl r8, 8
.hold:
    pause
    dec r8
    jnz .hold
    ret
"""


def _churn_code(org, params):
    import subprocess, tempfile, os
    with tempfile.TemporaryDirectory() as t:
        open(os.path.join(t, "c.asm"), "w").write(CHURN_ASM % {"org": org, "params": params})
        subprocess.run(["nasm", "-f", "bin", "-o", os.path.join(t, "c.bin"), os.path.join(t, "c.asm")], check=True)
        return open(os.path.join(t, "c.bin"), "rb").read()
