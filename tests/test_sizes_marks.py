"""Unit tests (no root): size parsing, the leak_budget marker, budgets."""

import math

import pytest
from hypothesis import given, strategies as st

from pytest_memleak_ebpf.marks import Budget, MarkerError, budget_from_marker
from pytest_memleak_ebpf.report import budget_text
from pytest_memleak_ebpf.sizes import SizeError, format_bytes, parse_count, parse_size

DEFAULT = Budget(bytes=0, blocks=None, source="option")


@pytest.mark.parametrize("text, expected", [
    (0, 0), (4096, 4096), ("0", 0), ("17", 17), ("17 B", 17), ("17B", 17),
    ("4 KiB", 4096), ("4KiB", 4096), ("4 kB", 4000), ("4 KB", 4000),
    ("1.5 MiB", 1572864), ("1 MB", 1_000_000), ("2 GiB", 2 * 1024**3), ("1 GB", 10**9),
    (" 3 KiB ", 3072), ("0.5 KiB", 512), (".5 KiB", 512), (2.0, 2),
])
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad, fragment", [
    (-1, "negative"), ("-1", "not a size"), ("4 kb", "unknown unit"), ("4 XiB", "unknown unit"),
    ("", "not a size"), ("KiB", "not a size"), ("1.5 B", "whole number"), ("0.1 KiB", "whole number"),
    (True, "not a size"), (None, "not a size"), ([4], "not a size"), (float("nan"), "whole number"),
    (float("inf"), "whole number"), (2**63, "too large"), ("9999999999 GiB", "too large"),
    ("1e3", "not a size"), ("4 K iB", "not a size"),
])
def test_parse_size_rejects_with_the_value_named(bad, fragment):
    with pytest.raises(SizeError) as exc:
        parse_size(bad)
    assert fragment in str(exc.value)
    assert repr(bad)[:20] in str(exc.value) or fragment == "whole number"


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_parse_size_roundtrips_ints(n):
    assert parse_size(n) == n
    assert parse_size(str(n)) == n
    assert parse_size(f"{n} B") == n


@given(st.one_of(st.text(max_size=30), st.floats(allow_nan=True), st.integers(), st.none(), st.binary(max_size=8)))
def test_parse_size_never_raises_anything_but_size_error(value):
    try:
        n = parse_size(value)
    except SizeError as exc:
        assert str(exc)
    else:
        assert isinstance(n, int) and 0 <= n < 2**63


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["KiB", "MiB", "kB", "MB"]))
def test_units_scale_exactly(n, unit):
    factor = {"KiB": 1024, "MiB": 1024**2, "kB": 1000, "MB": 1000**2}[unit]
    assert parse_size(f"{n} {unit}") == n * factor


def test_format_bytes_has_separators():
    assert format_bytes(4321) == "4,321 B"
    assert format_bytes(0) == "0 B"


def test_parse_count():
    assert parse_count(3) == 3
    assert parse_count("12") == 12
    for bad in (-1, "x", 1.5, True, None):
        with pytest.raises(SizeError):
            parse_count(bad)


def test_marker_limits():
    assert budget_from_marker(("4 KiB",), {}, DEFAULT) == Budget(4096, None, True, "marker")
    assert budget_from_marker((100,), {"blocks": 2}, DEFAULT) == Budget(100, 2, True, "marker")
    off = budget_from_marker((None,), {}, DEFAULT)
    assert not off.checked and not off.exceeded_by(10**9, 10**6)
    blocks_only = budget_from_marker((), {"blocks": 0}, DEFAULT)
    assert blocks_only.exceeded_by(0, 1) and not blocks_only.exceeded_by(10**6, 0)


@pytest.mark.parametrize("args, kwargs, fragment", [
    ((), {}, "needs a limit"),
    (("4 KiB", 1), {}, "one positional argument"),
    (("lots",), {}, "'lots'"),
    ((-5,), {}, "negative"),
    ((1,), {"bloks": 1}, "unknown keyword"),
    ((1,), {"blocks": -1}, "blocks=-1"),
    ((1,), {"blocks": "many"}, "'many'"),
    ((float("nan"),), {}, "nan"),
])
def test_bad_markers_name_the_value(args, kwargs, fragment):
    with pytest.raises(MarkerError) as exc:
        budget_from_marker(args, kwargs, DEFAULT)
    assert fragment in str(exc.value)


@given(st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=10), st.floats()), max_size=3),
       st.dictionaries(st.sampled_from(["blocks", "bytes", "x"]), st.one_of(st.none(), st.integers(), st.text(max_size=5)), max_size=2))
def test_marker_parser_total(args, kwargs):
    try:
        b = budget_from_marker(tuple(args), kwargs, DEFAULT)
    except MarkerError as exc:
        assert str(exc).startswith("leak_budget")
    else:
        assert b.source == "marker"


def test_budget_verdicts():
    b = Budget(bytes=100, blocks=None)
    assert not b.exceeded_by(100, 50) and b.exceeded_by(101, 1)
    assert budget_text(Budget(0, None)) == "budget 0 B"


@given(st.one_of(st.text(max_size=12), st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                 st.none(), st.booleans()))
def test_parse_seconds_total(value):
    from pytest_memleak_ebpf.sizes import parse_seconds

    try:
        s = parse_seconds(value)
    except SizeError as exc:
        assert repr(value)[:10] in str(exc)
    else:
        assert 0 <= s <= 3600 and math.isfinite(s)


@given(st.lists(st.one_of(st.text(max_size=8), st.integers(), st.none()), max_size=3))
def test_marker_suppress_argument_total(value):
    try:
        b = budget_from_marker((0,), {"suppress": value}, DEFAULT)
    except MarkerError as exc:
        assert "suppress=" in str(exc)
    else:
        assert all(isinstance(p, str) for p in b.suppress)


@pytest.mark.parametrize("kw, fragment", [
    ({"warmup": -1}, "negative"), ({"repeat": 0}, "must be from 1"), ({"repeat": 10**6}, "must be from 1"),
    ({"warmup": "x"}, "'x'"), ({"suppress": 5}, "expected a list"), ({"suppress": ["leak:"]}, "suppress="),
])
def test_bad_growth_and_suppress_arguments(kw, fragment):
    with pytest.raises(MarkerError) as exc:
        budget_from_marker((0,), kw, DEFAULT)
    assert fragment in str(exc.value)


def test_growth_defaults():
    b = budget_from_marker((0,), {"repeat": 5}, DEFAULT)
    assert (b.warmup, b.repeat, b.growth) == (1, 5, True)
    assert not budget_from_marker((0,), {}, DEFAULT).growth
