"""The guest's ntoskrnl.exe: a PE32+ image laid out like the real build's kernel.

Globals and functions sit at the profile's real RVAs (for the extra profiles, which have none,
at a neighbouring build's RVAs moved a little), so a tool keyed on the PDB GUID finds them where
it would on the real kernel. The exported functions are real x64 code (assembled with nasm) in
the patterns the real builds use, so a tool that does not know the GUID can find the unexported
globals by disassembly: RIP-relative loads of PspCidTable, ObTypeIndexTable, ObHeaderCookie,
ObpKernelHandleTable and ObpInfoMaskToOffset.

Sections follow the symbols: a run of functions becomes an executable section (.text, PAGE,
INIT, KVASCODE), a run of globals a writable one (.data, ALMOSTRO, CACHEALI); .rdata (export
and debug directories, the CodeView RSDS record, unwind data) goes into the largest gap in the
first 4 MiB, where volatility3 and others look for RSDS; .pdata and .rsrc (RT_VERSION with the
build's file version) close the image.
"""
from __future__ import annotations

import os
import random
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field

from . import code_variants as variants
from .registry_code import key_name_code
from .profiles import Layout, all_profiles

PAGE = 0x1000
RSDS_WINDOW = 0x400000              # volatility3 looks for RSDS within 4 MiB of MZ

CODE = 0x60000020                   # CNT_CODE | MEM_EXECUTE | MEM_READ
CODE_DISCARDABLE = 0x62000020
DATA = 0xC8000040                   # INITIALIZED_DATA | MEM_READ | MEM_WRITE | NOT_PAGED
RDATA = 0x48000040                  # INITIALIZED_DATA | MEM_READ | NOT_PAGED
RSRC = 0x42000040                   # INITIALIZED_DATA | MEM_READ | DISCARDABLE

# Symbols of the profile data that are functions; the rest are data.
PROFILE_FUNCTIONS = {"PsLookupProcessByProcessId", "ObGetObjectType", "PsGetProcessId", "KiSystemStartup",
                     "KiSystemCall64", "KiSystemCall64Shadow", "ObReferenceObjectByHandle"}
DATA_SIZES = {"ObTypeIndexTable": 0x100 * 8, "ObpInfoMaskToOffset": 0x100, "KdDebuggerDataBlock": 0x360,
              "KiGuestChurnParameters": 0x40, "KiGuestLeakParameters": 0x40, "PsLoadedModuleList": 0x10,
              "PsActiveProcessHead": 0x10,
              "NtBuildNumber": 4, "ObHeaderCookie": 1, "KiKvaShadow": 1}
DATA_EXPORTS = ("PsInitialSystemProcess", "NtBuildNumber", "PsLoadedModuleList")
EXTRA_GLOBALS = ("PsActiveProcessHead", "PspCidTable", "ObpKernelHandleTable", "ObTypeIndexTable",
                 "ObpInfoMaskToOffset", "PsInitialSystemProcess", "NtBuildNumber", "ObHeaderCookie",
                 "KiKvaShadow", "ObpRootDirectoryObject", "ObpTypeObjectType", "PsLoadedModuleList")


@dataclass
class Section:
    name: str
    rva: int
    vsize: int
    characteristics: int


@dataclass
class KernelImage:
    base: int                    # virtual base, 2 MiB aligned, upper half
    data: bytearray              # the image as mapped, len == SizeOfImage
    symbols: dict[str, int]      # name -> RVA of every global and function placed
    exports: dict[str, int]      # exported name -> RVA
    sections: list[Section]
    code_forms: dict[str, str] = field(default_factory=dict)   # what -> encoding drawn (--code-variants)

    def va(self, name: str) -> int:
        return self.base + self.symbols[name]

    def put(self, name: str, value: bytes) -> None:
        """A global's initial value (the builder also writes it into guest memory)."""
        at = self.symbols[name]
        self.data[at:at + len(value)] = value


# ---- the code -----------------------------------------------------------------------------
# Each function is nasm source; {Name} is replaced by a RIP-relative-capable expression for that
# symbol, {off:Struct.Field} by the build's structure offset.

def _saving_rbx_rsi(frame: int, rsi: bool = True) -> tuple[str, str]:
    """Prologue and epilogue of a function that keeps rbx (and rsi) in the caller's home space."""
    save = "\n    mov [rsp + 10h], rsi" if rsi else ""
    load = f"\n    mov rsi, [rsp + {frame + 0x18:#x}]" if rsi else ""
    return (f"""
    mov [rsp + 8], rbx{save}
    push rdi
    sub rsp, {frame:#x}""", f"""
    mov rbx, [rsp + {frame + 0x10:#x}]{load}
    add rsp, {frame:#x}
    pop rdi
    ret""")


def _epilogue(f: dict, forms: dict, what: str, name: str, leave: str, rng: random.Random | None) -> str:
    """The function's own epilogue, or (a drawn variant) a jump to one shared by functions with the
    same frame, as the compiler's epilogue folding does."""
    if rng is None or rng.random() < 0.6:
        return leave
    f[name] = leave
    forms[what] += "+shared-epilogue"
    return "\n    jmp {" + name + "}"


def _attach(L: Layout) -> dict[str, str]:
    """KeStackAttachProcess in the shape of the real builds: the attach proper in
    KiAttachProcess, which has KiSwapProcess load the new process's DirectoryTableBase into CR3."""
    return {"KeStackAttachProcess": """
    mov [rsp + 8], rbx
    push rdi
    sub rsp, 30h
    mov rdi, rdx                         ; rcx = _KPROCESS, rdx = _KAPC_STATE to save into
    mov rbx, rcx
    mov rax, [gs:188h]
    cmp [rax + {off:_KTHREAD.ApcState.Process}], rcx
    je .same
    mov r8, rdi
    mov rdx, rbx
    mov rcx, rax
    call {KiAttachProcess}
    jmp .done
.same:
    mov qword [rdi + 20h], 1             ; already in that process: nothing saved
.done:
    mov rbx, [rsp + 40h]
    add rsp, 30h
    pop rdi
    ret""", "KiAttachProcess": variants.attach_process(None)[0], "KiSwapProcess": """
    mov r8, [gs:20h]                     ; rcx = new process, rdx = old; KPCR.CurrentPrcb
    mov rax, [rcx + {off:_EPROCESS.Pcb.DirectoryTableBase}]
    test rax, rax
    jz .done
    mov cr3, rax
.done:
    ret"""}


def _functions(L: Layout, cookie: bool, win8: bool, rng: random.Random | None = None,
               forms: dict[str, str] | None = None) -> dict[str, str]:
    """nasm source of every function; with `rng`, the exported ones the tools disassemble in
    a randomly drawn equivalent form (`forms` records which)."""
    forms = {} if forms is None else forms
    entry_shift = "sar rdi, 10h\n    and rdi, -10h" if win8 else "and rdi, -8"
    # rcx = table, rdx = handle -> rdi = the entry's object pointer, or on to .invalid
    find_entry = f"""
    call {{ExpLookupHandleTableEntry}}
    test rax, rax
    jz .invalid
    mov rdi, [rax]
    {entry_shift}
    jz .invalid"""
    apc_disable = 0x1E4 if win8 else 0x1C4    # _KTHREAD.KernelApcDisable (not in the profile data)
    f = variants.accessors(rng)
    f["PsGetCurrentProcess"] = f"""
    mov rax, [gs:188h]
    mov rax, [rax + {{off:_KTHREAD.ApcState.Process}}]
    ret"""
    f["IoGetCurrentProcess"] = f["PsGetCurrentProcess"]
    f["KeGetCurrentThread"] = """
    mov rax, [gs:188h]
    ret"""
    f["PsGetCurrentThread"] = f["KeGetCurrentThread"]
    f.update(_attach(L))
    f["PsGetCurrentProcessId"] = """
    mov rax, [gs:188h]
    mov rax, [rax + {off:_ETHREAD.Cid}]
    ret"""
    f["ExpLookupHandleTableEntry"] = """
    ; rcx = _HANDLE_TABLE, rdx = handle: the entry, or NULL past NextHandleNeedingPool
    and rdx, -4
    mov eax, [rcx + {off:_HANDLE_TABLE.NextHandleNeedingPool}]
    cmp rdx, rax
    jae .none
    mov r8, [rcx + {off:_HANDLE_TABLE.TableCode}]
    mov eax, r8d
    and eax, 3
    cmp eax, 1
    je .level1
    jb .level0
    mov rax, rdx
    shr rax, 19                          ; handle / (512 * 256 * 4)
    mov r9, rdx
    mov r8, [r8 + rax * 8 - 2]
    shr r9, 10
    and r9d, 1FFh
    mov r8, [r8 + r9 * 8]
    and edx, 3FFh
    lea rax, [r8 + rdx * 4]
    ret
.level1:
    mov rax, rdx
    shr rax, 10
    and edx, 3FFh
    mov r8, [r8 + rax * 8 - 1]
    lea rax, [r8 + rdx * 4]
    ret
.level0:
    lea rax, [r8 + rdx * 4]
    ret
.none:
    xor eax, eax
    ret"""
    enter, leave = _saving_rbx_rsi(0x20)
    cid_load, forms["PspCidTable"] = (variants.cid_table_load(rng) if rng else
                                      (["mov rcx, [rel {PspCidTable}]"], "rip"))
    if rng and rng.random() < 0.3:      # the table lookup in a worker that tail-jumps onwards
        f["PspReferenceCidTableEntry"] = variants.cid_worker()
        forms["PspCidTable"] = "worker"
        find_cid = find_entry.replace("call {ExpLookupHandleTableEntry}", "call {PspReferenceCidTableEntry}")
        cid_load = []
    else:
        find_cid = find_entry
    f["PsLookupProcessByProcessId"] = enter + f"""
    mov rsi, rdx
    mov rbx, [gs:188h]
    dec word [rbx + {apc_disable:#x}]
    mov rdx, rcx""" + variants.lines(cid_load) + f"""{find_cid}
    cmp byte [rdi], 3                    ; DISPATCHER_HEADER.Type == ProcessObject
    jne .invalid
    lock inc qword [rdi - 30h]           ; ObReferenceObject: header PointerCount
    mov [rsi], rdi
    xor eax, eax
    jmp .done
.invalid:
    mov eax, 0C000000Bh                  ; STATUS_INVALID_CID
.done:
    inc word [rbx + {apc_disable:#x}]""" + _epilogue(f, forms, "PspCidTable", "KiEpilogueRbxRsi20", leave, rng)
    if rng:
        chosen, forms["ObGetObjectType"] = variants.ob_get_object_type(rng, cookie)
        f.update(chosen)
    elif cookie:
        f["ObGetObjectType"] = """
    lea rax, [rcx - 30h]
    movzx ecx, byte [rcx - 18h]
    shr rax, 8
    movzx eax, al
    xor rax, rcx
    movzx ecx, byte [rel {ObHeaderCookie}]
    xor rax, rcx
    lea rcx, [rel {ObTypeIndexTable}]
    mov rax, [rcx + rax * 8]
    ret"""
    else:
        f["ObGetObjectType"] = """
    movzx eax, byte [rcx - 18h]
    lea rcx, [rel {ObTypeIndexTable}]
    mov rax, [rcx + rax * 8]
    ret"""
    enter, leave = _saving_rbx_rsi(0x30)
    kernel_load, forms["ObpKernelHandleTable"] = (variants.kernel_table_load(rng) if rng else
                                                  (["mov rcx, [rel {ObpKernelHandleTable}]"], "rip"))
    process_load = (variants.process_table_load(rng) if rng else
                    ["mov rax, [rbx + {off:_KTHREAD.ApcState.Process}]",
                     "mov rcx, [rax + {off:_EPROCESS.ObjectTable}]"])
    lookup = """
    ; rcx = handle, rdx = access, r8 = type, r9b = mode, [rsp+28h] = object out""" + enter + f"""
    mov rsi, rcx
    mov rbx, [gs:188h]
    test rcx, rcx
    jns .process
    cmp rcx, -6
    jae .pseudo
    test r9b, r9b
    jnz .invalid""" + variants.lines(kernel_load) + """
    btr rsi, 63
    jmp .lookup
.process:""" + variants.lines(process_load) + f"""
.lookup:
    mov rdx, rsi{find_entry}
    lea rdi, [rdi + 30h]
    mov rax, [rsp + 60h]
    mov [rax], rdi
    xor eax, eax
    jmp .done
.pseudo:
    mov rax, [rbx + {{off:_KTHREAD.ApcState.Process}}]
    mov rdx, [rsp + 60h]
    mov [rdx], rax
    xor eax, eax
    jmp .done
.invalid:
    mov eax, 0C0000008h                  ; STATUS_INVALID_HANDLE
.done:""" + _epilogue(f, forms, "ObpKernelHandleTable", "KiEpilogueRbxRsi30", leave, rng)
    if win8:
        f["ObReferenceObjectByHandle"] = """
    sub rsp, 48h
    mov rax, [rsp + 78h]
    mov [rsp + 30h], rax
    mov rax, [rsp + 70h]
    mov [rsp + 28h], rax
    mov dword [rsp + 20h], 746C6644h     ; 'Dflt'
    call {ObReferenceObjectByHandleWithTag}
    add rsp, 48h
    ret"""
        f["ObReferenceObjectByHandleWithTag"] = lookup
    else:
        f["ObReferenceObjectByHandle"] = lookup
    f["ObQueryNameString"] = """
    sub rsp, 38h
    mov byte [rsp + 20h], 0              ; KernelMode
    call {ObQueryNameStringMode}
    add rsp, 38h
    ret"""
    enter, leave = _saving_rbx_rsi(0x20, rsi=False)
    mask_lookup, forms["ObpInfoMaskToOffset"] = (variants.info_mask_lookup(rng) if rng else
                                                 (["lea r10, [rel {ObpInfoMaskToOffset}]",
                                                   "movzx ecx, byte [r10 + rax]"], "base-first"))
    f["ObQueryNameStringMode"] = """
    ; rcx = object body: the name info header through ObpInfoMaskToOffset""" + enter + """
    mov rdi, rdx
    lea rbx, [rcx - 30h]
    movzx eax, byte [rbx + {off:_OBJECT_HEADER.InfoMask}]
    test al, 2
    jz .unnamed
    and eax, 3""" + variants.lines(mask_lookup) + """
    sub rbx, rcx
    movzx eax, word [rbx + {off:_OBJECT_HEADER_NAME_INFO.Name}]
    mov [rdi], ax
    xor eax, eax
    jmp .done
.unnamed:
    mov word [rdi], 0
    xor eax, eax
.done:""" + leave
    f["ExAllocatePoolWithTag"] = enter + """
    mov ebx, r8d
    mov rdi, rdx
    xor eax, eax""" + leave
    f["KeBugCheckEx"] = """
    mov [rsp + 8], rcx
    mov [rsp + 10h], rdx
    mov [rsp + 18h], r8
    mov [rsp + 20h], r9
    cli
.halt:
    hlt
    jmp .halt"""
    f["KiSystemStartup"] = """
    mov [rsp + 8], rcx
    sub rsp, 28h
    jmp {KiIdleLoop}"""
    f["KiIdleLoop"] = """
.spin:
    pause
    jmp .spin"""
    f["KiCommonTrap"] = """
    cli
.halt:
    hlt
    jmp .halt"""
    f["KiSystemCall64"] = """
    swapgs
    mov [gs:10h], rsp
    mov rsp, [gs:1A8h]
    push 2Bh
    push qword [gs:10h]
    push r11
    push 33h
    push rcx
    jmp {KiCommonTrap}"""
    f["KiSystemCall64Shadow"] = """
    swapgs
    mov [gs:9010h], rsp
    mov rsp, [gs:9000h]
    mov cr3, rsp
    mov rsp, [gs:9008h]
    jmp {KiSystemCall64}"""
    f["KiKernelIretExit"] = """
    lfence
    mov cr3, rax
    iretq"""
    f["KiGuestChurn"] = CHURN
    f["KiGuestLeak"] = LEAK
    f["KiGuestLeakStep"] = LEAK_STEP
    if rng:                     # drawn last, so the other functions' draws stay what they were
        swap, forms["KiSwapProcess"] = variants.swap_process(rng)
        f.update(swap)
    key_name, forms["CmpConstructName"] = key_name_code(win8, rng)    # after those: their draws unchanged
    f.update(key_name)
    return f


# The churn routine (scenario `churn`): forever copies a handle table page from state B to the
# live page and back from A, one 16-byte entry at a time, with a seqlock generation counter
# (odd while copying). Parameter block KiGuestChurnParameters, filled by the builder:
#   +00 live page  +08 state A  +10 state B  +18 entries  +20 counter VA  +28 HandleCount VA (or 0)
#   +30 HandleCount for A (u32)  +34 for B (u32)  +38 delay loop count
CHURN = """
    lea rbx, [rel {KiGuestChurnParameters}]
.loop:
    mov rsi, [rbx + 10h]
    mov r9d, [rbx + 34h]
    call .copy
    mov rsi, [rbx + 8]
    mov r9d, [rbx + 30h]
    call .copy
    jmp .loop
.copy:
    mov rdx, [rbx + 20h]
    lock inc qword [rdx]
    mov rdi, [rbx]
    mov rcx, [rbx + 18h]
.entry:
    mov rax, [rsi]
    mov [rdi], rax
    mov rax, [rsi + 8]
    mov [rdi + 8], rax
    add rsi, 16
    add rdi, 16
    mov r8, [rbx + 38h]
.delay:
    pause
    dec r8
    jnz .delay
    dec rcx
    jnz .entry
    mov rdx, [rbx + 28h]
    test rdx, rdx
    jz .counted
    mov [rdx], r9d
.counted:
    mov rdx, [rbx + 20h]
    lock inc qword [rdx]
    mov r8, [rbx + 38h]
    shl r8, 8
.hold:
    pause
    dec r8
    jnz .hold
    ret"""

# The leak routine (scenario `leak`): applies a list of 48-byte operations to live handle
# tables, one per step: +00 entry VA, +08 new low qword (0: a close), +10 new high qword,
# +18 added to the leaked-handle counter, +20 VA of the table's free-list head, +28 its new
# qword (an open pops the entry off the free list, a close pushes it back). An open writes the
# high qword first and a close the low one first, so the object pointer decides; the head
# follows. After each operation it bumps the operations-done counter and calls
# KiGuestLeakStep (a delay; a breakpoint there sees a whole number of operations).
# Parameter block KiGuestLeakParameters, filled by the builder:
#   +00 operations VA  +08 operation count  +10 operations-done counter VA
#   +18 leaked-handle counter VA  +20 delay loop count
LEAK = """
    lea rbx, [rel {KiGuestLeakParameters}]
.next:
    mov rdx, [rbx + 10h]
    mov rcx, [rdx]
    cmp rcx, [rbx + 8]
    jae .idle
    imul rcx, rcx, 48
    add rcx, [rbx]
    mov rdi, [rcx]
    mov rax, [rcx + 8]
    mov rsi, [rcx + 10h]
    test rax, rax
    jz .close
    mov [rdi + 8], rsi
    mov [rdi], rax
    jmp .count
.close:
    mov [rdi], rax
    mov [rdi + 8], rsi
.count:
    mov rax, [rcx + 28h]
    mov rsi, [rcx + 20h]
    mov [rsi], rax
    mov rax, [rcx + 18h]
    mov rsi, [rbx + 18h]
    add [rsi], rax
    lock inc qword [rdx]
    call {KiGuestLeakStep}
    jmp .next
.idle:
    pause
    jmp .idle"""
LEAK_STEP = """
    mov r8, [rbx + 20h]
.delay:
    pause
    dec r8
    jnz .delay
    ret"""

IDT_STUB = """
    push 0
    push {vector:#x}
    jmp near {KiCommonTrap}"""

CODE_EXPORTS = ("PsLookupProcessByProcessId", "ObGetObjectType", "PsGetProcessId", "PsGetProcessImageFileName",
                "PsGetThreadId", "PsGetThreadProcessId", "PsGetThreadProcess", "ObReferenceObjectByHandle",
                "ObReferenceObjectByHandleWithTag", "ObQueryNameString", "PsGetCurrentProcess",
                "IoGetCurrentProcess", "KeGetCurrentThread", "PsGetCurrentThread", "KeStackAttachProcess",
                "PsGetCurrentProcessId", "ExAllocatePoolWithTag", "CmCallbackGetKeyObjectIDEx",
                "CmCallbackGetKeyObjectID", "KeBugCheckEx")
KVAS_FUNCTIONS = {"KiSystemCall64Shadow", "KiKernelIretExit"}
IDT_NAME = "KiIdtHandler{:02X}"
KVAS_ROOM = 0x3000                  # KVASCODE beyond KiSystemCall64Shadow: shadow IDT stubs, iret exit


# ---- layout -------------------------------------------------------------------------------

def _template_symbols(profile: dict, rng: random.Random) -> dict[str, int]:
    """RVAs for a profile without symbols: the nearest shipped build's, each run of symbols moved
    by a random number of 256-byte steps (only disassembly finds them)."""
    build = profile["build"]
    shipped = [p for _, p in all_profiles() if p["symbols"]]
    near = min(shipped, key=lambda p: (abs(p["build"] - build), p["version"]))
    rvas = {k: v["rva"] for k, v in near["symbols"].items() if v}
    if build < 10240:
        rvas.pop("ObHeaderCookie", None)
    out, shift, previous = {}, 0, None
    for name, rva in sorted(rvas.items(), key=lambda kv: kv[1]):
        if previous is None or rva - previous > 0x10000:
            shift = rng.randrange(0, 8) * 0x100
        out[name], previous = rva + shift, rva
    return out


SECTION_KINDS = {"code": (".text", "PAGE"), "init": ("INIT",), "kvas": ("KVASCODE",),
                 "data": (".data", "ALMOSTRO", "CACHEALI", "PAGEDATA")}
CHARACTERISTICS = {"code": CODE, "init": CODE_DISCARDABLE, "kvas": CODE, "data": DATA}


def _kind(name: str) -> str:
    if name == "KiSystemCall64Shadow":
        return "kvas"
    if name == "KiSystemStartup":
        return "init"
    return "code" if name in PROFILE_FUNCTIONS else "data"


class Planner:
    """Sections derived from the symbols, and first-fit room for what the profile does not place."""

    def __init__(self, fixed: dict[str, int], sizes: dict[str, int]):
        self.symbols = dict(fixed)
        self.used: list[tuple[int, int]] = sorted((rva, rva + sizes[name]) for name, rva in fixed.items())
        ordered = sorted(fixed, key=fixed.get)
        runs: list[tuple[str, list[str]]] = []
        for i, name in enumerate(ordered):
            kind = _kind(name)
            if name == "NtBuildNumber":        # a constant: it joins its neighbours' section
                before = runs[-1][0] if runs else None
                after = next((_kind(n) for n in ordered[i + 1:] if n != "NtBuildNumber"), "data")
                kind = before if before in ("code", "data") else after if after in ("code", "data") else "data"
            if runs and runs[-1][0] == kind:
                runs[-1][1].append(name)
            else:
                runs.append((kind, [name]))
        self.spans = [(kind, fixed[names[0]] & ~(PAGE - 1),
                       _align(max(fixed[n] + sizes[n] for n in names), PAGE) + (KVAS_ROOM if kind == "kvas" else 0))
                      for kind, names in runs]

    def sections(self, rdata_size: int) -> list[Section]:
        """Adjacent sections from PAGE on; .rdata in the largest gap that keeps RSDS in the first 4 MiB."""
        spans, size = self.spans, _align(rdata_size, PAGE)
        gaps = [(spans[i][1] - (spans[i - 1][2] if i else PAGE), i) for i in range(len(spans))]
        fits = [(gap, i) for gap, i in gaps
                if gap >= size + PAGE and (spans[i - 1][2] if i else PAGE) + gap // 2 + size <= RSDS_WINDOW]
        _, rdata_before = max(fits)
        out: list[Section] = []
        used = {kind: 0 for kind in SECTION_KINDS}
        for i, (kind, lo, hi) in enumerate(spans):
            gap_lo = spans[i - 1][2] if i else PAGE
            if i == rdata_before:
                at = PAGE if i == 0 else _align(gap_lo + (lo - gap_lo - size) // 2, PAGE)
                if out:
                    out[-1].vsize = at - out[-1].rva
                out.append(Section(".rdata", at, size, RDATA))
                begin = at + size
            elif out and spans[i - 1][0] == "kvas":
                begin = gap_lo
            elif out:
                begin = max(min(_align((gap_lo + lo) // 2, PAGE), lo), gap_lo)
                out[-1].vsize = begin - out[-1].rva
            else:
                begin = PAGE
            if kind == "kvas":                    # KVASCODE stays small: the shadow maps all of it
                out[-1].vsize, begin = lo - out[-1].rva, lo
            names = SECTION_KINDS[kind]
            out.append(Section(names[min(used[kind], len(names) - 1)], begin, hi - begin, CHARACTERISTICS[kind]))
            used[kind] += 1
        return out

    def place(self, name: str, size: int, sections: list[Section], align: int = 16, margin: int = 0x20) -> int:
        """First fit inside the given sections, clear of everything placed."""
        for s in sections:
            at, end = _align(s.rva + 0x40, align), s.rva + s.vsize
            for lo, hi in self.used:
                if hi + margin <= at:
                    continue
                if at + size + margin <= lo:
                    break
                at = _align(hi + margin, align)
            if at + size <= end:
                self.symbols[name] = at
                self.used.append((at, at + size))
                self.used.sort()
                return at
        raise ValueError(f"no room for {name} ({size:#x} bytes) in {[s.name for s in sections]}")


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


# ---- assembly -----------------------------------------------------------------------------

def _assemble(functions: dict[str, str], symbols: dict[str, int], L: Layout) -> dict[str, bytes]:
    """One nasm run: each function its own section at its RVA; returns each one's bytes."""
    def offset(match: re.Match) -> str:
        struct_name, member = match.group(1).split(".", 1)
        member, _, extra = member.partition("+")
        return f"{L.off(struct_name, member) + int(extra or '0', 0):#x}"

    lines = ["bits 64", "[map sections map.txt]"]
    order = sorted(functions, key=lambda n: symbols[n])
    for index, name in enumerate(order):
        start = symbols[name]
        body = re.sub(r"\{off:([^}]+)\}", offset, functions[name])
        body = re.sub(r"\{(\w+)\}", lambda m: f"($$ + {symbols[m.group(1)]:#x} - {start:#x})", body)
        lines += [f"section s{index} start={start:#x} vstart={start:#x}", f"f{index}:", body]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.asm")
        with open(src, "w") as f:
            f.write("\n".join(lines) + "\n")
        subprocess.run(["nasm", "-f", "bin", "-o", os.path.join(tmp, "k.bin"), "k.asm"], cwd=tmp, check=True,
                       capture_output=True)
        with open(os.path.join(tmp, "k.bin"), "rb") as f:
            blob = f.read()
        with open(os.path.join(tmp, "map.txt")) as f:
            lengths = {int(m.group(2)): int(m.group(1), 16)
                       for m in re.finditer(r"^\s*\S+\s+\S+\s+\S+\s+([0-9a-fA-F]+)\s+progbits\s+s(\d+)\s*$",
                                            f.read(), re.M)}
    return {name: blob[symbols[name]:symbols[name] + lengths[i]] for i, name in enumerate(order)}   # origin 0


# ---- PE structures ------------------------------------------------------------------------

def _guid_struct(guid: str) -> bytes:
    g = bytes.fromhex(guid)
    return g[3::-1] + g[5:3:-1] + g[7:5:-1] + g[8:]


def _version_resource(version: str, at: int) -> bytes:
    """Resource directory (RT_VERSION → 1 → 0x409) and a VS_VERSIONINFO with VS_FIXEDFILEINFO."""
    major, minor, build, revision = (int(x) for x in version.split("."))
    ms, ls = (major << 16) | minor, (build << 16) | revision
    fixed = struct.pack("<13I", 0xFEEF04BD, 0x10000, ms, ls, ms, ls, 0x3F, 0, 0x40004, 3, 7, 0, 0)
    key = "VS_VERSION_INFO\0".encode("utf-16-le")
    head = struct.pack("<HHH", 0, len(fixed), 0) + key
    head += b"\0" * (-len(head) % 4)
    info = bytearray(head + fixed)
    struct.pack_into("<H", info, 0, len(info))

    def directory(entry_id: int, target: int) -> bytes:
        return struct.pack("<IIHHHH", 0, 0, 4, 0, 0, 1) + struct.pack("<II", entry_id, target)
    d0 = directory(16, 0x80000000 | 0x18)
    d1 = directory(1, 0x80000000 | 0x30)
    d2 = directory(0x409, 0x48)
    data_entry = struct.pack("<IIII", at + 0x58, len(info), 0, 0)
    return d0 + d1 + d2 + data_entry + bytes(info)


def _exports(names: dict[str, int], at: int, timestamp: int) -> bytes:
    ordered = sorted(names)
    n = len(ordered)
    functions = at + 40
    name_ptrs = functions + 4 * n
    ordinals = name_ptrs + 4 * n
    strings = ordinals + 2 * n
    blob = b"ntoskrnl.exe\0"
    offsets = []
    for name in ordered:
        offsets.append(strings + len(blob))
        blob += name.encode() + b"\0"
    header = struct.pack("<IIHHIIIIIII", 0, timestamp, 0, 0, strings, 1, n, n, functions, name_ptrs, ordinals)
    return (header + struct.pack(f"<{n}I", *(names[x] for x in ordered)) + struct.pack(f"<{n}I", *offsets)
            + struct.pack(f"<{n}H", *range(n)) + blob)


def _headers(image: KernelImage, entry: int, timestamp: int, dirs: dict[int, tuple[int, int]], version: str) -> bytes:
    major, minor = (int(x) for x in version.split(".")[:2])
    dos = bytearray(0x40)
    dos[0:2] = b"MZ"
    struct.pack_into("<HHHHHHHHH", dos, 2, 0x90, 3, 0, 4, 0, 0xFFFF, 0, 0xB8, 0)
    struct.pack_into("<H", dos, 0x18, 0x40)
    lfanew = 0x108
    struct.pack_into("<I", dos, 0x3C, lfanew)
    stub = bytes.fromhex("0e1fba0e00b409cd21b8014ccd21") + b"This program cannot be run in DOS mode.\r\r\n$"
    code = sum(s.vsize for s in image.sections if s.characteristics & 0x20)
    idata = sum(s.vsize for s in image.sections if s.characteristics & 0x40)
    coff = struct.pack("<HHIIIHH", 0x8664, len(image.sections), timestamp, 0, 0, 0xF0, 0x22)
    directories = b"".join(struct.pack("<II", *dirs.get(i, (0, 0))) for i in range(16))
    optional = struct.pack("<HBBIIIII", 0x20B, 14, 20, code, idata, 0, entry, PAGE)
    optional += struct.pack("<QIIHHHHHHIIIIHHQQQQII", image.base, PAGE, 0x200, major, minor, major, minor,
                            major, minor, 0, len(image.data), PAGE, 0, 1, 0x4160,
                            0x80000, 0x1000, 0x100000, 0x1000, 0, 16) + directories
    table = b""
    for s in image.sections:          # raw data laid out as in memory
        table += struct.pack("<8sIIIIIIHHI", s.name.encode(), s.vsize, s.rva, _align(s.vsize, 0x200), s.rva,
                             0, 0, 0, 0, s.characteristics)
    out = bytearray(PAGE)
    out[:0x40] = dos
    out[0x40:0x40 + len(stub)] = stub
    nt = b"PE\0\0" + coff + optional + table
    out[lfanew:lfanew + len(nt)] = nt
    return bytes(out)


# ---- the builder's entry point ------------------------------------------------------------

def build_kernel_image(profile: dict, *, guid: str, age: int, base: int, rng: random.Random,
                       size_hint: int | None = None, code_variants: bool = False) -> KernelImage:
    L = Layout(profile)
    build = profile["build"]
    win8 = build >= 9200
    fixed = ({k: v["rva"] for k, v in profile["symbols"].items() if v} if profile["symbols"]
             else _template_symbols(profile, rng))
    cookie = "ObHeaderCookie" in fixed or (not profile["symbols"] and build >= 10240)
    forms: dict[str, str] = {}
    functions = _functions(L, cookie, win8, random.Random(rng.getrandbits(64)) if code_variants else None, forms)
    for vector in range(256):
        functions[IDT_NAME.format(vector)] = IDT_STUB.format(vector=vector, KiCommonTrap="{KiCommonTrap}")
        functions[IDT_NAME.format(vector) + "Shadow"] = IDT_STUB.format(vector=vector,
                                                                        KiCommonTrap="{KiCommonTrap}")
    sizes = {name: (0x180 if name in PROFILE_FUNCTIONS else DATA_SIZES.get(name, 8)) for name in fixed}
    planner = Planner(fixed, sizes)

    timestamp = rng.randrange(0x50000000, 0x66000000)
    export_names = [n for n in CODE_EXPORTS if n in functions] + [n for n in DATA_EXPORTS if n in fixed]
    rdata_size = 0x3000 + 40 * len(export_names)
    sections = planner.sections(rdata_size)
    code = [s for s in sections if s.characteristics & 0x20000000 and s.name not in ("INIT", "KVASCODE")]
    kvas = [s for s in sections if s.name == "KVASCODE"] or code
    data = [s for s in sections if s.characteristics & 0x80000000]
    for name in sorted(functions, key=lambda n: (n.startswith("KiIdt"), n)):
        if name in fixed:
            continue
        where = kvas if name in KVAS_FUNCTIONS or name.endswith("Shadow") else code
        if name.startswith("KiIdt"):
            planner.place(name, 0x10, where, margin=0)
        else:
            planner.place(name, 0x180, where)
    planner.place("KiGuestChurnParameters", DATA_SIZES["KiGuestChurnParameters"], data, align=64)
    planner.place("KiGuestLeakParameters", DATA_SIZES["KiGuestLeakParameters"], data, align=64)
    if cookie and "ObHeaderCookie" not in fixed:          # an extra profile templated on a build without one
        planner.place("ObHeaderCookie", 1, data, align=4)
    symbols = planner.symbols

    # tail sections: .pdata then .rsrc
    end = max(s.rva + s.vsize for s in sections)
    floor = 0xB00000 if win8 else 0x580000
    pdata_at = max(end, floor - 0x20000)
    pdata = Section(".pdata", pdata_at, _align(12 * len(functions), PAGE), RDATA)
    rsrc = Section(".rsrc", pdata.rva + pdata.vsize, PAGE, RSRC)
    sections[-1].vsize = pdata_at - sections[-1].rva
    sections += [pdata, rsrc]
    size = max(rsrc.rva + rsrc.vsize, size_hint or 0)
    rsrc.vsize = size - rsrc.rva
    image = KernelImage(base, bytearray(size), symbols, {}, sections, forms if code_variants else {})
    for s in sections:
        if s.characteristics & 0x20000000:
            image.data[s.rva:s.rva + s.vsize] = b"\xCC" * s.vsize

    code_bytes = _assemble(functions, symbols, L)
    for name, blob in code_bytes.items():
        reserved = next(hi - lo for lo, hi in planner.used if lo == symbols[name])
        assert len(blob) <= reserved, f"{name} ({len(blob):#x} bytes) outgrew its {reserved:#x}"
        image.put(name, blob)

    # .rdata: debug directory, RSDS, unwind info, export directory
    rdata = next(s for s in sections if s.name == ".rdata")
    at = rdata.rva
    rsds = b"RSDS" + _guid_struct(guid) + struct.pack("<I", age) + b"ntkrnlmp.pdb\0"
    debug = struct.pack("<IIHHIIII", 0, timestamp, 0, 0, 2, len(rsds), at + 0x40, rdata.rva + 0x40)
    image.data[at:at + len(debug)] = debug
    image.data[at + 0x40:at + 0x40 + len(rsds)] = rsds
    unwind = at + 0x100
    image.data[unwind:unwind + 4] = bytes([1, 0, 0, 0])      # UNWIND_INFO v1, no codes (leaf-like)
    exports = {n: symbols[n] for n in export_names}
    export_at = at + 0x200
    blob = _exports(exports, export_at, timestamp)
    image.data[export_at:export_at + len(blob)] = blob
    image.exports = exports
    pdata_blob = b"".join(struct.pack("<III", symbols[n], symbols[n] + len(code_bytes[n]), unwind)
                          for n in sorted(code_bytes, key=lambda n: symbols[n]))
    image.data[pdata.rva:pdata.rva + len(pdata_blob)] = pdata_blob
    resource = _version_resource(profile["version"], rsrc.rva)
    image.data[rsrc.rva:rsrc.rva + len(resource)] = resource
    dirs = {0: (export_at, len(blob)), 2: (rsrc.rva, len(resource)), 3: (pdata.rva, len(pdata_blob)),
            6: (at, len(debug))}
    image.data[:PAGE] = _headers(image, symbols["KiSystemStartup"], timestamp, dirs, profile["version"])
    return image
