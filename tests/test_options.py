"""The plugin's options without root or eBPF: every bad value, on the command
line or in the ini file, is pytest's usage error naming the option and the
value, without a traceback; good values are read exactly, the command line
over the ini file over the defaults."""

import argparse

import pytest

from pytest_memleak_ebpf import options
from pytest_memleak_ebpf.marks import Budget


@pytest.fixture
def no_tracer(monkeypatch, tmp_path):
    """Inner sessions cannot load a tracer: had a bad value gone unnoticed, the
    session would stop at the missing BCC instead (and the test fail on the message)."""
    monkeypatch.setenv("PYTEST_MEMLEAK_EBPF_BCC_PATH", str(tmp_path / "nowhere"))


def usage_error(result) -> str:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    err = result.stderr.str()
    assert "Traceback" not in err and "Traceback" not in result.stdout.str()
    return err


BAD_CLI = [
    ("--ebpf-leaks-budget=lots", "argument --ebpf-leaks-budget: 'lots' is not a size (expected a number"),
    ("--ebpf-leaks-budget=-1", "argument --ebpf-leaks-budget: '-1' is not a size"),
    ("--ebpf-leaks-budget=1.5 B", "argument --ebpf-leaks-budget: '1.5 B' is not a whole number of bytes"),
    ("--ebpf-leaks-max-blocks=15", "argument --ebpf-leaks-max-blocks: '15' is out of range (16 to 67108864)"),
    ("--ebpf-leaks-max-stacks=67108865", "argument --ebpf-leaks-max-stacks: '67108865' is out of range (16 to 67108864)"),
    ("--ebpf-leaks-max-processes=many", "argument --ebpf-leaks-max-processes: 'many' is not a whole number"),
    ("--ebpf-leaks-on-incomplete=ignore", "argument --ebpf-leaks-on-incomplete: 'ignore' is not one of error, warn"),
    ("--ebpf-leaks-in-process=some", "argument --ebpf-leaks-in-process: 'some' is not one of extensions, all, off"),
    ("--ebpf-leaks-in-process-scope=session",
     "argument --ebpf-leaks-in-process-scope: 'session' is not one of call, test"),
    ("--ebpf-leaks-wait=soon", "argument --ebpf-leaks-wait: 'soon' is not a number of seconds"),
    ("--ebpf-leaks-wait=3601", "argument --ebpf-leaks-wait: '3601' must be from 0 to 3600 seconds"),
    ("--ebpf-leaks-warmup=10001", "argument --ebpf-leaks-warmup: '10001' is out of range"),
    ("--ebpf-leaks-repeat=0", "argument --ebpf-leaks-repeat: '0' is out of range"),
    ("--ebpf-leaks-json=missing/leaks.json", "argument --ebpf-leaks-json: cannot write 'missing/leaks.json' "
                                             "(directory '{path}/missing' is missing or not writable)"),
    ("--ebpf-leaks-flamegraph=test_m.py", "argument --ebpf-leaks-flamegraph: 'test_m.py' exists and is not a directory"),
    ("--ebpf-leaks-suppressions=nosuch.supp",
     "argument --ebpf-leaks-suppressions: cannot read suppression file nosuch.supp: No such file or directory"),
    ("--ebpf-leaks-suppressions=bad.supp", "argument --ebpf-leaks-suppressions: bad.supp:2: "),
]


@pytest.mark.parametrize("enable", [True, False], ids=["on", "off"])
@pytest.mark.parametrize("arg, message", BAD_CLI, ids=[a.split("=")[0][13:] + "=" + a.split("=")[1] for a, _ in BAD_CLI])
def test_bad_command_line_value_is_a_usage_error(pytester, no_tracer, arg, message, enable):
    """Checked by argparse as the command line is parsed, --ebpf-leaks on or off."""
    pytester.makepyfile(test_m="def test_x(): pass")
    pytester.path.joinpath("bad.supp").write_text("leak:fine\nrace:not_a_leak\n")
    result = pytester.runpytest_subprocess(*(["--ebpf-leaks"] if enable else []), arg, "-p", "no:cacheprovider")
    err = usage_error(result)
    assert message.format(path=pytester.path) in err
    assert "usage:" in err


BAD_INI = [
    ("ebpf_leaks_budget", "-3", "ini option ebpf_leaks_budget: '-3' is not a size"),
    ("ebpf_leaks_budget", "12 parsecs", "ini option ebpf_leaks_budget: '12 parsecs' has an unknown unit 'parsecs'"),
    ("ebpf_leaks_max_blocks", "3", "ini option ebpf_leaks_max_blocks: '3' is out of range (16 to 67108864)"),
    ("ebpf_leaks_max_stacks", "lots", "ini option ebpf_leaks_max_stacks: 'lots' is not a whole number"),
    ("ebpf_leaks_max_processes", "99999999", "ini option ebpf_leaks_max_processes: '99999999' is out of range"),
    ("ebpf_leaks_on_incomplete", "ignore", "ini option ebpf_leaks_on_incomplete: 'ignore' is not one of error, warn"),
    ("ebpf_leaks_in_process", "some", "ini option ebpf_leaks_in_process: 'some' is not one of extensions, all, off"),
    ("ebpf_leaks_in_process_scope", "session",
     "ini option ebpf_leaks_in_process_scope: 'session' is not one of call, test"),
    ("ebpf_leaks_wait", "soon", "ini option ebpf_leaks_wait: 'soon' is not a number of seconds"),
    ("ebpf_leaks_warmup", "x", "ini option ebpf_leaks_warmup: 'x' is not a whole number"),
    ("ebpf_leaks_repeat", "0", "ini option ebpf_leaks_repeat: '0' is out of range"),
    ("ebpf_leaks_json", "missing/leaks.json", "ini option ebpf_leaks_json: cannot write 'missing/leaks.json'"),
    ("ebpf_leaks_flamegraph", "test_m.py", "ini option ebpf_leaks_flamegraph: 'test_m.py' exists and is not a directory"),
    ("ebpf_leaks_suppressions", "nosuch.supp",
     "ini option ebpf_leaks_suppressions: cannot read suppression file {path}/nosuch.supp: No such file"),
    ("ebpf_leaks_suppressions", "bad.supp", "ini option ebpf_leaks_suppressions: {path}/bad.supp:2: "),
    ("ebpf_leaks_default_suppressions", "maybe",
     "ini option ebpf_leaks_default_suppressions: invalid truth value 'maybe'"),
]


@pytest.mark.parametrize("key, value, message", BAD_INI, ids=[f"{k[11:]}={v}" for k, v, _ in BAD_INI])
def test_bad_ini_value_is_a_usage_error(pytester, no_tracer, key, value, message):
    """Checked as the ini value is read, when --ebpf-leaks is on."""
    pytester.makepyfile(test_m="def test_x(): pass")
    pytester.path.joinpath("bad.supp").write_text("leak:fine\nrace:not_a_leak\n")
    pytester.makeini(f"[pytest]\n{key} = {value}\n")
    err = usage_error(pytester.runpytest_subprocess("--ebpf-leaks", "-p", "no:cacheprovider"))
    assert message.format(path=pytester.path) in err


def test_bad_ini_value_of_ebpf_leaks_itself(pytester):
    pytester.makepyfile(test_m="def test_x(): pass")
    pytester.makeini("[pytest]\nebpf_leaks = sometimes\n")
    err = usage_error(pytester.runpytest_subprocess("-p", "no:cacheprovider"))
    assert "ini option ebpf_leaks: invalid truth value 'sometimes'" in err


def test_bad_option_is_a_usage_error(pytester, no_tracer):
    # (from test_plugin_e2e: no eBPF is needed to refuse these)
    pytester.makepyfile(test_x="def test_x(): pass")
    result = pytester.runpytest_subprocess("--ebpf-leaks", "--ebpf-leaks-budget=lots")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "--ebpf-leaks-budget: 'lots' is not a size" in err and "Traceback" not in err
    pytester.makeini("[pytest]\nebpf_leaks_budget = -3\n")
    result = pytester.runpytest_subprocess("--ebpf-leaks")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini option ebpf_leaks_budget: '-3'" in result.stderr.str()


# -- reading good values (in-process config, nothing loaded) --------------------

def settings(pytester, *args, ini=""):
    if ini:
        pytester.makeini("[pytest]\n" + ini)
    config = pytester.parseconfig(*args)
    return options.read_settings(config)


def test_defaults(pytester):
    s = settings(pytester, "--ebpf-leaks")
    assert s.default_budget == Budget(bytes=0, blocks=None, checked=True, source="option", warmup=None, repeat=None)
    assert (s.max_blocks, s.max_stacks, s.max_processes) == (1 << 20, 1 << 15, 1 << 15)
    assert (s.on_incomplete, s.in_process, s.in_process_scope) == ("error", "extensions", "call")
    assert (s.wait, s.json_path, s.flamegraph_dir) == (0.0, None, None)
    from pytest_memleak_ebpf.suppressions import DEFAULT_SUPPRESSIONS

    assert s.suppressions == tuple(DEFAULT_SUPPRESSIONS) and s.suppressions


INI = """ebpf_leaks_budget = 2 KiB
ebpf_leaks_max_blocks = 4096
ebpf_leaks_max_stacks = 512
ebpf_leaks_max_processes = 64
ebpf_leaks_on_incomplete = warn
ebpf_leaks_in_process = all
ebpf_leaks_in_process_scope = test
ebpf_leaks_wait = 1.5
ebpf_leaks_warmup = 2
ebpf_leaks_json = leaks.json
ebpf_leaks_flamegraph = flames
ebpf_leaks_suppressions = a.supp
ebpf_leaks_default_suppressions = false
"""


def test_ini_values(pytester):
    pytester.path.joinpath("a.supp").write_text("leak:from_ini\n")
    s = settings(pytester, "--ebpf-leaks", ini=INI)
    assert s.default_budget == Budget(bytes=2048, blocks=None, checked=True, source="option", warmup=2, repeat=3)
    assert (s.max_blocks, s.max_stacks, s.max_processes) == (4096, 512, 64)
    assert (s.on_incomplete, s.in_process, s.in_process_scope) == ("warn", "all", "test")
    assert (s.wait, s.json_path, s.flamegraph_dir) == (1.5, "leaks.json", "flames")
    assert [x.pattern for x in s.suppressions] == ["from_ini"]


def test_command_line_over_ini(pytester):
    pytester.path.joinpath("a.supp").write_text("leak:from_ini\n")
    pytester.path.joinpath("b.supp").write_text("leak:from_cli\n")
    s = settings(pytester, "--ebpf-leaks", "--ebpf-leaks-budget=1 MiB", "--ebpf-leaks-max-blocks=16",
                 "--ebpf-leaks-max-stacks=67108864", "--ebpf-leaks-max-processes=100",
                 "--ebpf-leaks-on-incomplete=error", "--ebpf-leaks-in-process=off",
                 "--ebpf-leaks-in-process-scope=call", "--ebpf-leaks-wait=0.25", "--ebpf-leaks-repeat=5",
                 "--ebpf-leaks-json=out.json", "--ebpf-leaks-flamegraph=fg", "--ebpf-leaks-suppressions=b.supp",
                 "--ebpf-leaks-no-default-suppressions", ini=INI)
    assert s.default_budget == Budget(bytes=1 << 20, blocks=None, checked=True, source="option", warmup=2, repeat=5)
    assert (s.max_blocks, s.max_stacks, s.max_processes) == (16, 1 << 26, 100)
    assert (s.on_incomplete, s.in_process, s.in_process_scope) == ("error", "off", "call")
    assert (s.wait, s.json_path, s.flamegraph_dir) == (0.25, "out.json", "fg")
    assert [x.pattern for x in s.suppressions] == ["from_cli"]


@pytest.mark.parametrize("args, ini, expected", [
    ((), "", False),                                                     # opt-in
    (("--ebpf-leaks-in-process-kinds",), "", True),
    ((), "ebpf_leaks_in_process_kinds = true\n", True),
    (("--ebpf-leaks-in-process-kinds",), "ebpf_leaks_in_process_kinds = false\n", True),
    (("--ebpf-leaks-no-in-process-kinds",), "ebpf_leaks_in_process_kinds = true\n", False),
], ids=["default", "on", "ini-on", "cli-over-ini", "off-over-ini"])
def test_in_process_kinds_are_opt_in(pytester, args, ini, expected):
    assert settings(pytester, "--ebpf-leaks", *args, ini=ini).in_process_kinds is expected


def test_both_in_process_kinds_options_are_a_usage_error(pytester, no_tracer):
    pytester.makepyfile(test_m="def test_x(): pass")
    result = pytester.runpytest_subprocess("--ebpf-leaks", "--ebpf-leaks-in-process-kinds",
                                           "--ebpf-leaks-no-in-process-kinds", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "--ebpf-leaks-in-process-kinds and --ebpf-leaks-no-in-process-kinds contradict" in err
    assert "Traceback" not in err


def test_growth_options_take_the_other_default(pytester):
    b = settings(pytester, "--ebpf-leaks", "--ebpf-leaks-warmup=0").default_budget
    assert (b.warmup, b.repeat) == (0, 3)
    b = settings(pytester, "--ebpf-leaks", "--ebpf-leaks-repeat=7").default_budget
    assert (b.warmup, b.repeat) == (1, 7)


def test_empty_command_line_values_are_the_defaults(pytester):
    pytester.makeini("[pytest]\nebpf_leaks_budget = 5\nebpf_leaks_in_process = all\n")
    s = settings(pytester, "--ebpf-leaks", "--ebpf-leaks-budget=", "--ebpf-leaks-in-process=",
                 "--ebpf-leaks-json=", "--ebpf-leaks-max-blocks=", "--ebpf-leaks-wait=")
    assert (s.default_budget.bytes, s.in_process, s.json_path, s.max_blocks, s.wait) == (0, "extensions", None,
                                                                                         1 << 20, 0.0)


def test_type_functions_raise_argparse_errors_naming_the_value():
    convert = options._cli("ebpf_leaks_max_blocks")
    assert convert("16") == 16 and convert("") == 1 << 20
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'8' is out of range \(16 to 67108864\)$"):
        convert("8")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'x' is not one of call, test$"):
        options._cli("ebpf_leaks_in_process_scope")("x")
