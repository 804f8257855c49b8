"""The exit path's frames on the main thread's stack, kept out of the roots.

A process that returns from ``main`` is paused (or, in the tests' recorder,
stopped in its last atexit handler) inside ``exit``: glibc's
``__libc_start_call_main`` called ``exit(main's result)``, and below that
call's return address lie only the frames of ``exit`` itself
(``__run_exit_handlers``, the handlers, ``_exit``). Those frames reserve
stack slots they never write, and a slot keeps whatever an earlier, deeper
call left there — typically the pointer to a block the program lost just
before returning from ``main``. memcheck never sees such a word: a slot the
stack pointer moved over is undefined until written, and its leak scan skips
undefined words. This scan cannot tell written from unwritten, so it leaves
the exit path's frames out: everything from 128 bytes below the stack
pointer (the red zone) up to the return address of ``__libc_start_call_main``'s
``call exit``. The exit path's own live words point at what globals reach
anyway (the exit handler lists, stdio).

The return address is found as memcheck would never need to: the highest
word of the stack whose value is an address in libc's code right after a
5-byte ``call rel32`` whose target is libc's ``exit``. A program that calls
``exit`` itself (its frame is live: its locals are roots), a static binary
and any libc but glibc have no such word, and nothing is left out.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..procmaps import Region

RED_ZONE = 128
_LIBC = re.compile(r"/libc(\.so\.6|-[\d.]+\.so)$")
Range = Tuple[int, int]


@functools.lru_cache(maxsize=16)
def _exit_offset(path: str, ino: int, mtime_ns: int) -> Optional[int]:
    """``exit``'s address in libc's file, relative to its load bias (None when absent)."""
    from ..elf import function_symbols

    with open(path, "rb") as f:
        syms = function_symbols(f, path, frozenset({"exit"}))
    found = syms.symbols.get("exit")
    return found[0][0] if found else None


def _libc_exit(maps: Sequence[Region]) -> Optional[Tuple[int, Sequence[Region]]]:
    """The runtime address of libc's ``exit`` and libc's code mappings."""
    libc = [m for m in maps if _LIBC.search(m.path)]
    first = next((m for m in libc if m.offset == 0), None)
    code = [m for m in libc if m.executable]
    if first is None or not code:
        return None
    path = first.path
    try:
        st = os.stat(path)
        off = _exit_offset(path, st.st_ino, st.st_mtime_ns)
    except (OSError, ValueError):
        return None
    if off is None:
        return None
    return first.start + off, code


def exit_path_hole(maps: Sequence[Region], main_sp: int, read: Callable[[int, int], bytes],
                   words: Optional[Callable[[int, int], np.ndarray]] = None,
                   read_many: Optional[Callable[[Sequence[Tuple[int, int]]], List[bytes]]] = None) -> Optional[Range]:
    """The main thread's exit path frames, ``[sp - 128, return slot)`` (see
    the module's text), or None when the process is not inside the ``exit``
    that ``__libc_start_call_main`` called. ``words(addr, n)``: the aligned
    words there as a uint64 array (else they come from ``read``);
    ``read_many(ranges)``: many ``(addr, length)`` reads at once, each
    shorter when unreadable (else one ``read`` each)."""
    found = _libc_exit(maps)
    if found is None:
        return None
    exit_addr, code = found
    stack = next((m for m in maps if m.start <= main_sp < m.end), None)
    if stack is None:
        return None
    lo = max(stack.start, (main_sp - RED_ZONE) & ~7)
    if words is not None:
        stack_words = words(lo, stack.end - lo)
    else:
        try:
            data = read(lo, stack.end - lo)
        except OSError:
            return None
        stack_words = np.frombuffer(data[:len(data) // 8 * 8], dtype=np.uint64)
    words = stack_words
    in_code = np.zeros(words.size, dtype=bool)
    for m in code:
        in_code |= (words >= np.uint64(m.start + 5)) & (words < np.uint64(m.end))
    slots = np.nonzero(in_code)[0][::-1].tolist()     # the highest slot first
    rets = words[slots].tolist() if slots else []
    # the 5 bytes before each return address, in one read when the caller can
    # (read_many: one process_vm_readv for them all)
    if read_many is not None:
        insns = read_many([(ret - 5, 5) for ret in rets])
    else:
        insns = []
        for ret in rets:
            try:
                insns.append(read(ret - 5, 5))
            except OSError:
                insns.append(b"")
    for i, ret, insn in zip(slots, rets, insns):
        if len(insn) == 5 and insn[0] == 0xE8 and ret + int.from_bytes(insn[1:], "little", signed=True) == exit_addr:
            slot = lo + 8 * int(i)
            return (lo, slot) if slot > lo else None
    return None
