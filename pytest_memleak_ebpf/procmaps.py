"""/proc/PID/maps: the one parser of a process's memory map."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Mapping", "read_maps", "locate"]


class Mapping(NamedTuple):
    start: int
    end: int
    offset: int     # file offset of `start`
    path: str


def read_maps(path: str = "/proc/self/maps", *, executable: bool = True) -> list[Mapping]:
    """File mappings of a process (only the executable ones by default), in
    address order; anonymous and deleted mappings are left out. An unreadable
    file gives an empty list."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or (executable and "x" not in parts[1]):
                    continue
                p = parts[5].strip()
                if not p.startswith("/") or p.endswith("(deleted)"):
                    continue
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append(Mapping(start, end, int(parts[2], 16), p))
    except OSError:
        pass
    return out


def locate(maps, ip: int) -> tuple[str, int] | None:
    """(path, file offset) of the mapping holding `ip`, or None."""
    for start, end, off, path in maps:
        if start <= ip < end:
            return path, ip - start + off
    return None
