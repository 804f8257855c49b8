"""The `leak_budget` marker: one pure function turning a marker (or the
session default) into a Budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .classify import DEFAULT_KINDS, parse_kinds, wants_kinds
from .sizes import SizeError, parse_count, parse_size

MARKER = "leak_budget"
MARKER_HELP = (
    "leak_budget(limit, *, blocks=None, warmup=None, repeat=None, suppress=None): fail the test (with --ebpf-leaks) "
    "when it leaks more than `limit` bytes (an int, or a string such as '4 KiB', '1.5 MiB'), or more "
    "than `blocks` blocks, in the processes it launches and (C extensions) in the pytest process; "
    "leak_budget(None) turns the check off for the test; warmup=N, repeat=M run the test body N+M times "
    "and count only in-process memory that keeps growing per repetition; suppress=['leak:pattern', ...] "
    "adds LSan-style suppressions for the test; kinds='definite,indirect' says which leak kinds count "
    "(definite, indirect, possible, reachable, unclassified, or all: every outstanding block; default "
    "definite,indirect,unclassified)."
)
KNOWN_KEYWORDS = ("blocks", "warmup", "repeat", "suppress", "kinds")
MAX_REPETITIONS = 10_000


class MarkerError(ValueError):
    """A bad leak_budget marker; the message names the problem and the value."""


@dataclass(frozen=True)
class Budget:
    bytes: int | None          # None: no byte limit
    blocks: int | None         # None: no block limit
    checked: bool = True       # False: leak_budget(None) — report, never fail
    source: str = "default"    # "marker" | "option" | "ini" | "default"
    warmup: int | None = None  # growth mode: runs before measuring
    repeat: int | None = None  # growth mode: measured runs (None: growth mode off)
    suppress: tuple = ()       # marker's own LSan-style suppressions ("leak:pattern" or "pattern")
    suppressions: tuple = ()   # the same, parsed (suppressions.Suppression, source "marker")
    kinds: frozenset = DEFAULT_KINDS   # leak kinds that count (classify.KINDS; all of them: no classification)

    @property
    def classify(self) -> bool:
        """The test's processes are paused at exit and their blocks classified."""
        return wants_kinds(self.kinds)

    @property
    def growth(self) -> bool:
        return self.repeat is not None

    def exceeded_by(self, leaked_bytes: int, leaked_blocks: int) -> bool:
        if not self.checked:
            return False
        if self.bytes is not None and leaked_bytes > self.bytes:
            return True
        if self.blocks is not None and leaked_blocks > self.blocks:
            return True
        return False


def budget_from_marker(args: Sequence[Any], kwargs: Mapping[str, Any], default: Budget) -> Budget:
    """Budget for a test carrying `@pytest.mark.leak_budget(*args, **kwargs)`."""
    unknown = sorted(set(kwargs) - set(KNOWN_KEYWORDS))
    if unknown:
        raise MarkerError(
            f"leak_budget got unknown keyword argument(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(KNOWN_KEYWORDS)})"
        )
    if len(args) > 1:
        raise MarkerError(f"leak_budget takes one positional argument (the limit), got {len(args)}: {tuple(args)!r}")
    if not args and "blocks" not in kwargs:
        raise MarkerError("leak_budget needs a limit: leak_budget('4 KiB'), leak_budget(0), or leak_budget(None)")
    warmup, repeat = _growth(kwargs, default)
    blocks = None
    if kwargs.get("blocks") is not None:
        try:
            blocks = parse_count(kwargs["blocks"])
        except SizeError as exc:
            raise MarkerError(f"leak_budget(blocks={kwargs['blocks']!r}): {exc}") from None
    suppress, parsed = _suppress(kwargs.get("suppress"))
    kinds = default.kinds
    if kwargs.get("kinds") is not None:
        try:
            kinds = parse_kinds(kwargs["kinds"])
        except ValueError as exc:
            raise MarkerError(f"leak_budget(kinds={kwargs['kinds']!r}): {exc}") from None
    g = {"warmup": warmup, "repeat": repeat, "suppress": suppress, "suppressions": parsed, "kinds": kinds}
    if not args:
        return Budget(bytes=None, blocks=blocks, checked=True, source="marker", **g)
    limit = args[0]
    if limit is None:
        if blocks is not None:
            return Budget(bytes=None, blocks=blocks, checked=True, source="marker", **g)
        return Budget(bytes=None, blocks=None, checked=False, source="marker", **g)
    try:
        nbytes = parse_size(limit)
    except SizeError as exc:
        raise MarkerError(f"leak_budget({limit!r}): {exc}") from None
    return Budget(bytes=nbytes, blocks=blocks, checked=True, source="marker", **g)


def _suppress(value: Any) -> tuple[tuple, tuple]:
    """The marker's patterns and their parsed Suppression objects."""
    if value is None:
        return (), ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise MarkerError(f"leak_budget(suppress={value!r}): expected a list of patterns such as ['leak:my_cache_init']")
    from .suppressions import SuppressionError, from_patterns

    try:
        parsed = from_patterns(value, source="marker")
    except SuppressionError as exc:
        raise MarkerError(f"leak_budget(suppress={value!r}): {exc}") from None
    return tuple(value), tuple(parsed)


def _growth(kwargs: Mapping[str, Any], default: Budget) -> tuple[int | None, int | None]:
    """(warmup, repeat) from the marker, falling back to the session default."""
    if kwargs.get("warmup") is None and kwargs.get("repeat") is None:
        return default.warmup, default.repeat
    values = {}
    for name, minimum, fallback in (("warmup", 0, 1), ("repeat", 1, 3)):
        v = kwargs.get(name)
        if v is None:
            values[name] = fallback
            continue
        try:
            n = parse_count(v)
        except SizeError as exc:
            raise MarkerError(f"leak_budget({name}={v!r}): {exc}") from None
        if n < minimum or n > MAX_REPETITIONS:
            raise MarkerError(f"leak_budget({name}={v!r}): must be from {minimum} to {MAX_REPETITIONS}")
        values[name] = n
    return values["warmup"], values["repeat"]


def resolve_budget(marker: Any | None, default: Budget) -> Budget:
    """`marker` is the closest pytest Mark (or None)."""
    if marker is None:
        return default
    return budget_from_marker(marker.args, marker.kwargs, default)
