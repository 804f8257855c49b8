"""Tests for kvext, the C extension module (ext/kvext.c).

These leaks happen inside the pytest process itself, not in a child process.
`pytest --ebpf-leaks` reruns pytest with PYTHONMALLOC=malloc, so Python objects
go through malloc too. A test's in-process leaks are the malloc blocks it
allocates during its call phase and still holds at the end (after gc.collect()).
By default only blocks whose stack passes through an extension module count.
The figures in the comments are exact: CPython 3.11 on x86-64, with
PYTHONMALLOC=malloc, checked with valgrind (see README.md).

All of them pass: the two leaks stay within their budgets, and cached_lookup's
first-call table is absorbed by the warm-up run (growth mode) or by a budget.
Without --ebpf-leaks the markers are ignored and only the behaviour is tested.

Keep the strings passed to kvext ASCII. For a non-ASCII str constant,
PyArg_ParseTuple's "s#" caches a UTF-8 copy on the str object the first time.
That copy is allocated from inside kvext and lives as long as the constant.
"""
import kvext  # built into build/ by `make` (conftest.py puts build/ on sys.path)
import pytest


# --- clean: the default budget of 0 bytes ------------------------------------

def parse_error(text):
    """The ValueError message parse_pairs(text) raises, or None.

    A plain try/except, not pytest.raises: the exception and its message are
    freed as soon as the except block ends. pytest.raises itself leaves a small
    block behind per use (and re's pattern cache with match=). That would only
    show with --ebpf-leaks-in-process=all, but this test stays at 0 B there too."""
    try:
        kvext.parse_pairs(text)
    except ValueError as exc:
        return str(exc)
    return None


def test_parse_pairs():
    assert kvext.parse_pairs("a=1;b=2") == {"a": "1", "b": "2"}
    assert kvext.parse_pairs(" host = db.internal ; port=5432;; ") == {
        "host": "db.internal", "port": "5432"}
    assert kvext.parse_pairs("a=1;a=2") == {"a": "2"}      # a later duplicate wins
    assert kvext.parse_pairs("") == {}
    # The error paths are clean too.
    assert parse_error("host=x;port") == "parse_pairs: missing '=' in item 'port'"
    assert parse_error("=5") == "parse_pairs: empty key"
    assert parse_error("a=1") is None


# --- deliberate leaks, accepted within a budget ------------------------------

@pytest.mark.leak_budget("1 KiB")
def test_leaky_copy_truncates_to_its_buffer():
    """leaky_copy() never frees its malloc(256) buffer: 1 block of 256 B per call.
    Three calls leak exactly 768 B in 3 blocks, within the 1 KiB budget."""
    assert kvext.leaky_copy("server.port") == "server.port"
    assert kvext.leaky_copy("") == ""
    assert kvext.leaky_copy("x" * 1000) == "x" * 255       # truncated to the buffer


@pytest.mark.leak_budget("1 KiB")
def test_leaky_tuple_records():
    """leaky_tuple(n) Py_INCREFs each record before PyTuple_SET_ITEM (which steals
    the reference), so all n records outlive the tuple. Each record is a 100-byte
    bytes object: one malloc of 32 + 100 + 1 = 133 B. leaky_tuple(5) leaks
    exactly 665 B in 5 blocks, within the 1 KiB budget. The tuple itself is freed."""
    records = kvext.leaky_tuple(5)
    assert len(records) == 5
    assert all(r == bytes([i]) * kvext.RECORD_SIZE for i, r in enumerate(records))
    del records
    assert kvext.leaky_tuple(0) == ()                       # n = 0 leaks nothing


# --- a first-call cache: not a leak ------------------------------------------

@pytest.mark.leak_budget(0, warmup=1, repeat=3)
def test_cached_lookup_growth_mode():
    """The first cached_lookup() call in the process builds a 512 B table
    (calloc(32, 16), 1 block) and keeps it forever. In growth mode the body runs
    1 + 3 times, and only what keeps growing from one repetition to the next
    counts. The table is built in the warm-up run (or earlier) and never grows
    again, so the test passes with a budget of 0."""
    assert kvext.cached_lookup("http") == 80
    assert kvext.cached_lookup("postgres") == 5432
    assert kvext.cached_lookup("memcached") == 11211
    assert kvext.cached_lookup("gopher") is None


@pytest.mark.leak_budget(kvext.TABLE_BYTES)
def test_cached_lookup_within_budget():
    """The other way to accept the cache: a budget of exactly its size (512 B).
    The test leaks 512 B in 1 block if it runs first, and 0 B if the table
    already exists."""
    assert kvext.cached_lookup("ssh") == 22
    assert kvext.cached_lookup("") is None
