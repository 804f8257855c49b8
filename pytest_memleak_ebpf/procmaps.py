"""/proc/PID/maps: the one parser of a process's memory map.

parse_regions / read_regions: every mapping with its permissions, device and
inode (leak kinds: the roots of a scan, the allocator's memory); read_maps:
the file mappings only, as (start, end, offset, path) (symbolization)."""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ["Mapping", "Region", "parse_regions", "read_regions", "read_maps", "locate"]


class Mapping(NamedTuple):
    start: int
    end: int
    offset: int     # file offset of `start`
    path: str


class Region(NamedTuple):
    """One line of /proc/PID/maps (a NamedTuple: a scan parses a few dozen
    per stopped process, and a frozen dataclass's __init__ costs 5x more)."""

    start: int
    end: int
    perms: str  # e.g. "rw-p"
    offset: int
    dev: str  # "fd:01"
    inode: int
    path: str  # "" for anonymous; "[heap]", "[stack]", ...

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def file_backed(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")

    def __contains__(self, addr: int) -> bool:
        return self.start <= addr < self.end


def parse_regions(text: str) -> list[Region]:
    """Every mapping of a maps text, in its order."""
    out = []
    new = tuple.__new__
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition("-")
        path = parts[5].strip() if len(parts) > 5 else ""
        out.append(new(Region, (int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), parts[3], int(parts[4]),
                                path)))
    return out


def read_regions(pid: int) -> list[Region]:
    """Every mapping of process `pid` (OSError when it is gone)."""
    fd = os.open(f"/proc/{pid}/maps", os.O_RDONLY)
    try:
        parts = []
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            parts.append(b)
    finally:
        os.close(fd)
    return parse_regions(b"".join(parts).decode("utf-8", "surrogateescape"))


def read_maps(path: str = "/proc/self/maps", *, executable: bool = True) -> list[Mapping]:
    """File mappings of a process (only the executable ones by default), in
    address order; anonymous and deleted mappings are left out. An unreadable
    file gives an empty list."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return []
    return [Mapping(r.start, r.end, r.offset, r.path) for r in parse_regions(text)
            if r.path.startswith("/") and not r.path.endswith("(deleted)") and (r.executable or not executable)]


def locate(maps, ip: int) -> tuple[str, int] | None:
    """(path, file offset) of the mapping holding `ip`, or None."""
    for start, end, off, path in maps:
        if start <= ip < end:
            return path, ip - start + off
    return None


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (``T`` stopped, ``Z`` zombie), or
    None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rindex(")") + 2]

