"""Frame resolution, once: the result pipeline's only stage that reads files.

A Resolver owns the session's Symbolizer (build-id frames), the pytest
process's /proc/self/maps (for the extension return addresses the BPF
program finds on in-process stacks) and the session's ONE frame cache.
Its output is plain frame dicts, the shape accounting, suppressions, the
report and the JSON use:

  {"function", "offset", "module", "file", "line", "build_id", "address"}
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from .elf import read_build_id
from .procmaps import locate, read_maps

__all__ = ["Resolver", "frame_dict"]

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
        self._cache: dict[tuple, dict] = {}

    def add_paths(self, paths: Iterable[str]) -> None:
        """Files the traced processes executed or opened (build-id candidates)."""
        for p in paths:
            self.symbolizer.add_candidate(p)

    def forget_maps(self) -> None:
        """The pytest process's mappings changed (or may have): read them again
        when an extension address is next resolved."""
        self._maps = None

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

    def stacks(self, raw: Mapping[int, Sequence[RawFrame]], hashes: Iterable[int]) -> dict[int, list[dict]]:
        """Resolved frames of the stacks `hashes` (a hash without frames in
        `raw` is left out: its stack was not captured)."""
        out = {}
        for h in hashes:
            frames = self.stack(raw.get(h) if h else None)
            if frames:
                out[h] = frames
        return out

    def extension_frame(self, ip: int) -> dict:
        """A return address into the pytest process's own code (an extension
        module), through /proc/self/maps and the module's build id."""
        if self._maps is None:
            self._maps = read_maps(self._maps_path)
        hit = locate(self._maps, ip)
        if hit is None:
            return frame_dict(address=ip)
        path, file_offset = hit
        bid = read_build_id(path)
        if bid is None:
            return frame_dict(offset=file_offset, module=path, address=ip)
        self.symbolizer.add_candidate(path)
        return self.frame(1, bid.hex(), file_offset)

    def extension_frames(self, ips: Iterable[int]) -> dict[int, dict]:
        return {ip: self.extension_frame(ip) for ip in ips}
