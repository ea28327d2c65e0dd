"""Unexported kernel globals found in exported functions' machine code (capstone).

For kernels we have no symbols for: the instructions that reach a global name it through a
RIP-relative operand, e.g. `mov rcx, [rip+PspCidTable]` in PsLookupProcessByProcessId or
`movzx ecx, byte ptr [rip+ObHeaderCookie]` in ObGetObjectType. A function that only calls
the one doing the work is followed one call (or tail jump) deep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import capstone
from capstone import x86

CODE_BYTES = 0x300          # how much of a function is decoded
MASK64 = (1 << 64) - 1
FOLLOW_CALLS = 4            # callees examined when the function itself has no match

Reader = Callable[[int, int], bytes]


@dataclass
class Insn:
    address: int
    mnemonic: str
    text: str
    rip_target: int | None       # address a RIP-relative memory operand names
    register: int | None         # destination register of the first operand
    memory_base: int | None      # base register of a non-RIP memory operand
    memory_size: int | None      # size of the memory operand
    call_target: int | None


_engine = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_engine.detail = True


def decode(read: Reader, address: int, stop_at_ret: bool = False) -> list[Insn]:
    """Linear decode from address up to padding (int3), CODE_BYTES, or the first `ret` when
    asked (for straight-line functions); an unreadable tail is ignored."""
    code = b""
    for size in (CODE_BYTES, 0x100, 0x40):
        try:
            code = read(address, size)
            break
        except Exception:          # noqa: BLE001 - a page boundary into unmapped memory
            continue
    result = []
    for insn in _engine.disasm(code, address):
        if insn.mnemonic == "int3":
            break
        rip_target = register = memory_base = memory_size = call_target = None
        for index, op in enumerate(insn.operands):
            if op.type == x86.X86_OP_MEM:
                memory_size = op.size
                if op.mem.base == x86.X86_REG_RIP:
                    rip_target = insn.address + insn.size + op.mem.disp
                else:
                    memory_base = op.mem.base
            elif op.type == x86.X86_OP_REG and index == 0:
                register = op.reg
            elif op.type == x86.X86_OP_IMM and insn.mnemonic in ("call", "jmp"):
                call_target = op.imm & MASK64   # a call, or a tail call into the worker routine
        result.append(Insn(insn.address, insn.mnemonic, f"{insn.mnemonic} {insn.op_str}",
                           rip_target, register, memory_base, memory_size, call_target))
        if stop_at_ret and insn.mnemonic == "ret":
            break
    return result


def _search(read: Reader, address: int, match: Callable[[list[Insn]], int | None]) -> int | None:
    """match() on the function, else on the functions it calls (one level)."""
    body = decode(read, address)
    found = match(body)
    if found is not None:
        return found
    callees = [i.call_target for i in body if i.call_target is not None][:FOLLOW_CALLS]
    for callee in callees:
        found = match(decode(read, callee))
        if found is not None:
            return found
    return None


def qword_loads(read: Reader, address: int) -> list[int]:
    """Targets of every `mov r64, qword ptr [rip+X]` in the function and its direct callees."""
    targets = []

    def collect(body):
        targets.extend(i.rip_target for i in body
                       if i.mnemonic == "mov" and i.rip_target is not None and i.memory_size == 8
                       and i.register is not None)
        return None

    body = decode(read, address)
    collect(body)
    for callee in [i.call_target for i in body if i.call_target is not None][:FOLLOW_CALLS]:
        collect(decode(read, callee))
    return targets


def first_qword_load(read: Reader, address: int) -> int | None:
    """PspCidTable: the first RIP-relative qword load in PsLookupProcessByProcessId."""
    def match(body):
        return next((i.rip_target for i in body if i.mnemonic == "mov" and i.rip_target is not None
                     and i.memory_size == 8 and i.register is not None), None)
    return _search(read, address, match)


def type_table_and_cookie(read: Reader, address: int) -> tuple[int | None, int | None]:
    """(ObTypeIndexTable, ObHeaderCookie) from ObGetObjectType: the `lea` and the byte load."""
    body = decode(read, address, stop_at_ret=True)
    table = next((i.rip_target for i in body if i.mnemonic == "lea" and i.rip_target is not None), None)
    cookie = next((i.rip_target for i in body if i.mnemonic == "movzx" and i.rip_target is not None
                   and i.memory_size == 1), None)
    return table, cookie


def byte_table(read: Reader, address: int) -> int | None:
    """ObpInfoMaskToOffset from ObQueryNameString: `lea r, [rip+X]` then a byte load from [r+…]."""
    def match(body):
        for index, insn in enumerate(body):
            if insn.mnemonic != "lea" or insn.rip_target is None:
                continue
            for later in body[index + 1:index + 8]:
                if later.mnemonic == "movzx" and later.memory_base == insn.register \
                        and later.memory_size == 1:
                    return insn.rip_target
        return None
    return _search(read, address, match)
