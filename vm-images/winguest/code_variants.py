"""Equivalent encodings of the exported functions tools disassemble (`build.py --code-variants random`).

Real ntoskrnl builds compile the same C in other ways: other registers, the cookie byte as the
memory operand of an `xor`, a `lea` of a global and a load through that register, independent
instructions in another order, the work in a worker reached by a call or a tail jump, a body
ending in a jump to a shared epilogue, a CR3 write after KVA shadowing's extra work. One form
per function is drawn from the guest's rng.

Templates name registers %A (64-bit), %A32, %A16 and %A8; `fill` substitutes a random allocation.
{Symbol} and {off:Struct.Field} are left for kernel_image's assembler.
"""
from __future__ import annotations

import random
import re

VOLATILE = ("rax", "rcx", "rdx", "r8", "r9", "r10", "r11")
_LEGACY = {"rax": ("eax", "al", "ax"), "rcx": ("ecx", "cl", "cx"), "rdx": ("edx", "dl", "dx"),
           "rbx": ("ebx", "bl", "bx"), "rsi": ("esi", "sil", "si"), "rdi": ("edi", "dil", "di")}
_WIDTHS = {"32": (0, "d"), "8": (1, "b"), "16": (2, "w")}


def _sub(reg: str, width: str) -> str:
    if width == "":
        return reg
    index, suffix = _WIDTHS[width]
    return _LEGACY[reg][index] if reg in _LEGACY else reg + suffix


def fill(template: str, regs: dict[str, str]) -> str:
    return re.sub(r"%([A-Z])(32|16|8)?", lambda m: _sub(regs[m.group(1)], m.group(2) or ""), template)


def _merge(rng: random.Random, sequences: list[list[str]]) -> list[str]:
    """A random interleaving that keeps each sequence's own order (independent instructions)."""
    pending = [list(s) for s in sequences if s]
    out = []
    while pending:
        chosen = rng.choice(pending)
        out.append(chosen.pop(0))
        if not chosen:
            pending.remove(chosen)
    return out


def lines(lines: list[str]) -> str:
    return "".join("\n    " + line for line in lines)


# ---- ObGetObjectType ----------------------------------------------------------------------

COOKIE_FORMS = {
    "movzx-rip": (["movzx %K32, byte [rel {ObHeaderCookie}]"], ["xor %I, %K"]),
    "lea-movzx": (["lea %K, [rel {ObHeaderCookie}]", "movzx %K32, byte [%K]"], ["xor %I, %K"]),
    "xor-rip": ([], ["xor %I8, byte [rel {ObHeaderCookie}]"]),
    "lea-xor": (["lea %K, [rel {ObHeaderCookie}]"], ["xor %I8, byte [%K]"]),
    "mov-rip": (["xor %K32, %K32", "mov %K8, byte [rel {ObHeaderCookie}]"], ["xor %I, %K"]),
}


def ob_get_object_type(rng: random.Random, cookie: bool) -> tuple[dict[str, str], str]:
    """(functions, form name): rcx = object body -> rax = its _OBJECT_TYPE."""
    copy = rng.random() < 0.4              # the body pointer first copied out of rcx
    regs = {"P": rng.choice(["rdx", "r8", "r9", "r10", "r11"]) if copy else "rcx"}
    free = [r for r in VOLATILE if r != regs["P"] and (copy or r != "rcx")]
    regs.update(zip("HIKT", rng.sample(free, 4)))
    index = ["movzx %I32, byte [%P - 18h]"]
    table = ["lea %T, [rel {ObTypeIndexTable}]"]
    form = "no-cookie"
    if cookie:
        form = rng.choice(sorted(COOKIE_FORMS))
        load, apply = COOKIE_FORMS[form]
        header = ["lea %H, [%P - 30h]", "shr %H, 8", "movzx %H32, %H8"]
        body = _merge(rng, [header, index, load, table]) + rng.sample(["xor %I, %H"] + apply, 1 + len(apply))
    else:
        body = _merge(rng, [index, table])
    body = (["mov %P, rcx"] if copy else []) + body
    tail = ["mov rax, [%T + %I*8]", "ret"]
    functions = {}
    if rng.random() < 0.4:                         # the end in a separate chunk, reached by a jump
        functions["ObGetObjectType"] = fill(lines(body + ["jmp {ObpGetObjectTypeChunk}"]), regs)
        functions["ObpGetObjectTypeChunk"] = fill(lines(tail), regs)
        form += "+chunk"
    else:
        functions["ObGetObjectType"] = fill(lines(body + tail), regs)
    return functions, form


# ---- PspCidTable in PsLookupProcessByProcessId --------------------------------------------

def cid_table_load(rng: random.Random) -> tuple[list[str], str]:
    """Lines that leave PspCidTable's value in rcx (rdx already holds the id), and a form name;
    some forms first load an unrelated global, so "the first qword load" is not enough."""
    reg = rng.choice(["rax", "r8", "r9", "r10", "r11"])
    forms = {
        "rip": ["mov rcx, [rel {PspCidTable}]"],
        "copy": [f"mov {reg}, [rel {{PspCidTable}}]", f"mov rcx, {reg}"],
        "lea": [f"lea {reg}, [rel {{PspCidTable}}]", f"mov rcx, [{reg}]"],
    }
    form = rng.choice(sorted(forms))
    lines = forms[form]
    if rng.random() < 0.5:
        other = rng.choice([r for r in ("r9", "r10", "r11") if r != reg])
        lines = [f"mov {other}, [rel {{PsInitialSystemProcess}}]", f"test {other}, {other}"] + lines
        form += "+decoy"
    return lines, form


def cid_worker() -> str:
    """PspReferenceCidTableEntry: rcx = id -> the table entry, by a tail jump into the lookup."""
    return lines(["mov rdx, rcx", "mov rcx, [rel {PspCidTable}]", "jmp {ExpLookupHandleTableEntry}"])


# ---- ObReferenceObjectByHandle ------------------------------------------------------------

def kernel_table_load(rng: random.Random) -> tuple[list[str], str]:
    """Lines that leave ObpKernelHandleTable's value in rcx."""
    reg = rng.choice(["rax", "rdx", "r8", "r10", "r11"])
    forms = {"rip": ["mov rcx, [rel {ObpKernelHandleTable}]"],
             "lea": [f"lea {reg}, [rel {{ObpKernelHandleTable}}]", f"mov rcx, [{reg}]"],
             "copy": [f"mov {reg}, [rel {{ObpKernelHandleTable}}]", f"mov rcx, {reg}"]}
    form = rng.choice(sorted(forms))
    return forms[form], form


def process_table_load(rng: random.Random) -> list[str]:
    """rbx = current thread -> rcx = its process's ObjectTable."""
    reg = rng.choice(["rax", "rdx", "r8", "r9", "r11"])
    return [f"mov {reg}, [rbx + {{off:_KTHREAD.ApcState.Process}}]",
            f"mov rcx, [{reg} + {{off:_EPROCESS.ObjectTable}}]"]


# ---- ObQueryNameStringMode ------------------------------------------------------------------

def info_mask_lookup(rng: random.Random) -> tuple[list[str], str]:
    """eax = InfoMask & 3 -> ecx = ObpInfoMaskToOffset[eax] (base and index in either order)."""
    reg = rng.choice(["r8", "r9", "r10", "r11", "rdx"])
    swap = rng.random() < 0.5
    operand = f"[rax + {reg}]" if swap else f"[{reg} + rax]"
    return [f"lea {reg}, [rel {{ObpInfoMaskToOffset}}]", f"movzx ecx, byte {operand}"], \
        "index-first" if swap else "base-first"


# ---- field accessors ----------------------------------------------------------------------

def accessor(rng: random.Random | None, field: str, lea: bool = False) -> str:
    """rcx = structure -> rax = the field (or its address), optionally through a copy of rcx."""
    op = "lea" if lea else "mov"
    if rng is None or rng.random() < 0.5:
        return lines([f"{op} rax, [rcx + {{off:{field}}}]", "ret"])
    reg = rng.choice(["rdx", "r8", "r9", "r10", "r11"])
    return lines([f"mov {reg}, rcx", f"{op} rax, [{reg} + {{off:{field}}}]", "ret"])


def accessors(rng: random.Random | None) -> dict[str, str]:
    """The exported one-field getters (their real builds' form is `mov rax, [rcx+X]; ret`)."""
    return {
        "PsGetProcessId": accessor(rng, "_EPROCESS.UniqueProcessId"),
        "PsGetProcessImageFileName": accessor(rng, "_EPROCESS.ImageFileName", lea=True),
        "PsGetThreadId": accessor(rng, "_ETHREAD.Cid+8"),
        "PsGetThreadProcessId": accessor(rng, "_ETHREAD.Cid"),
        "PsGetThreadProcess": accessor(rng, "_KTHREAD.Process"),
    }


# ---- KiAttachProcess -> KiSwapProcess: the process's DirectoryTableBase written to CR3 ----------

DTB = "{off:_EPROCESS.Pcb.DirectoryTableBase}"
SWAP_FORMS = ("plain", "regs", "copy", "reordered", "kpti", "nonvolatile")


def swap_process(rng: random.Random) -> tuple[dict[str, str], str]:
    """(functions, form name): KiAttachProcess (rcx = thread, rdx = process, r8 = saved state) and
    KiSwapProcess (rcx = new process), which writes the new process's DirectoryTableBase to CR3.
    Forms: another register for the root or for the process, the load first and the Prcb after,
    KVA shadowing's extra work (the root stored in the Prcb, the user root read beside it, the
    no-flush bit set, a path writing the Prcb's kernel root instead), the root kept in a
    non-volatile register across a call; the write reached by an inverted branch or in a chunk;
    KiAttachProcess reaching KiSwapProcess by a tail jump."""
    form = rng.choice(SWAP_FORMS)
    nonvolatile = form == "nonvolatile"
    regs = {"D": rng.choice(["rbx", "rsi", "rdi"]) if nonvolatile else
            "rax" if form == "plain" else rng.choice(["rax", "rdx", "r9", "r10", "r11"])}
    regs["P"] = rng.choice([r for r in ("r9", "r10", "r11") if r != regs["D"]]) if form == "copy" else "rcx"
    regs["G"] = rng.choice([r for r in ("r8", "rdx", "r9", "r10", "r11") if r not in regs.values()])
    regs["U"] = rng.choice([r for r in ("rax", "rdx", "r9", "r10", "r11") if r not in regs.values()])
    functions = {}
    body, rootless, leave = _swap_body(rng, form)
    if form == "nonvolatile":
        functions["KiFlushProcessWriteBuffers"] = lines(["mfence", "ret"])
    write = (["bts %D, 3Fh"] if form == "kpti" else []) + ["mov cr3, %D"] + leave + ["ret"]
    if rng.random() < 0.3:                          # the write in a chunk of its own
        functions["KiSwapProcessChunk"] = fill(lines(write), regs)
        write = ["jmp {KiSwapProcessChunk}"]
        form += "+chunk"
    if rng.random() < 0.5:
        code = body + ["test %D, %D", "jnz .write"] + rootless + leave + ["ret", ".write:"] + write
        form += "+inverted"
    else:
        code = body + ["test %D, %D", "jz .done"] + write + [".done:"] + rootless + leave + ["ret"]
    functions["KiSwapProcess"] = fill(lines(code), regs)
    functions["KiAttachProcess"], tail_jump = attach_process(rng)
    return functions, form + ("+tail-jump" if tail_jump else "")


def _swap_body(rng: random.Random, form: str) -> tuple[list[str], list[str], list[str]]:
    """(lines up to the test of the root in %D, what the path without a process root runs, the
    epilogue before each ret)."""
    prcb, load = ["mov %G, [gs:20h]"], [f"mov %D, [%P + {DTB}]"]
    copy = ["mov %P, rcx"] if form == "copy" else []
    if form == "reordered":
        return copy + load + prcb + ["mov [%G + 7E8h], %D"], [], []
    if form == "kpti":
        user = ["mov %U, [%P + 280h]", "mov [%G + 9008h], %U"]
        return load + _merge(rng, [prcb + ["mov [%G + 9000h], %D"], user]), \
            ["mov %U, [%G + 9000h]", "mov cr3, %U"], []
    if form == "nonvolatile":
        return ["push %D"] + load + ["sub rsp, 20h", "call {KiFlushProcessWriteBuffers}", "add rsp, 20h"], \
            [], ["pop %D"]
    return prcb + copy + load, [], []


def attach_process(rng: random.Random | None) -> tuple[str, bool]:
    """KiAttachProcess: the thread's ApcState.Process saved and set, then KiSwapProcess(new, old)
    by a call or (drawn) a tail jump; (source, whether it tail-jumps)."""
    old = rng.choice(["r9", "r10", "r11", "rax"]) if rng else "r9"
    switch = [f"mov {old}, [rcx + {{off:_KTHREAD.ApcState.Process}}]", f"mov [r8 + 20h], {old}",
              "mov [rcx + {off:_KTHREAD.ApcState.Process}], rdx", "mov rcx, rdx", f"mov rdx, {old}"]
    if rng is not None and rng.random() < 0.4:
        return lines(switch + ["jmp {KiSwapProcess}"]), True
    return lines(["push rbx", "sub rsp, 20h", "mov rbx, rcx"] + switch +
                 ["call {KiSwapProcess}", "add rsp, 20h", "pop rbx", "ret"]), False
