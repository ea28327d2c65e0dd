"""What exported kernel functions read, by a small register data-flow over their machine code.

For kernels we have no symbols for. Compilers name the same global in many ways: `mov rcx,
[rip+PspCidTable]`, `lea r9, [rip+X]` then `mov rcx, [r9]`, the cookie byte as `movzx`, `mov`
or the memory operand of an `xor`, in any register and any order, the end of a function in a
chunk reached by a jump. So each register's value is tracked symbolically (an argument, the
current thread from gs:[188h], a constant address, a value loaded from one of those) and every
memory operand is recorded with what its base and index registers held, and so is each jump
back to an instruction already decoded (a loop: what the registers held at its head and on the
way back). Callers (kernel.py) ask for candidates and check each on live data before using it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import capstone
from capstone import x86

from gdbhandles.windows.memory import MASK64

WINDOW = 0x200              # bytes decoded at once from a block start
MAX_INSNS = 400             # per traced function, over all its blocks
MAX_BLOCKS = 32
FOLLOW_CALLS = 4            # direct callees traced besides the function itself
ARGUMENTS = ("rcx", "rdx", "r8", "r9")
VOLATILE = ("rax", "rcx", "rdx", "r8", "r9", "r10", "r11")
BIT_OPS = ("or", "and", "bts", "btr")     # flag bits set in a value (a page-table root's no-flush bit, PCID)

Reader = Callable[[int, int], bytes]
# Symbolic values: ("arg", n) | ("gs", offset) | ("addr", va) | ("load", value, disp) | ("ptr", value, disp)
# | ("bits", value): a value with bits set or cleared by or/and/bts/btr
Value = tuple


@dataclass(frozen=True)
class Access:
    """One memory operand: read (or, for `lea`, only computed) at instruction `at`."""
    at: int
    text: str
    size: int
    base: Value | None          # what the base register held (("addr", va) for RIP-relative)
    index: Value | None
    scale: int
    disp: int
    lea: bool

    @property
    def constant(self) -> int | None:
        """The address, when it is a constant (RIP-relative or through a register set by `lea`)."""
        if self.base and self.base[0] == "addr" and self.index is None:
            return (self.base[1] + self.disp) & MASK64
        return None

    def table(self) -> int | None:
        """The base of a table indexed by a register: `[T + i*s]` or `[i + T]`, T a constant address."""
        for table, other in ((self.base, self.index), (self.index, self.base)):
            if table and table[0] == "addr" and other is not None and (table is self.base or self.scale == 1):
                return (table[1] + self.disp) & MASK64
        return None


@dataclass(frozen=True)
class Loop:
    """A jump back to an instruction already decoded: what the registers held when the loop's
    head was first reached (`entry`) and at the jump back (`back`, instruction `at`)."""
    head: int
    entry: dict
    back: dict
    at: int

    def steps(self) -> list[tuple[str, Value, int]]:
        """(register, value at the head, displacement) of each register the loop reloads from a
        field of what it held: `mov r, [r+d]` (or through a copy) on the way back."""
        return [(reg, value, self.back[reg][2]) for reg, value in self.entry.items()
                if self.back.get(reg, (None,))[0] == "load" and self.back[reg][1] == value]


@dataclass
class Trace:
    address: int
    accesses: list[Access] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    arguments: dict[int, Value | None] = field(default_factory=dict)   # callee -> rcx at its first call
    loops: list[Loop] = field(default_factory=list)
    returns: list[Value | None] = field(default_factory=list)   # what rax held at each `ret`
    cr3: list[tuple[Value | None, int]] = field(default_factory=list)   # what `mov cr3, reg` wrote, where


_engine = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_engine.detail = True


def _canonical() -> dict[int, str]:
    """capstone register id -> its 64-bit register name (al, ax, eax -> rax; r8d -> r8)."""
    names = {}
    legacy = {"a": ("al", "ah", "ax", "eax"), "b": ("bl", "bh", "bx", "ebx"), "c": ("cl", "ch", "cx", "ecx"),
              "d": ("dl", "dh", "dx", "edx")}
    for letter, subs in legacy.items():
        for sub in subs + (f"r{letter}x",):
            names[sub] = f"r{letter}x"
    for reg in ("si", "di", "bp", "sp"):
        for sub in (reg, reg + "l", "e" + reg, "r" + reg):
            names[sub] = "r" + reg
    for n in range(8, 16):
        for suffix in ("", "b", "w", "d"):
            names[f"r{n}{suffix}"] = f"r{n}"
    out = {}
    for reg_id in range(1, x86.X86_REG_ENDING):
        name = _engine.reg_name(reg_id)
        if name in names:
            out[reg_id] = names[name]
    return out


CANONICAL = _canonical()


def _read_window(read: Reader, address: int) -> bytes:
    for size in (WINDOW, 0x100, 0x40, 0x10):
        try:
            return read(address, size)
        except Exception:          # noqa: BLE001 - a page boundary into unmapped memory
            continue
    return b""


class _Tracer:
    """Walks the blocks of one function from its entry, carrying register values along jumps."""

    def __init__(self, read: Reader, address: int):
        self.read = read
        self.trace = Trace(address)
        self.count = 0
        self.states: dict[int, dict] = {}       # instruction -> registers when first decoded

    def run(self) -> Trace:
        start = {reg: ("arg", n) for n, reg in enumerate(ARGUMENTS)}
        pending, seen = [(self.trace.address, start)], set()
        while pending and len(seen) < MAX_BLOCKS and self.count < MAX_INSNS:
            address, regs = pending.pop(0)
            if address in seen:
                continue
            seen.add(address)
            pending += self._block(address, dict(regs))
        return self.trace

    def _block(self, address: int, regs: dict) -> list[tuple[int, dict]]:
        """Decode from `address` to the block's end; returns the jump targets with their states."""
        out = []
        for insn in _engine.disasm(_read_window(self.read, address), address):
            self.count += 1
            if insn.mnemonic == "int3" or self.count > MAX_INSNS:
                break
            self.states.setdefault(insn.address, dict(regs))
            target = _direct_target(insn)
            if insn.mnemonic == "ret":
                self.trace.returns.append(regs.get("rax"))
                break
            if insn.mnemonic == "call":
                if target is not None:
                    self.trace.calls.append(target)
                    self.trace.arguments.setdefault(target, regs.get("rcx"))
                for reg in VOLATILE:
                    regs.pop(reg, None)
                continue
            if insn.mnemonic.startswith("j"):
                if target is not None and target <= insn.address and target in self.states:
                    self.trace.loops.append(Loop(target, self.states[target], dict(regs), insn.address))
                if target is not None:
                    out.append((target, dict(regs)))
                if insn.mnemonic == "jmp":
                    break
                continue
            if insn.mnemonic == "mov" and insn.op_str.startswith("cr3,"):
                self.trace.cr3.append((regs.get(CANONICAL.get(insn.operands[1].reg)), insn.address))
            self._step(insn, regs)
        return out

    def _step(self, insn, regs: dict) -> None:
        accesses = [self._access(insn, op, regs) for op in insn.operands if op.type == x86.X86_OP_MEM]
        self.trace.accesses += accesses
        written = {CANONICAL.get(r) for r in insn.regs_access()[1]}
        value = _result(insn, regs, accesses)
        for reg in written:
            regs.pop(reg, None)
        dest = _destination(insn)
        if dest is not None and value is not None:
            regs[dest] = value

    def _access(self, insn, op, regs: dict) -> Access:
        mem = op.mem
        disp = mem.disp
        if mem.base == x86.X86_REG_RIP:
            base, disp = ("addr", (insn.address + insn.size + disp) & MASK64), 0
        elif mem.segment == x86.X86_REG_GS and not mem.base and not mem.index:
            base = ("segment", "gs")
        else:
            base = regs.get(CANONICAL.get(mem.base), ("reg", mem.base)) if mem.base else None
        index = regs.get(CANONICAL.get(mem.index), ("reg", mem.index)) if mem.index else None
        return Access(insn.address, f"{insn.mnemonic} {insn.op_str}", op.size, base, index, mem.scale,
                      disp, insn.mnemonic == "lea")


def _direct_target(insn) -> int | None:
    if insn.mnemonic in ("call", "jmp") or insn.mnemonic.startswith("j"):
        op = insn.operands[0] if insn.operands else None
        if op is not None and op.type == x86.X86_OP_IMM:
            return op.imm & MASK64
    return None


def _destination(insn) -> str | None:
    ops = insn.operands
    if ops and ops[0].type == x86.X86_OP_REG:
        return CANONICAL.get(ops[0].reg)
    return None


def _result(insn, regs: dict, accesses: list[Access]) -> Value | None:
    """The symbolic value a register gets from `mov`, `movzx`, `lea` and `xor r, r`; else None."""
    ops, name = insn.operands, insn.mnemonic
    if name in ("mov", "movzx") and len(ops) == 2 and ops[1].type == x86.X86_OP_REG:
        return regs.get(CANONICAL.get(ops[1].reg)) if ops[0].size == 8 else None
    if name == "xor" and len(ops) == 2 and all(o.type == x86.X86_OP_REG for o in ops) \
            and ops[0].reg == ops[1].reg:
        return ("zero",)
    if name in BIT_OPS and len(ops) == 2 and ops[0].type == x86.X86_OP_REG and ops[0].size == 8:
        kept = regs.get(CANONICAL.get(ops[0].reg))
        return None if kept is None else ("bits", kept)
    if name not in ("mov", "movzx", "lea") or not accesses:
        return None
    access = accesses[0]
    if access.index is not None or access.base is None:
        return None
    if access.base == ("segment", "gs"):
        return ("gs", access.disp)
    if access.base[0] == "addr":
        return ("addr", access.constant) if name == "lea" else ("load", ("addr", access.constant), 0)
    return ("ptr" if name == "lea" else "load", access.base, access.disp)


def trace(read: Reader, address: int) -> Trace:
    """Every memory operand of the function at `address`, over all blocks reachable by jumps."""
    return _Tracer(read, address).run()


def traces(read: Reader, address: int, depth: int = 1) -> list[Trace]:
    """The function and its first direct callees (the worker routines real builds call), and
    theirs down to `depth` calls deep."""
    found = level = [trace(read, address)]
    for _ in range(depth):
        done = {t.address for t in found}
        callees = [c for c in dict.fromkeys(c for t in level for c in t.calls) if c not in done][:FOLLOW_CALLS]
        level = [trace(read, callee) for callee in callees]
        found += level
    return found


# --- what callers ask for ----------------------------------------------------------------------

def constant_loads(found: list[Trace], size: int) -> list[tuple[int, int]]:
    """(address read, instruction address) of every read of `size` bytes from a constant address."""
    return [(a.constant, a.at) for t in found for a in t.accesses
            if not a.lea and a.size == size and a.constant is not None]


def indexed_tables(found: list[Trace], size: int) -> list[tuple[int, int]]:
    """(table base, instruction address) of reads of `size` bytes indexed by a register."""
    return [(a.table(), a.at) for t in found for a in t.accesses
            if not a.lea and a.size == size and a.table() is not None]


def field_reads(found: list[Trace], base: Value, size: int | None = None,
                lea: bool = False) -> list[tuple[int, int]]:
    """(displacement, instruction address) of accesses through a register holding `base`
    (e.g. ("arg", 0): fields of the first argument)."""
    return [(a.disp, a.at) for t in found for a in t.accesses
            if a.base == base and a.index is None and a.lea == lea and (size is None or a.size == size)]


def cr3_writes(found: list[Trace]) -> list[tuple[Value | None, int]]:
    """(what was written, instruction address) of every `mov cr3, reg`."""
    return [write for t in found for write in t.cr3]


def loads_through(found: list[Trace], kind: str, size: int = 8) -> list[tuple[Value, int, int]]:
    """(base value, displacement, instruction address) of reads whose base register held a value
    of `kind` (e.g. "load": a field of something loaded before)."""
    return [(a.base, a.disp, a.at) for t in found for a in t.accesses
            if not a.lea and a.size == size and a.index is None and a.base and a.base[0] == kind]
