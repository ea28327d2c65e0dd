"""The registry's key-name code in the real builds' shape: the exported
CmCallbackGetKeyObjectIDEx (CmCallbackGetKeyObjectID on Windows 7) takes a key body, reads its
KeyControlBlock and has the name built by walking ParentKcb up to the root, reading each
control block's NameBlock and that block's NameLength and Name.

Real builds differ in where that walk sits: since 1809 the export calls
CmpConstructNameWithStatus, which calls CmpConstructNameFromKcbNameBlocks (the walk, after
CmpKeyFullNameLength, a walk of its own, sized the string); the newest call the latter directly;
older builds call CmpConstructName with the walk inside. With an rng (`--code-variants random`) the call structure (call or tail
jump), the registers of the walk and where it loads the parent (at the end, early into a spare
register, or in a loop entered at its test) are drawn; without one, the 1809+ shape.
"""
from __future__ import annotations

import random

from .code_variants import fill, lines

STRUCTURES = ("with-status", "with-status+tail", "from-blocks", "construct-name")
PARENT_FORMS = ("end", "early", "rotated")
NONVOLATILE = ("rbx", "rsi", "rdi", "r12", "r13", "r14", "r15")
VOLATILE = ("rax", "rcx", "rdx", "r8", "r9", "r10", "r11")
NAME_BLOCK = "{off:_CM_KEY_CONTROL_BLOCK.NameBlock}"
PARENT = "{off:_CM_KEY_CONTROL_BLOCK.ParentKcb}"
STATUS_INVALID_PARAMETER, STATUS_NO_MEMORY = "0C000000Dh", "0C0000017h"


def _export(win8: bool, structure: str) -> str:
    """rcx = callback cookie, rdx = key body, r8 = ObjectID out, r9 = ObjectName out (and, Win8+,
    [rsp+28h] = Flags); the name through CmpConstructNameWithStatus, CmpConstructNameFromKcbNameBlocks
    or CmpConstructName."""
    flags = "\n    cmp dword [rsp + 60h], 0             ; Flags: none defined\n    jne .invalid" if win8 else ""
    if structure == "construct-name":
        build = f"""
    mov rcx, rbx
    call {{CmpConstructName}}
    mov esi, {STATUS_NO_MEMORY}
    test rax, rax
    jz .unlock
    mov [rdi], rax
    xor esi, esi"""
    else:
        callee = "CmpConstructNameFromKcbNameBlocks" if structure == "from-blocks" else "CmpConstructNameWithStatus"
        build = f"""
    mov qword [rsp + 20h], 0
    lea rdx, [rsp + 20h]
    mov rcx, rbx
    call {{{callee}}}
    mov esi, eax
    test eax, eax
    js .unlock
    mov rax, [rsp + 20h]
    mov [rdi], rax"""
    return f"""
    mov [rsp + 8], rbx
    mov [rsp + 10h], rsi
    push rdi
    sub rsp, 30h
    mov rdi, r9
    test rcx, rcx
    jz .invalid
    test rdx, rdx
    jz .invalid
    cmp dword [rdx], 6B793032h           ; _CM_KEY_BODY.Type 'ky02'
    jne .invalid{flags}
    mov rbx, [rdx + {{off:_CM_KEY_BODY.KeyControlBlock}}]
    test r8, r8
    jz .id
    mov [r8], rbx                        ; the object ID: the control block's address
.id:
    xor eax, eax
    test rdi, rdi
    jz .done
    call {{CmpLockRegistry}}
    mov esi, {STATUS_INVALID_PARAMETER}
    cmp qword [rbx + {NAME_BLOCK}], 0
    je .unlock{build}
.unlock:
    call {{CmpUnlockRegistry}}
    mov eax, esi
    jmp .done
.invalid:
    mov eax, {STATUS_INVALID_PARAMETER}
.done:
    mov rbx, [rsp + 40h]
    mov rsi, [rsp + 48h]
    add rsp, 30h
    pop rdi
    ret"""


def _with_status(tail: bool) -> str:
    """rcx = kcb, rdx = UNICODE_STRING* out: the shutdown rundown taken, then the walk."""
    if tail:
        return lines(["mov r8, rcx", "test r8, r8", "jz .invalid",
                      "jmp {CmpConstructNameFromKcbNameBlocks}",
                      ".invalid:", f"mov eax, {STATUS_INVALID_PARAMETER}", "ret"])
    return lines(["push rbx", "push rdi", "sub rsp, 28h", "mov rbx, rcx", "mov rdi, rdx",
                  "call {CmpAcquireShutdownRundown}", "mov rdx, rdi", "mov rcx, rbx",
                  "call {CmpConstructNameFromKcbNameBlocks}", "add rsp, 28h", "pop rdi", "pop rbx", "ret"])


def _walk(parent: str, parent_first: bool) -> list[str]:
    """One control block per turn: its name copied in front of the cursor %C, then '\\', then on
    to ParentKcb (%K = kcb, %N = name block, %L = length, %I = index, %T = character, %P = parent)."""
    name = ["mov %N, [%K + " + NAME_BLOCK + "]",
            "movzx %L32, word [%N + {off:_CM_NAME_CONTROL_BLOCK.NameLength}]"]
    if parent == "early":
        load = ["mov %P, [%K + " + PARENT + "]"]
        name = load + name if parent_first else name + load
    copy = ["test byte [%N], 1                    ; Compressed: one byte a character",
            "jz .wide", "sub %C, %L", "sub %C, %L", "xor %I32, %I32", "test %L32, %L32", "jz .separator",
            ".narrow:", "movzx %T32, byte [%N + %I + {off:_CM_NAME_CONTROL_BLOCK.Name}]",
            "mov [%C + %I*2], %T16", "inc %I32", "cmp %I32, %L32", "jb .narrow", "jmp .separator",
            ".wide:", "sub %C, %L", "xor %I32, %I32", "test %L32, %L32", "jz .separator",
            ".copy:", "movzx %T32, word [%N + %I + {off:_CM_NAME_CONTROL_BLOCK.Name}]",
            "mov [%C + %I], %T16", "add %I32, 2", "cmp %I32, %L32", "jb .copy",
            ".separator:", "sub %C, 2", "mov word [%C], 5Ch"]
    step = ["mov %K, %P"] if parent == "early" else ["mov %K, [%K + " + PARENT + "]"]
    if parent == "rotated":
        return ["jmp .next", ".key:"] + name + copy + step + [".next:", "test %K, %K", "jnz .key"]
    return [".key:"] + name + copy + step + ["test %K, %K", "jnz .key"]


def _builder(regs: dict[str, str], parent: str, parent_first: bool, status: bool) -> str:
    """The walk's function: rcx = kcb (and, with `status`, rdx = UNICODE_STRING* out) -> the
    name in a new pool block (NTSTATUS, or the block's address)."""
    out = ["mov %O, rdx"] if status else []
    store = ["mov [%O], rax"] if status else ["mov %O, rax"]
    done = ["xor eax, eax"] if status else ["mov rax, %O"]
    failed = [f"mov eax, {STATUS_NO_MEMORY}"] if status else ["xor eax, eax"]
    too_long = [f"mov eax, {STATUS_INVALID_PARAMETER}"] if status else ["xor eax, eax"]
    body = (["push %K", "push %O", "sub rsp, 28h", "mov %K, rcx"] + out +
            ["call {CmpKeyFullNameLength}", "cmp eax, 0FFFFh", "ja .toolong", "mov [rsp + 20h], eax",
             "lea edx, [rax + 10h]", "mov ecx, 1                           ; PagedPool",
             "mov r8d, 624E4D43h                   ; 'CMNb'", "call {ExAllocatePoolWithTag}",
             "test rax, rax", "jz .nomem", "mov ecx, [rsp + 20h]", "mov [rax], cx", "mov [rax + 2], cx",
             "lea %C, [rax + 10h]", "mov [rax + 8], %C"] + store + ["add %C, rcx"] +
            _walk(parent, parent_first) + done + ["jmp .done", ".nomem:"] + failed + ["jmp .done", ".toolong:"] +
            too_long + [".done:", "add rsp, 28h", "pop %O", "pop %K", "ret"])
    return fill(lines(body), regs)


FULL_NAME_LENGTH = lines([
    "xor eax, eax                         ; rcx = kcb -> bytes of \\REGISTRY\\...", ".key:",
    "mov rdx, [rcx + " + NAME_BLOCK + "]", "movzx r8d, word [rdx + {off:_CM_NAME_CONTROL_BLOCK.NameLength}]",
    "test byte [rdx], 1", "jz .wide", "add r8d, r8d", ".wide:", "lea eax, [rax + r8 + 2]",
    "mov rcx, [rcx + " + PARENT + "]", "test rcx, rcx", "jnz .key", "ret"])


def key_name_code(win8: bool, rng: random.Random | None) -> tuple[dict[str, str], str]:
    """(functions, form drawn) of the export and what it calls."""
    structure = rng.choice(STRUCTURES) if rng else "with-status"
    structure = structure if win8 else "construct-name"      # Windows 7: CmpConstructName, the walk inside
    parent = rng.choice(PARENT_FORMS) if rng else "end"
    kept = rng.sample(NONVOLATILE, 2) if rng else ["rsi", "rdi"]
    cursor = rng.choice(VOLATILE[2:]) if rng else "r8"       # not rax/rcx: they set it up
    spare = rng.sample([r for r in VOLATILE if r != cursor], 5) if rng else ["rdx", "r9", "r10", "r11", "rax"]
    regs = dict(zip("KO", kept)) | dict(zip("NLITP", spare)) | {"C": cursor}
    first = bool(rng and rng.random() < 0.5)
    functions = {"CmCallbackGetKeyObjectIDEx" if win8 else "CmCallbackGetKeyObjectID": _export(win8, structure),
                 "CmpKeyFullNameLength": FULL_NAME_LENGTH, "CmpLockRegistry": lines(["ret"]),
                 "CmpUnlockRegistry": lines(["ret"])}
    if structure == "construct-name":
        functions["CmpConstructName"] = _builder(regs, parent, first, status=False)
    else:
        functions["CmpConstructNameFromKcbNameBlocks"] = _builder(regs, parent, first, status=True)
    if structure.startswith("with-status"):
        functions["CmpConstructNameWithStatus"] = _with_status(tail=structure.endswith("+tail"))
        functions["CmpAcquireShutdownRundown"] = lines(["mov al, 1", "ret"])
    form = f"{structure}+parent-{parent}" + ("+parent-first" if parent == "early" and first else "")
    return functions, form
