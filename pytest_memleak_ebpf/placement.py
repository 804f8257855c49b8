"""Choose *where* inside an allocator function to put an entry uprobe.

Why
---
On x86-64 a uprobe replaces the first byte of the probed instruction with
``int3``.  When the breakpoint is hit the kernel runs the BPF program and then
has to execute the displaced instruction.  For a handful of instructions it
*emulates* them in the trap handler (cheap, ~0.6-0.9 us per hit on this
machine); for everything else it copies the instruction to an out-of-line slot
and *single-steps* it (a second trap, ~10-14 us per hit).  glibc 2.36's
``free`` starts with ``test rdi, rdi`` (single-stepped) followed by
``je`` (emulated); probing the ``je`` at offset 3 is >10x cheaper and ``rdi``
still holds the argument there.

What the kernel emulates (arch/x86/kernel/uprobes.c, checked against the
source and measured on this machine's 6.18 kernel with perf uprobe events)
---------------------------------------------------------------------------
``arch_uprobe_analyze_insn()`` tries, in order:

* ``branch_setup_xol_ops()``: ``jmp rel8`` (eb), ``jmp rel32`` (e9),
  ``call rel32`` (e8), ``jcc rel8`` (70-7f), ``jcc rel32`` (0f 80-8f).
  Branches carrying a 0x66 prefix are rejected (-ENOTSUPP).  NOPs are handled
  here too, but which NOPs depends on the kernel version:

  - < 6.16: only opcode 0x90 (``case 0x90`` -- this also swallows ``pause``
    (f3 90) and, wrongly, ``xchg r8, rax`` (49 90)).
  - 6.16 .. 6.18 (Jiri Olsa, "uprobes/x86: Add support to emulate NOP
    instructions"): additionally any instruction whose bytes equal
    ``x86_nops[len]`` for len <= ASM_NOP_MAX, i.e. the eight canonical GAS
    NOPs 90 / 66 90 / 0f 1f 00 / 0f 1f 40 00 / 0f 1f 44 00 00 /
    66 0f 1f 44 00 00 / 0f 1f 80 0*4 / 0f 1f 84 00 0*4 (the 9-11 byte ones
    carry a 2e prefix and are rejected earlier, see below).  ``case 0x90`` is
    still there, so on 6.18 ``49 90`` is emulated as a NOP -- measured: a
    probe on ``xchg r8, rax`` changes the program's result.
  - 6.19+ (Peter Zijlstra, "x86/insn,uprobes,alternative: Unify
    insn_is_nop()", tip perf/core Oct 2025): ``insn_is_nop()`` -- NOP w/o
    REX.B and w/o REP, any ``0f 1f /0``, ``mov %reg,%reg``, ``lea 0(%reg),%reg``,
    ``jmp +0``.
  6.18 additionally *optimises* probes on 5-byte NOPLs into a call to a
  trampoline (``arch_uprobe_optimize``), which is why any ``0f 1f /0`` of
  length 5 measured cheap here.

* ``push_setup_xol_ops()``: ``push r64`` encoded as the single byte 50-57, or
  as exactly ``41 50-57`` (push r8-r15).  Any other encoding (e.g. ``48 55``,
  ``66 55``, ``ff /6``, ``push imm``) is single-stepped.

* everything else (``test``, ``cmp``, ``mov``, ``sub rsp``, ``endbr64`` ...)
  is single-stepped out of line.  ``endbr64`` (f3 0f 1e fa) is *not* emulated
  on any kernel version we know of (measured ~10.7 us here).

* ``uprobe_init_insn()`` refuses to probe at all (-ENOTSUPP, errno 524) an
  instruction carrying an ES/CS/SS/DS segment prefix or LOCK -- e.g. a
  ``ds je`` (3e 74 ..) branch hint or the ``cs nopw`` padding GCC emits.

:func:`is_emulated` implements the *intersection* of these versions (so the
answer holds on 6.16 .. 6.19+): rel. jmp/jcc/call without legacy prefixes
(except the harmless ``bnd``/f2) and without REX, the two ``push`` encodings,
and the eight canonical ``x86_nops`` byte sequences.  ``pause`` and
``49 90`` are deliberately *not* treated as emulated.  Anything unknown is
reported as not emulated.  (On kernels < 6.16 the multi-byte ``0f 1f`` NOPs
are single-stepped; that only makes a chosen NOP slower, never wrong.)

Rules for moving the probe
--------------------------
:func:`choose_entry_offset` walks forward from the symbol and stops at the
first emulated instruction.  Every instruction it skips must

(a) not be a control transfer (jump/call/ret/loop/int/syscall ...), so the
    probe still runs on every path through the function;
(b) not write any of ``arg_regs`` (compared as full registers: a write to
    ``edi``/``di``/``dil`` is a write to ``rdi``), nor ``rip`` or a segment
    register, nor -- with ``preserve_stack`` (default) -- ``rsp``/``rbp``;
(c) have no side effects beyond registers and flags: no memory stores, no
    LOCK/REP string ops, no push/pop/enter/leave, no privileged, TSX,
    FS/GS-base, PKRU or ud instructions.  Memory *reads* are fine.
(d) if the function's end is known, no direct branch in the function body
    may target an address in ``(address, address + offset]`` -- such a jump
    would bypass the moved probe (or hit it without a real call).

The result is meant for **entry** uprobes that read argument registers.
A uretprobe reads (and replaces) the return address at ``[rsp]`` when its
breakpoint fires, so it may only be moved when ``rsp`` and ``[rsp]`` are the
same at the probe as at the symbol: that holds when ``preserve_stack`` is on
(nothing skipped writes rsp, rbp or memory) and is reported as
``Placement.return_probe_ok``.  Measured on this machine: uretprobes on
glibc's memalign+7 / pvalloc+7 / posix_memalign+7 fire once per call and cost
1.3-1.6 us instead of 11-14 us at +0.

Known blind spots (documented rather than solved): jump tables and
out-of-function fragments (``foo.cold``) jumping back into the skipped
prologue are not seen; only the function's own body is scanned.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from capstone import CS_ARCH_X86, CS_MODE_64, Cs, CsError
from capstone import x86_const as X86

from . import elf

__all__ = [
    "Placement",
    "SymbolPlacement",
    "choose_entry_offset",
    "is_emulated",
    "place_probes",
    "clear_cache",
    "full_register",
]


# --------------------------------------------------------------------------
# result types
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where to put an entry probe, relative to the function symbol."""

    offset: int
    insn: str  # "mnemonic op_str" of the instruction at ``offset`` ('' if undecodable)
    emulated: bool  # is the instruction at ``offset`` emulated by the kernel
    reason: str
    skipped: Tuple[str, ...] = ()  # instructions executed before the probe
    # rsp and [rsp] at ``offset`` equal their values at the symbol, so a
    # uretprobe may use this offset as well (always true for offset 0).
    return_probe_ok: bool = True


@dataclass(frozen=True)
class SymbolPlacement:
    name: str
    address: int  # symbol vaddr (st_value)
    file_offset: int  # file offset of the symbol (what uprobe attach wants)
    size: int  # st_size (0 if unknown)
    placement: Placement
    aliases: Tuple[str, ...] = ()  # other *requested* names at the same address

    @property
    def probe_address(self) -> int:
        return self.address + self.placement.offset

    @property
    def probe_file_offset(self) -> int:
        return self.file_offset + self.placement.offset


# --------------------------------------------------------------------------
# capstone helpers
# --------------------------------------------------------------------------

_tls = threading.local()


def _md() -> Cs:
    md = getattr(_tls, "md", None)
    if md is None:
        md = Cs(CS_ARCH_X86, CS_MODE_64)
        md.detail = True
        _tls.md = md
    return md


def _md_lite() -> Cs:
    md = getattr(_tls, "md_lite", None)
    if md is None:
        md = Cs(CS_ARCH_X86, CS_MODE_64)
        md.skipdata = True  # keep going over padding / data in code
        _tls.md_lite = md
    return md


def _text(insn) -> str:
    return f"{insn.mnemonic} {insn.op_str}".strip()


# Register families: every name maps to its full-width register.
_GPR_ALIASES = {
    "rax": ("eax", "ax", "al", "ah"),
    "rbx": ("ebx", "bx", "bl", "bh"),
    "rcx": ("ecx", "cx", "cl", "ch"),
    "rdx": ("edx", "dx", "dl", "dh"),
    "rsi": ("esi", "si", "sil"),
    "rdi": ("edi", "di", "dil"),
    "rbp": ("ebp", "bp", "bpl"),
    "rsp": ("esp", "sp", "spl"),
    "rip": ("eip", "ip"),
    "rflags": ("eflags", "flags"),
}
_FULL: Dict[str, str] = {}
for _full, _subs in _GPR_ALIASES.items():
    _FULL[_full] = _full
    for _s in _subs:
        _FULL[_s] = _full
for _n in range(8, 16):
    for _suffix in ("", "d", "w", "b", "l"):
        _FULL[f"r{_n}{_suffix}"] = f"r{_n}"
_VEC_RE = re.compile(r"^[xyz]mm(\d+)$")


def full_register(name: str) -> str:
    """'edi' -> 'rdi', 'r8b' -> 'r8', 'xmm3'/'ymm3' -> 'zmm3'; others lowercased."""
    n = name.strip().lower().lstrip("%")
    if n in _FULL:
        return _FULL[n]
    m = _VEC_RE.match(n)
    if m:
        return f"zmm{m.group(1)}"
    return n


_SEGMENT_REGS = frozenset({"cs", "ds", "es", "fs", "gs", "ss"})

# --------------------------------------------------------------------------
# is_emulated
# --------------------------------------------------------------------------

_LEGACY_PREFIXES = frozenset(
    {0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67}
)
# uprobe_init_insn() -> is_prefix_bad(): the probe cannot even be registered.
_BAD_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0xF0})

# x86_nops[1..8] for CONFIG_64BIT (arch/x86/include/asm/nops.h).  9..11 carry
# a 2e (CS) prefix and are refused by is_prefix_bad() before the NOP check.
_KERNEL_NOPS = frozenset(
    bytes(b)
    for b in (
        [0x90],
        [0x66, 0x90],
        [0x0F, 0x1F, 0x00],
        [0x0F, 0x1F, 0x40, 0x00],
        [0x0F, 0x1F, 0x44, 0x00, 0x00],
        [0x66, 0x0F, 0x1F, 0x44, 0x00, 0x00],
        [0x0F, 0x1F, 0x80, 0x00, 0x00, 0x00, 0x00],
        [0x0F, 0x1F, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    )
)

_BRANCH_IDS = frozenset(
    {
        X86.X86_INS_JMP,
        X86.X86_INS_CALL,
        X86.X86_INS_JAE,
        X86.X86_INS_JA,
        X86.X86_INS_JBE,
        X86.X86_INS_JB,
        X86.X86_INS_JE,
        X86.X86_INS_JGE,
        X86.X86_INS_JG,
        X86.X86_INS_JLE,
        X86.X86_INS_JL,
        X86.X86_INS_JNE,
        X86.X86_INS_JNO,
        X86.X86_INS_JNP,
        X86.X86_INS_JNS,
        X86.X86_INS_JO,
        X86.X86_INS_JP,
        X86.X86_INS_JS,
    }
)


def _split_prefixes(raw: bytes) -> Tuple[bytes, int, bytes]:
    """(legacy prefixes, rex byte or 0, rest starting at the opcode)."""
    i = 0
    while i < len(raw) and raw[i] in _LEGACY_PREFIXES:
        i += 1
    rex = 0
    if i < len(raw) and 0x40 <= raw[i] <= 0x4F:
        rex = raw[i]
        i += 1
    return bytes(raw[: i - (1 if rex else 0)]), rex, bytes(raw[i:])


def is_emulated(insn) -> bool:
    """Does the kernel emulate ``insn`` (a capstone x86-64 insn) when a uprobe
    sits on it, instead of single-stepping it out of line?

    Conservative: the answer is True only for encodings emulated by every
    kernel from 6.16 on (branches and push since 3.x/4.x); unknown -> False.
    """
    try:
        raw = bytes(insn.bytes)
        if not raw:
            return False
        # NOPs: exact canonical byte sequences only.
        if raw in _KERNEL_NOPS:
            return True
        prefixes, rex, rest = _split_prefixes(raw)
        if not rest or any(p in _BAD_PREFIXES for p in prefixes):
            return False
        # push r64: "50+r" or exactly "41 50+r" (push_setup_xol_ops).
        if insn.id == X86.X86_INS_PUSH:
            if len(raw) == 1 and 0x50 <= raw[0] <= 0x57:
                return True
            if len(raw) == 2 and raw[0] == 0x41 and 0x50 <= raw[1] <= 0x57:
                return True
            return False
        # relative jmp / jcc / call (branch_setup_xol_ops).
        if insn.id in _BRANCH_IDS:
            if rex or any(p != 0xF2 for p in prefixes):  # only "bnd" tolerated
                return False
            op = rest[0]
            if op in (0xEB, 0xE9, 0xE8) or 0x70 <= op <= 0x7F:
                pass
            elif op == 0x0F and len(rest) >= 2 and 0x80 <= rest[1] <= 0x8F:
                pass
            else:
                return False
            ops = insn.operands
            return len(ops) == 1 and ops[0].type == X86.X86_OP_IMM
        return False
    except (CsError, AttributeError, IndexError, TypeError):
        return False


# --------------------------------------------------------------------------
# skippability of the instructions before the probe
# --------------------------------------------------------------------------

_CONTROL_GROUPS = frozenset(
    {
        X86.X86_GRP_JUMP,
        X86.X86_GRP_CALL,
        X86.X86_GRP_RET,
        X86.X86_GRP_INT,
        X86.X86_GRP_IRET,
        X86.X86_GRP_BRANCH_RELATIVE,
    }
)
_SIDE_EFFECT_GROUPS = frozenset(
    {
        X86.X86_GRP_PRIVILEGE,
        X86.X86_GRP_FSGSBASE,
        X86.X86_GRP_RTM,
        X86.X86_GRP_VM,
    }
)
# Deny list for things capstone's groups/regs_access do not describe well:
# implicit memory writes, stack manipulation, traps, state outside the GPRs.
# Matched against the base mnemonic (capstone spells prefixes as words:
# "rep stosb", "lock add", "bnd jmp").
_DENY_MNEMONICS = frozenset(
    """
    push pushf pushfq pushfd pushfw pushal pusha pop popf popfq popfd popfw popal popa
    enter leave
    syscall sysenter sysexit sysret sysretq int int1 int3 into iret iretd iretq
    ud0 ud1 ud2 hlt
    xbegin xend xabort
    wrfsbase wrgsbase wrpkru
    monitor mwait monitorx mwaitx umonitor umwait tpause
    vmcall vmfunc clui stui senduipi
    """.split()
)
_DENY_MNEMONIC_PREFIX_RE = re.compile(
    r"^(?:xsave|xrstor|fxsave|fxrstor|bnd|wrss|rstorssp|saveprevssp|incssp|setssbsy|clrssbsy)"
)
# One-byte string-instruction opcodes (movs/cmps a4-a7, stos/lods/scas aa-af,
# ins/outs 6c-6f): implicit memory accesses through rdi/rsi, REP loops.
_STRING_OPCODES = frozenset(list(range(0xA4, 0xA8)) + list(range(0xAA, 0xB0)) +
                            list(range(0x6C, 0x70)))


def _unskippable_reason(insn, protected: frozenset) -> Optional[str]:
    """None if the probe may be moved past ``insn``, else why not."""
    t = _text(insn)
    try:
        groups = set(insn.groups)
    except CsError:
        return f"'{t}': no instruction details"
    if groups & _CONTROL_GROUPS:
        return f"'{t}' transfers control (probe would not run on every path)"
    if groups & _SIDE_EFFECT_GROUPS:
        return f"'{t}' has side effects (privileged/TSX/FS-GS base/VM)"
    words = insn.mnemonic.split()
    base = words[-1] if words else ""
    if base in _DENY_MNEMONICS or _DENY_MNEMONIC_PREFIX_RE.match(base):
        return f"'{t}' touches the stack/memory or machine state implicitly"
    prefixes, _rex, rest = _split_prefixes(bytes(insn.bytes))
    if 0xF0 in prefixes or "lock" in words[:-1]:
        return f"'{t}' is a locked (atomic) memory operation"
    if rest and rest[0] in _STRING_OPCODES:
        return f"'{t}' is a string instruction (implicit memory access)"
    try:
        for op in insn.operands:
            if op.type == X86.X86_OP_MEM and op.access & 2:  # CS_AC_WRITE
                return f"'{t}' writes memory"
        _reads, writes = insn.regs_access()
        written = {full_register(insn.reg_name(r)) for r in writes}
    except CsError:
        return f"'{t}': register effects unknown"
    hit = sorted(written & protected)
    if hit:
        return f"'{t}' writes {', '.join(hit)}"
    return None


# --------------------------------------------------------------------------
# branch targets inside the function
# --------------------------------------------------------------------------

_LITE_BRANCH_RE = re.compile(r"^(?:j|call|loop|xbegin)")
_HEX_RE = re.compile(r"^0x[0-9a-f]+$")


def _direct_branch_targets(code: bytes, address: int) -> List[Tuple[int, int, str]]:
    """(source address, target, text) of every direct branch in ``code``."""
    out = []
    for addr, _size, mnem, op_str in _md_lite().disasm_lite(code, address):
        if mnem.startswith("bnd "):
            mnem = mnem[4:]
        if _LITE_BRANCH_RE.match(mnem) and _HEX_RE.match(op_str):
            out.append((addr, int(op_str, 16), f"{mnem} {op_str}"))
    return out


# --------------------------------------------------------------------------
# choose_entry_offset
# --------------------------------------------------------------------------


def choose_entry_offset(
    code: bytes,
    address: int,
    arg_regs: Sequence[str],
    *,
    max_insns: int = 8,
    function_end: Optional[int] = None,
    preserve_stack: bool = True,
) -> Placement:
    """Pick the offset of an entry uprobe inside a function.

    ``code`` holds the function's machine code starting at the symbol, which
    lives at virtual address ``address``.  ``arg_regs`` are the registers the
    BPF program reads at entry (e.g. ``["rdi"]`` for ``free``).
    ``function_end`` is the exclusive end address (``address + st_size``);
    a value ``< address`` is taken as the size instead.  When given, the
    walk stays inside the function and the body is scanned for jumps into the
    skipped prologue.  With ``preserve_stack`` (default) instructions that
    write ``rsp``/``rbp`` are never skipped, so stack walks and ``[rsp]``
    look the same at the probe as at the symbol.

    Returns offset 0 whenever moving the probe is not provably safe.  Never
    raises for arbitrary ``code`` bytes.
    """
    code = bytes(code)
    if function_end is not None:
        size = function_end - address if function_end >= address else function_end
        size = max(0, size)
        body = code[:size]
        body_complete = len(code) >= size
    else:
        body = code
        body_complete = False
    if max_insns < 1:
        max_insns = 1
    protected = frozenset(full_register(r) for r in arg_regs) | {"rip"} | _SEGMENT_REGS
    if preserve_stack:
        protected |= {"rsp", "rbp"}

    md = _md()
    # Longest x86 instruction is 15 bytes: no need to decode further.
    window = body[: 15 * max_insns]
    skipped: List[str] = []
    first = None
    try:
        for idx, insn in enumerate(md.disasm(window, address)):
            if idx >= max_insns:
                break
            if first is None:
                first = insn
            if is_emulated(insn):
                off = insn.address - address
                if off == 0:
                    return Placement(
                        0, _text(insn), True, f"entry instruction '{_text(insn)}' is emulated"
                    )
                return _moved(insn, off, address, body, body_complete, function_end,
                              skipped, first, preserve_stack)
            why = _unskippable_reason(insn, protected)
            if why is not None:
                return _fallback(first, f"cannot skip {why}", skipped)
            skipped.append(_text(insn))
    except CsError as e:  # pragma: no cover - capstone internal failure
        return _fallback(first, f"disassembly failed: {e}", skipped)
    if first is None:
        return Placement(0, "", False, "entry bytes do not decode as an x86-64 instruction")
    if len(skipped) >= max_insns:
        return _fallback(first, f"no emulated instruction in the first {max_insns} instructions",
                         skipped)
    return _fallback(first, "no emulated instruction before the code ran out / stopped decoding",
                     skipped)


def _fallback(first, why: str, skipped: Sequence[str]) -> Placement:
    if first is None:
        return Placement(0, "", False, why)
    t = _text(first)
    emu = is_emulated(first)
    kind = "emulated" if emu else "single-stepped"
    return Placement(0, t, emu, f"probe stays on entry '{t}' ({kind}): {why}")


def _moved(insn, off: int, address: int, body: bytes, body_complete: bool,
           function_end: Optional[int], skipped: List[str], first,
           preserve_stack: bool) -> Placement:
    t = _text(insn)
    note = ""
    if function_end is not None:
        if not body_complete:
            return _fallback(first, "function body is truncated; cannot rule out jumps into "
                                    "the skipped prologue", skipped)
        for src, target, btext in _direct_branch_targets(body, address):
            if address < target <= address + off:
                return _fallback(
                    first,
                    f"'{btext}' at +{src - address:#x} jumps into the skipped prologue "
                    f"(+{target - address:#x})",
                    skipped,
                )
    else:
        note = " (function size unknown: body not scanned for jumps into the prologue)"
    sk = ", ".join(f"'{s}'" for s in skipped)
    return Placement(
        off,
        t,
        True,
        f"skipped {sk} (single-stepped); probe on emulated '{t}' at +{off:#x}{note}",
        tuple(skipped),
        preserve_stack,
    )


# --------------------------------------------------------------------------
# ELF side
# --------------------------------------------------------------------------

_PF_X = elf.SEGMENT_EXECUTABLE

_cache_lock = threading.Lock()
_elf_cache: Dict[str, Tuple[tuple, elf.FunctionSymbols]] = {}
_placement_cache: Dict[tuple, Placement] = {}


def clear_cache() -> None:
    with _cache_lock:
        _elf_cache.clear()
        _placement_cache.clear()


def _file_offset(loads, vaddr: int) -> Optional[Tuple[int, int]]:
    """(file offset, bytes available in the file from there) for ``vaddr``."""
    best = None
    for p_vaddr, filesz, p_offset, flags in loads:
        if p_vaddr <= vaddr < p_vaddr + filesz:
            cand = (vaddr - p_vaddr + p_offset, p_vaddr + filesz - vaddr, flags & _PF_X)
            if best is None or (cand[2] and not best[2]):
                best = cand
    return None if best is None else best[:2]


def _pick(cands: List[Tuple[int, int, int, bool, int]]):
    # default version (@@) first, then .dynsym over .symtab, GLOBAL over WEAK,
    # then a sized symbol.
    return sorted(cands, key=lambda c: (c[3], c[4], c[2] != 1, c[1] == 0))[0]


def place_probes(
    elf_path: str,
    functions: Mapping[str, Sequence[str]],
    *,
    max_insns: int = 8,
    preserve_stack: bool = True,
) -> Dict[str, SymbolPlacement]:
    """Entry-probe placement for ``functions`` ({name: arg_regs}) in an x86-64
    ELF file.  Names not defined in the file (or defined only as an IFUNC,
    whose st_value is the resolver) are absent from the result.

    Names sharing an address are placed once, using the union of their
    ``arg_regs``; each entry lists the others in ``aliases`` -- attach once
    per address.
    """
    path = os.path.realpath(elf_path)
    functions = {n: ([r] if isinstance(r, str) else list(r)) for n, r in functions.items()}
    with open(path, "rb") as f:
        return _place_probes(f, path, functions, max_insns, preserve_stack)


def _place_probes(f, path, functions, max_insns, preserve_stack) -> Dict[str, SymbolPlacement]:
    st = os.fstat(f.fileno())
    fkey = (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    wanted = frozenset(functions)
    with _cache_lock:
        cached = _elf_cache.get(path)
    info = None
    prev_names: frozenset = frozenset()
    if cached is not None and cached[0][0] == fkey:
        prev_names = cached[0][1]
        if wanted <= prev_names:  # the cached parse covers only the names asked for then
            info = cached[1]
    if info is None:
        all_names = wanted | prev_names
        info = elf.function_symbols(f, path, all_names)
        with _cache_lock:
            _elf_cache[path] = ((fkey, all_names), info)

    chosen: Dict[str, Tuple[int, int, int]] = {}  # name -> (vaddr, size, file_off)
    avail: Dict[str, int] = {}
    for name in functions:
        cands = info.symbols.get(name)
        if not cands:
            continue
        value, size, _bind, _hidden, _kind = _pick(cands)
        fo = _file_offset(info.loads, value)
        if fo is None:
            continue
        chosen[name] = (value, size, fo[0])
        avail[name] = fo[1]

    by_addr: Dict[int, List[str]] = {}
    for name, (value, _s, _o) in chosen.items():
        by_addr.setdefault(value, []).append(name)

    result: Dict[str, SymbolPlacement] = {}
    for value, names in by_addr.items():
        size = max(chosen[n][1] for n in names)
        file_off = chosen[names[0]][2]
        regs = tuple(sorted({full_register(r) for n in names for r in functions[n]}))
        pkey = (fkey, value, size, regs, max_insns, preserve_stack)
        with _cache_lock:
            placement = _placement_cache.get(pkey)
        if placement is None:
            nbytes = min(size if size else 15 * max_insns, avail[names[0]])
            f.seek(file_off)
            code = f.read(nbytes)
            placement = choose_entry_offset(
                code,
                value,
                regs,
                max_insns=max_insns,
                function_end=(value + size) if size else None,
                preserve_stack=preserve_stack,
            )
            with _cache_lock:
                _placement_cache[pkey] = placement
        for n in names:
            result[n] = SymbolPlacement(
                name=n,
                address=value,
                file_offset=file_off,
                size=chosen[n][1],
                placement=placement,
                aliases=tuple(sorted(m for m in names if m != n)),
            )
    return {n: result[n] for n in functions if n in result}
