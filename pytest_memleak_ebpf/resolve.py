"""Frame resolution, once: the result pipeline's only stage that reads files.

A Resolver owns the session's Symbolizer (build-id frames), the pytest
process's /proc/self/maps (for the extension return addresses the BPF
program finds on in-process stacks, and to name the pytest process's own
frames: libpython's and the extensions' files are registered as symbolizer
candidates when one of its frames is unknown) and the session's ONE frame
cache. Its output is plain frame dicts, the shape accounting, suppressions,
the report and the JSON use:

  {"function", "offset", "module", "file", "line", "build_id", "address"}

A word the BPF program found on the stack is a frame only when it is a
return address: the bytes before it in the module's file decode (capstone)
to a call instruction ending exactly there (is_return_address).
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

from .elf import read_build_id
from .procmaps import locate, read_maps

__all__ = ["Resolver", "frame_dict", "is_return_address", "call_before"]

# x86-64 call encodings: rel32 is 5 bytes; call r/m (ff /2) is 2 bytes (register)
# to 7 (ModRM + SIB + disp32), 8 with a REX prefix (call *disp32(%r12)), 9 with a
# notrack/segment prefix on top.
CALL_LENGTHS = (5, 2, 3, 4, 6, 7, 8, 9)

_md = None


def _disassembler():
    global _md
    if _md is None:
        from capstone import CS_ARCH_X86, CS_MODE_64, Cs

        _md = Cs(CS_ARCH_X86, CS_MODE_64)
    return _md


def call_before(code: bytes, address: int = 0) -> str | None:
    """The call instruction that ends exactly at the end of `code` (the
    bytes just before a candidate return address `address`), as capstone
    prints it, or None: no call of any length ends there."""
    md = _disassembler()
    for n in CALL_LENGTHS:
        if n > len(code):
            continue
        insn = next(md.disasm(code[-n:], address - n, 1), None)
        if insn is not None and insn.size == n and insn.mnemonic.split()[-1] in ("call", "lcall"):
            return f"{insn.mnemonic} {insn.op_str}".strip()
    return None


def is_return_address(path: str, file_offset: int) -> bool:
    """Whether `file_offset` in the file `path` follows a call instruction.
    When the bytes cannot be read (the file is gone or shorter), it cannot be
    told: the word is kept."""
    start = max(file_offset - max(CALL_LENGTHS), 0)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            code = os.pread(fd, file_offset - start, start)
        finally:
            os.close(fd)
    except OSError:
        return True
    if len(code) < file_offset - start:
        return True   # the file is shorter than that (replaced since): nothing to check against
    return call_before(code, file_offset) is not None

RawFrame = tuple  # (status, build id hex | None, file offset or ip)


def frame_dict(function=None, offset=None, module=None, file=None, line=None, build_id=None,
               address=None) -> dict:
    return {"function": function, "offset": offset, "module": module, "file": file, "line": line,
            "build_id": build_id, "address": address}


class Resolver:
    def __init__(self, symbolizer=None, *, maps_path: str = "/proc/self/maps"):
        if symbolizer is None:
            from .symbolize import Symbolizer

            symbolizer = Symbolizer()
        self.symbolizer = symbolizer
        self._maps_path = maps_path
        self._maps = None
        self._own_registered = False    # this process's mapped files are symbolizer candidates
        self._cache: dict[tuple, dict] = {}
        self._calls: dict[tuple, bool] = {}   # (path, file offset) -> is a return address

    def add_paths(self, paths: Iterable[str]) -> None:
        """Files the traced processes executed or opened (build-id candidates)."""
        for p in paths:
            self.symbolizer.add_candidate(p)

    def forget_maps(self) -> None:
        """The pytest process's mappings changed (or may have): read them again
        when an extension address or an unknown frame of it is next resolved."""
        self._maps = None
        self._own_registered = False

    def _own_maps(self):
        if self._maps is None:
            self._maps = read_maps(self._maps_path)
        return self._maps

    def register_own_maps(self) -> None:
        """Every file this process maps executable (the interpreter,
        libpython, extension modules, libraries loaded with ctypes) as a
        symbolizer candidate: its build id is read only when an unknown build
        id is asked for."""
        for m in self._own_maps():
            self.symbolizer.add_candidate(m.path)
        self._own_registered = True

    # -- frames -----------------------------------------------------------------

    def frame(self, status: int, build_id: str | None, off: int) -> dict:
        """One raw frame (status, build id hex or None, file offset or raw ip)."""
        key = (status, build_id, off)
        f = self._cache.get(key)
        if f is None:
            if build_id is not None:
                fr = self.symbolizer.resolve(bytes.fromhex(build_id), off)
            else:
                fr = self.symbolizer.resolve_raw_ip(off)
            f = frame_dict(fr.function, fr.offset, fr.module, fr.file, fr.line, build_id, off)
            if f["function"] is not None or f["module"] is not None:
                if len(self._cache) > 200_000:
                    self._cache.clear()
                self._cache[key] = f  # unknown frames may resolve once more modules are seen
        return dict(f)

    def stack(self, raw: Sequence[RawFrame] | None) -> list[dict]:
        """Resolved frames of one raw stack (empty: not captured)."""
        return [self.frame(st, bid, off) for st, bid, off in raw] if raw else []

    def own_stack(self, raw: Sequence[RawFrame] | None) -> list[dict]:
        """Resolved frames of a stack of this process (the pytest process's
        in-process blocks): when a build-id frame is unknown, this process's
        mapped files are registered as candidates (once per change of its
        mappings) and the unknown frames resolved again."""
        frames = self.stack(raw)
        if not self._own_registered and any(f["module"] is None and f["build_id"] for f in frames):
            self.register_own_maps()
            frames = [self.frame(st, bid, off) if f["module"] is None and bid else f
                      for f, (st, bid, off) in zip(frames, raw)]
        return frames

    def stacks(self, raw: Mapping[int, Sequence[RawFrame]], hashes: Iterable[int]) -> dict[int, list[dict]]:
        """Resolved frames of the stacks `hashes` (a hash without frames in
        `raw` is left out: its stack was not captured)."""
        out = {}
        for h in hashes:
            frames = self.stack(raw.get(h) if h else None)
            if frames:
                out[h] = frames
        return out

    def extension_frame(self, ip: int) -> dict | None:
        """A word found on the pytest process's stack that points into an
        extension module's code, through /proc/self/maps and the module's
        build id; None when it is not a return address (a function pointer,
        an address inside code no call returns to)."""
        hit = locate(self._own_maps(), ip)
        if hit is None:
            return frame_dict(address=ip)
        path, file_offset = hit
        key = (path, file_offset)
        real = self._calls.get(key)
        if real is None:
            if len(self._calls) > 100_000:
                self._calls.clear()
            real = self._calls[key] = is_return_address(path, file_offset)
        if not real:
            return None
        bid = read_build_id(path)
        if bid is None:
            return frame_dict(offset=file_offset, module=path, address=ip)
        self.symbolizer.add_candidate(path)
        return self.frame(1, bid.hex(), file_offset)

    def extension_frames(self, ips: Iterable[int]) -> dict[int, dict | None]:
        return {ip: self.extension_frame(ip) for ip in ips}
