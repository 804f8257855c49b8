"""The plugin's command-line and ini options, each value validated where it
is parsed: command-line values by their argparse ``type=`` (a bad value is
pytest's usage error naming the option and the value), ini values when read
(a UsageError naming the ini key and the value). A command-line option left
unset (None) falls back to its ini key."""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import pytest

from .classify import DEFAULT_KINDS, parse_kinds
from .marks import MAX_REPETITIONS, Budget
from .sizes import parse_count, parse_seconds, parse_size

INCOMPLETE_CHOICES = ("error", "warn")
IN_PROCESS_CHOICES = ("extensions", "all", "off")
SCOPE_CHOICES = ("call", "test")
MIN_CAPACITY, MAX_CAPACITY = 16, 1 << 26
DEFAULT_MAX_BLOCKS = 1 << 20
DEFAULT_MAX_STACKS = 1 << 15
DEFAULT_MAX_PROCESSES = 1 << 15
DEFAULT_WARMUP, DEFAULT_REPEAT = 1, 3


class OptionValueError(ValueError):
    """A bad option value; the message names the value (the caller adds the option)."""


# -- parsing: text -> value, raising ValueError (SizeError, OptionValueError) --

def capacity(text: str) -> int:
    n = parse_count(text)
    if n < MIN_CAPACITY or n > MAX_CAPACITY:
        raise OptionValueError(f"{text!r} is out of range ({MIN_CAPACITY} to {MAX_CAPACITY})")
    return n


def choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise OptionValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    parse.__name__ = "choice"
    return parse


def warmup(text: str) -> int:
    n = parse_count(text)
    if n > MAX_REPETITIONS:
        raise OptionValueError(f"{text!r} is out of range")
    return n


def repeat(text: str) -> int:
    n = parse_count(text)
    if not 1 <= n <= MAX_REPETITIONS:
        raise OptionValueError(f"{text!r} is out of range")
    return n


def leak_kinds(text: str) -> frozenset:
    return parse_kinds(text)


def json_path(text: str) -> str:
    d = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise OptionValueError(f"cannot write {text!r} (directory {d!r} is missing or not writable)")
    return text


def flamegraph_dir(text: str) -> str:
    if os.path.exists(text) and not os.path.isdir(text):
        raise OptionValueError(f"{text!r} exists and is not a directory")
    return text


def suppression_file(text: str) -> str:
    load_suppressions([text])
    return text


def load_suppressions(paths) -> list:
    """The Suppressions in `paths` (SuppressionError, a ValueError, names the file and line)."""
    from .suppressions import load_suppression_files

    return list(load_suppression_files(paths))


# each valued option (its dest, and its ini key): how its text is parsed, and
# its value when unset (also what an empty value on the command line means).
# ebpf_leaks_suppressions is a list: each file given is checked; its ini key is pytest's "paths".
PARSERS: dict[str, tuple[Callable[[str], Any], Any]] = {
    "ebpf_leaks_budget": (parse_size, 0),
    "ebpf_leaks_json": (json_path, ""),
    "ebpf_leaks_max_blocks": (capacity, DEFAULT_MAX_BLOCKS),
    "ebpf_leaks_max_stacks": (capacity, DEFAULT_MAX_STACKS),
    "ebpf_leaks_max_processes": (capacity, DEFAULT_MAX_PROCESSES),
    "ebpf_leaks_on_incomplete": (choice(*INCOMPLETE_CHOICES), "error"),
    "ebpf_leaks_in_process": (choice(*IN_PROCESS_CHOICES), "extensions"),
    "ebpf_leaks_in_process_scope": (choice(*SCOPE_CHOICES), "call"),
    "ebpf_leaks_flamegraph": (flamegraph_dir, ""),
    "ebpf_leaks_wait": (parse_seconds, 0.0),
    "ebpf_leaks_warmup": (warmup, None),
    "ebpf_leaks_repeat": (repeat, None),
    "ebpf_leaks_suppressions": (suppression_file, ""),
    "ebpf_leaks_kinds": (leak_kinds, DEFAULT_KINDS),
}


def _cli(key: str) -> Callable[[str], Any]:
    """argparse ``type=`` of option `key`: a ValueError of its parser becomes
    argparse's usage error (argparse names the option)."""
    parse, default = PARSERS[key]

    def convert(text: str) -> Any:
        if text == "":
            return default
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


# -- registration --------------------------------------------------------

def _valued(group, flag: str, metavar: str, **kwargs) -> None:
    """A command-line option taking a value, parsed by PARSERS[its dest]."""
    group.addoption(flag, metavar=metavar, default=None, type=_cli(flag[2:].replace("-", "_")), **kwargs)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("ebpf-leaks", "leak checking with eBPF (pytest-memleak-ebpf)")
    group.addoption("--ebpf-leaks", action="store_true", default=None,
                    help="check the processes each test launches for leaked malloc-family memory (needs root)")
    _valued(group, "--ebpf-leaks-budget", "SIZE",
            help="leak budget of tests without a leak_budget marker, e.g. 0, 4096, '4 KiB' (default 0)")
    _valued(group, "--ebpf-leaks-kinds", "LIST",
            help="which leak kinds count against the budget, as valgrind names them: definite, indirect, "
                 "possible, reachable, unclassified, or all (every outstanding block, no classification); "
                 "default definite,indirect,unclassified")
    _valued(group, "--ebpf-leaks-json", "PATH",
            help="write a JSON leak report (schema version 1) to PATH")
    _valued(group, "--ebpf-leaks-max-blocks", "N",
            help="capacity of the live-block map (default 1048576)")
    _valued(group, "--ebpf-leaks-max-stacks", "N",
            help="capacity of the stack map (default 32768)")
    _valued(group, "--ebpf-leaks-max-processes", "N",
            help="how many processes can be tracked at once (default 32768)")
    _valued(group, "--ebpf-leaks-on-incomplete", "error|warn",
            help="when tracking was incomplete (a map filled up): fail the test (error, default) or warn")
    _valued(group, "--ebpf-leaks-in-process", "extensions|all|off",
            help="check the pytest process's own allocations during each test's call: only those whose "
                 "stack passes through an extension module (extensions, default), all, or off")
    _valued(group, "--ebpf-leaks-suppressions", "FILE", action="append",
            help="LSan-style suppression file (leak:<pattern> lines); may be given several times")
    group.addoption("--ebpf-leaks-in-process-kinds", action="store_true", default=None,
                    help="classify the pytest process's own window's blocks too (scan its memory at the "
                         "window's end): caches kept reachable no longer count; figures may move (README)")
    group.addoption("--ebpf-leaks-no-in-process-kinds", action="store_true", default=None,
                    help="do not classify the in-process window's blocks, whatever the ini file says")
    group.addoption("--ebpf-leaks-no-default-suppressions", action="store_true", default=None,
                    help="do not suppress the memory glibc, ld.so and libstdc++ keep on purpose until exit")
    group.addoption("--ebpf-leaks-gen-suppressions", action="store_true", default=None,
                    help="print ready-to-paste suppressions for every leaking stack at the end of the run")
    _valued(group, "--ebpf-leaks-flamegraph", "DIR",
            help="write folded stacks and an SVG flame graph of leaked bytes per failing test into DIR")
    _valued(group, "--ebpf-leaks-wait", "SECONDS",
            help="at the end of a test, wait up to SECONDS for the processes it launched to exit")
    _valued(group, "--ebpf-leaks-in-process-scope", "call|test",
            help="in-process window: the test call (default), or the whole test with setup and teardown "
                 "(in-process leaks then fail the test at teardown)")
    _valued(group, "--ebpf-leaks-warmup", "N",
            help="growth mode for all tests: run the test body N times before measuring")
    _valued(group, "--ebpf-leaks-repeat", "M",
            help="growth mode for all tests: measure M repetitions, count only what keeps growing")
    parser.addini("ebpf_leaks", type="bool", default=False, help="enable --ebpf-leaks")
    parser.addini("ebpf_leaks_budget", default="0", help="default leak budget (size)")
    parser.addini("ebpf_leaks_kinds", default="", help="leak kinds that count (default definite,indirect,unclassified)")
    parser.addini("ebpf_leaks_json", default="", help="JSON leak report path")
    parser.addini("ebpf_leaks_max_blocks", default="", help="live-block map capacity")
    parser.addini("ebpf_leaks_max_stacks", default="", help="stack map capacity")
    parser.addini("ebpf_leaks_max_processes", default="", help="process map capacity")
    parser.addini("ebpf_leaks_on_incomplete", default="error", help="error|warn")
    parser.addini("ebpf_leaks_in_process", default="extensions", help="extensions|all|off")
    parser.addini("ebpf_leaks_in_process_kinds", type="bool", default=False,
                  help="classify the pytest process's own window's blocks too (default false)")
    parser.addini("ebpf_leaks_suppressions", type="paths", default=[], help="suppression files")
    parser.addini("ebpf_leaks_default_suppressions", type="bool", default=True,
                  help="suppress memory glibc/ld.so/libstdc++ keep until exit (default true)")
    parser.addini("ebpf_leaks_flamegraph", default="", help="flame graph directory")
    parser.addini("ebpf_leaks_wait", default="", help="seconds to wait for a test's processes to exit")
    parser.addini("ebpf_leaks_in_process_scope", default="call", help="call|test")
    parser.addini("ebpf_leaks_warmup", default="", help="growth mode warmup runs")
    parser.addini("ebpf_leaks_repeat", default="", help="growth mode measured runs")


# -- reading -------------------------------------------------------------

def _ini(config: pytest.Config, key: str) -> Any:
    """config.getini(key); a bool key's bad value is a UsageError naming it."""
    try:
        return config.getini(key)
    except (pytest.UsageError, ValueError) as exc:  # a bool's "invalid truth value 'maybe'"
        raise pytest.UsageError(f"ini option {key}: {exc}") from None


def _value(config: pytest.Config, key: str) -> Any:
    """Option `key` (e.g. "ebpf_leaks_budget"): the command line's parsed value,
    else the ini value parsed here, else its default."""
    value = config.getoption(key)
    if value is not None:
        return value
    parse, default = PARSERS[key]
    text = _ini(config, key)
    if text == "":
        return default
    try:
        return parse(text)
    except ValueError as exc:
        raise pytest.UsageError(f"ini option {key}: {exc}") from None


def enabled(config: pytest.Config) -> bool:
    value = config.getoption("ebpf_leaks")
    if value is not None:
        return bool(value)
    return bool(_ini(config, "ebpf_leaks"))


def _growth(config: pytest.Config) -> dict:
    """{"warmup": N, "repeat": M} when either option is set (the other takes its default), else {}."""
    w = _value(config, "ebpf_leaks_warmup")
    r = _value(config, "ebpf_leaks_repeat")
    if w is None and r is None:
        return {}
    return {"warmup": DEFAULT_WARMUP if w is None else w, "repeat": DEFAULT_REPEAT if r is None else r}


def _suppressions(config: pytest.Config) -> list:
    from .suppressions import DEFAULT_SUPPRESSIONS, SuppressionError

    files, where = config.getoption("ebpf_leaks_suppressions"), "--ebpf-leaks-suppressions"
    if not files:
        files, where = [str(p) for p in _ini(config, "ebpf_leaks_suppressions")], "ini option ebpf_leaks_suppressions"
    try:
        sups = load_suppressions(files)
    except SuppressionError as exc:
        raise pytest.UsageError(f"{where}: {exc}") from None
    no_defaults = config.getoption("ebpf_leaks_no_default_suppressions")
    if no_defaults is None:
        no_defaults = not _ini(config, "ebpf_leaks_default_suppressions")
    return sups if no_defaults else list(DEFAULT_SUPPRESSIONS) + sups


def _in_process_kinds(config: pytest.Config) -> bool:
    """--ebpf-leaks-in-process-kinds, else not --ebpf-leaks-no-in-process-kinds
    and the ini's (default false); both options: a usage error."""
    on, off = config.getoption("ebpf_leaks_in_process_kinds"), config.getoption("ebpf_leaks_no_in_process_kinds")
    if on and off:
        raise pytest.UsageError("--ebpf-leaks-in-process-kinds and --ebpf-leaks-no-in-process-kinds contradict "
                                "each other: give one of them")
    if off:
        return False
    return _flag(config, "ebpf_leaks_in_process_kinds")


def _flag(config: pytest.Config, name: str) -> bool:
    """A store_true option (None when not given) falling back to its bool ini."""
    given = config.getoption(name)
    return bool(_ini(config, name)) if given is None else bool(given)


def read_settings(config: pytest.Config):
    """The session's engine Settings from the command line and the ini file."""
    from .engine import Settings

    growth = _growth(config)
    return Settings(
        default_budget=Budget(bytes=_value(config, "ebpf_leaks_budget"), blocks=None,
                              checked=True, source="option",
                              warmup=growth.get("warmup"), repeat=growth.get("repeat"),
                              kinds=_value(config, "ebpf_leaks_kinds")),
        in_process=_value(config, "ebpf_leaks_in_process"),
        in_process_scope=_value(config, "ebpf_leaks_in_process_scope"),
        in_process_kinds=_in_process_kinds(config),
        suppressions=tuple(_suppressions(config)),
        wait=_value(config, "ebpf_leaks_wait"),
        flamegraph_dir=_value(config, "ebpf_leaks_flamegraph") or None,
        json_path=_value(config, "ebpf_leaks_json") or None,
        max_blocks=_value(config, "ebpf_leaks_max_blocks"),
        max_stacks=_value(config, "ebpf_leaks_max_stacks"),
        max_processes=_value(config, "ebpf_leaks_max_processes"),
        on_incomplete=_value(config, "ebpf_leaks_on_incomplete"),
    )

