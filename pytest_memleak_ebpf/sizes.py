"""Parsing and formatting of byte sizes ("4 KiB", "1.5 MiB", 4096)."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

UNITS = {
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}
MAX_SIZE = 2**63 - 1
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


class SizeError(ValueError):
    """A size that cannot be parsed; the message names what was wrong."""


def parse_size(value: object) -> int:
    """Bytes as an int from an int or a string with an optional unit.

    Accepted units: B, kB/KB (1000), KiB (1024), MB, MiB, GB, GiB. The result
    must be a whole, non-negative number of bytes below 2**63.
    """
    if isinstance(value, bool):
        raise SizeError(f"{value!r} is not a size (use an int of bytes or a string like '4 KiB')")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise SizeError(f"{value!r} is not a whole number of bytes")
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise SizeError(
                f"{value!r} is not a size (expected a number with an optional unit: "
                f"B, kB, KB, KiB, MB, MiB, GB, GiB, e.g. '4 KiB' or '1.5 MiB')"
            )
        number, unit = m.group(1), m.group(2) or "B"
        if unit not in UNITS:
            raise SizeError(
                f"{value!r} has an unknown unit {unit!r} (known: {', '.join(UNITS)})"
            )
        try:
            exact = Decimal(number) * UNITS[unit]
        except InvalidOperation:  # pragma: no cover - the regex prevents it
            raise SizeError(f"{value!r} is not a size") from None
        if exact != exact.to_integral_value():
            raise SizeError(f"{value!r} is not a whole number of bytes ({exact} B)")
        n = int(exact)
    else:
        raise SizeError(
            f"{value!r} (a {type(value).__name__}) is not a size: use an int of bytes or a string like '4 KiB'"
        )
    if n < 0:
        raise SizeError(f"{value!r} is negative")
    if n > MAX_SIZE:
        raise SizeError(f"{value!r} is too large (at most {MAX_SIZE:,} bytes)")
    return n


def parse_count(value: object) -> int:
    """A non-negative whole count (blocks)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        else:
            raise SizeError(f"{value!r} is not a whole number of blocks")
    if value < 0:
        raise SizeError(f"{value!r} is negative")
    if value > MAX_SIZE:
        raise SizeError(f"{value!r} is too large")
    return value


def format_bytes(n: int) -> str:
    """'4,321 B' — exact, with thousands separators."""
    return f"{n:,} B"


def format_blocks(n: int) -> str:
    return f"{n:,} block" + ("" if n == 1 else "s")


def human(n: int) -> str:
    """A short approximate form for tables: '1.5 MiB'."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def parse_seconds(value: object, *, maximum: float = 3600.0) -> float:
    """A finite, non-negative number of seconds up to `maximum`."""
    if isinstance(value, bool):
        raise SizeError(f"{value!r} is not a number of seconds")
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise SizeError(f"{value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0 or seconds > maximum:
        raise SizeError(f"{value!r} must be from 0 to {maximum:g} seconds")
    return seconds
