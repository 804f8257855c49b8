"""pytest wiring: options, the leak_budget marker, hooks. The engine (tracer,
accounting, reports) is imported only when --ebpf-leaks is on."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from .marks import MARKER, MARKER_HELP, Budget, MarkerError, resolve_budget
from .sizes import SizeError, parse_count, parse_seconds, parse_size

PLUGIN_NAME = "memleak_ebpf_checker"
budget_key = pytest.StashKey[Any]()      # Budget or MarkerError
result_key = pytest.StashKey[Any]()      # TestLeakResult
outcome_key = pytest.StashKey[str]()

INCOMPLETE_CHOICES = ("error", "warn")
IN_PROCESS_CHOICES = ("extensions", "all", "off")
REEXEC_ENV = "PYTEST_MEMLEAK_EBPF_REEXEC"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ebpf-leaks", "leak checking with eBPF (pytest-memleak-ebpf)")
    group.addoption("--ebpf-leaks", action="store_true", default=None,
                    help="check the processes each test launches for leaked malloc-family memory (needs root)")
    group.addoption("--ebpf-leaks-budget", metavar="SIZE", default=None,
                    help="leak budget of tests without a leak_budget marker, e.g. 0, 4096, '4 KiB' (default 0)")
    group.addoption("--ebpf-leaks-json", metavar="PATH", default=None,
                    help="write a JSON leak report (schema version 1) to PATH")
    group.addoption("--ebpf-leaks-max-blocks", metavar="N", default=None,
                    help="capacity of the live-block map (default 1048576)")
    group.addoption("--ebpf-leaks-max-stacks", metavar="N", default=None,
                    help="capacity of the stack map (default 32768)")
    group.addoption("--ebpf-leaks-max-processes", metavar="N", default=None,
                    help="how many processes can be tracked at once (default 32768)")
    group.addoption("--ebpf-leaks-on-incomplete", metavar="error|warn", default=None,
                    help="when tracking was incomplete (a map filled up): fail the test (error, default) or warn")
    group.addoption("--ebpf-leaks-in-process", metavar="extensions|all|off", default=None,
                    help="check the pytest process's own allocations during each test's call: only those whose "
                         "stack passes through an extension module (extensions, default), all, or off")
    group.addoption("--ebpf-leaks-suppressions", metavar="FILE", action="append", default=None,
                    help="LSan-style suppression file (leak:<pattern> lines); may be given several times")
    group.addoption("--ebpf-leaks-no-default-suppressions", action="store_true", default=None,
                    help="do not suppress the memory glibc, ld.so and libstdc++ keep on purpose until exit")
    group.addoption("--ebpf-leaks-gen-suppressions", action="store_true", default=None,
                    help="print ready-to-paste suppressions for every leaking stack at the end of the run")
    group.addoption("--ebpf-leaks-flamegraph", metavar="DIR", default=None,
                    help="write folded stacks and an SVG flame graph of leaked bytes per failing test into DIR")
    group.addoption("--ebpf-leaks-wait", metavar="SECONDS", default=None,
                    help="at the end of a test, wait up to SECONDS for the processes it launched to exit")
    group.addoption("--ebpf-leaks-in-process-scope", metavar="call|test", default=None,
                    help="in-process window: the test call (default), or the whole test with setup and teardown "
                         "(in-process leaks then fail the test at teardown)")
    group.addoption("--ebpf-leaks-warmup", metavar="N", default=None,
                    help="growth mode for all tests: run the test body N times before measuring")
    group.addoption("--ebpf-leaks-repeat", metavar="M", default=None,
                    help="growth mode for all tests: measure M repetitions, count only what keeps growing")
    parser.addini("ebpf_leaks", type="bool", default=False, help="enable --ebpf-leaks")
    parser.addini("ebpf_leaks_budget", default="0", help="default leak budget (size)")
    parser.addini("ebpf_leaks_json", default="", help="JSON leak report path")
    parser.addini("ebpf_leaks_max_blocks", default="", help="live-block map capacity")
    parser.addini("ebpf_leaks_max_stacks", default="", help="stack map capacity")
    parser.addini("ebpf_leaks_max_processes", default="", help="process map capacity")
    parser.addini("ebpf_leaks_on_incomplete", default="error", help="error|warn")
    parser.addini("ebpf_leaks_in_process", default="extensions", help="extensions|all|off")
    parser.addini("ebpf_leaks_suppressions", type="paths", default=[], help="suppression files")
    parser.addini("ebpf_leaks_default_suppressions", type="bool", default=True,
                  help="suppress memory glibc/ld.so/libstdc++ keep until exit (default true)")
    parser.addini("ebpf_leaks_flamegraph", default="", help="flame graph directory")
    parser.addini("ebpf_leaks_wait", default="", help="seconds to wait for a test's processes to exit")
    parser.addini("ebpf_leaks_in_process_scope", default="call", help="call|test")
    parser.addini("ebpf_leaks_warmup", default="", help="growth mode warmup runs")
    parser.addini("ebpf_leaks_repeat", default="", help="growth mode measured runs")


def _opt(config: pytest.Config, name: str) -> tuple[Any, str]:
    """(value, where it came from) for option `name`, falling back to ini."""
    value = config.getoption(name.replace("-", "_"))
    if value is not None:
        return value, f"--ebpf-leaks{name[len('ebpf_leaks'):]}".replace("_", "-")
    ini = name
    return config.getini(ini), f"ini option {ini}"


def enabled(config: pytest.Config) -> bool:
    value = config.getoption("ebpf_leaks")
    if value is not None:
        return bool(value)
    return bool(config.getini("ebpf_leaks"))


def _settings(config: pytest.Config):
    from .engine import Settings

    def size(name: str, default: str) -> int:
        value, where = _opt(config, name)
        if value in (None, ""):
            value = default
        try:
            return parse_size(value)
        except SizeError as exc:
            raise pytest.UsageError(f"{where}: {exc}") from None

    def capacity(name: str, default: int, minimum: int = 16) -> int:
        value, where = _opt(config, name)
        if value in (None, ""):
            return default
        try:
            n = parse_count(value)
        except SizeError as exc:
            raise pytest.UsageError(f"{where}: {exc}") from None
        if n < minimum or n > 1 << 26:
            raise pytest.UsageError(f"{where}: {value!r} is out of range ({minimum} to {1 << 26})")
        return n

    on_incomplete, where = _opt(config, "ebpf_leaks_on_incomplete")
    on_incomplete = on_incomplete or "error"
    if on_incomplete not in INCOMPLETE_CHOICES:
        raise pytest.UsageError(f"{where}: {on_incomplete!r} is not one of {', '.join(INCOMPLETE_CHOICES)}")
    in_process, where = _opt(config, "ebpf_leaks_in_process")
    in_process = in_process or "extensions"
    if in_process not in IN_PROCESS_CHOICES:
        raise pytest.UsageError(f"{where}: {in_process!r} is not one of {', '.join(IN_PROCESS_CHOICES)}")
    scope, where = _opt(config, "ebpf_leaks_in_process_scope")
    scope = scope or "call"
    if scope not in ("call", "test"):
        raise pytest.UsageError(f"{where}: {scope!r} is not one of call, test")
    growth = {}
    for name in ("warmup", "repeat"):
        value, where = _opt(config, f"ebpf_leaks_{name}")
        if value in (None, ""):
            continue
        try:
            growth[name] = parse_count(value)
        except SizeError as exc:
            raise pytest.UsageError(f"{where}: {exc}") from None
        if name == "repeat" and not 1 <= growth[name] <= 10_000 or growth[name] > 10_000:
            raise pytest.UsageError(f"{where}: {value!r} is out of range")
    if growth:
        growth = {"warmup": growth.get("warmup", 1), "repeat": growth.get("repeat", 3)}
    from .suppressions import DEFAULT_SUPPRESSIONS, SuppressionError, load_suppression_files

    sup_files = config.getoption("ebpf_leaks_suppressions") or [str(p) for p in config.getini("ebpf_leaks_suppressions")]
    try:
        sups = list(load_suppression_files(sup_files))
    except SuppressionError as exc:
        raise pytest.UsageError(f"--ebpf-leaks-suppressions: {exc}") from None
    no_defaults = config.getoption("ebpf_leaks_no_default_suppressions")
    if no_defaults is None:
        no_defaults = not config.getini("ebpf_leaks_default_suppressions")
    if not no_defaults:
        sups = list(DEFAULT_SUPPRESSIONS) + sups
    flame, where = _opt(config, "ebpf_leaks_flamegraph")
    flame = flame or None
    if flame and os.path.exists(flame) and not os.path.isdir(flame):
        raise pytest.UsageError(f"{where}: {flame!r} exists and is not a directory")
    wait, where = _opt(config, "ebpf_leaks_wait")
    if wait in (None, ""):
        wait = 0.0
    else:
        try:
            wait = parse_seconds(wait)
        except SizeError as exc:
            raise pytest.UsageError(f"{where}: {exc}") from None
    json_path, where = _opt(config, "ebpf_leaks_json")
    json_path = json_path or None
    if json_path:
        d = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            raise pytest.UsageError(f"{where}: cannot write {json_path!r} (directory {d!r} is missing or not writable)")
    return Settings(
        default_budget=Budget(bytes=size("ebpf_leaks_budget", "0"), blocks=None, checked=True, source="option",
                              warmup=growth.get("warmup"), repeat=growth.get("repeat")),
        in_process=in_process,
        in_process_scope=scope,
        suppressions=tuple(sups),
        wait=wait,
        flamegraph_dir=flame,
        json_path=json_path,
        max_blocks=capacity("ebpf_leaks_max_blocks", 1 << 20),
        max_stacks=capacity("ebpf_leaks_max_stacks", 1 << 15),
        max_processes=capacity("ebpf_leaks_max_processes", 1 << 15),
        on_incomplete=on_incomplete,
    )


def _xdist_controller(config: pytest.Config) -> bool:
    if hasattr(config, "workerinput"):
        return False
    try:
        return config.getoption("dist", "no") not in ("no", None) and bool(config.getoption("numprocesses", None))
    except ValueError:
        return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    if not enabled(config):
        return
    settings = _settings(config)
    if _xdist_controller(config):
        # the controller loads the one tracer and serves it; the workers check
        # their own tests through it, the controller merges their reports
        from .engine import tracer_config
        from .tracer.server import TracerServer

        tracer = _load(lambda: _new_tracer(tracer_config(settings)))
        tracer.add_spawner(os.getpid())
        controller = XdistController(config, settings, tracer, TracerServer(tracer))
        if settings.in_process != "off":
            # workers cannot restart themselves (and the controller does not collect):
            # say how to make Python objects visible
            controller.notes = _prepare_in_process(config, restart=False)
        config.pluginmanager.register(controller, PLUGIN_NAME)
        return
    notes: list[str] = []
    if settings.in_process != "off":
        notes = _prepare_in_process(config, restart=False)
    from .engine import LeakEngine, tracer_config
    from .inprocess import mapped_modules

    before = mapped_modules()
    engine = _load(lambda: LeakEngine(settings, _worker_tracer(config) or _new_tracer(tracer_config(settings))))
    settings.own_modules = mapped_modules() - before
    checker = LeakChecker(config, engine)
    checker.notes = notes
    config.pluginmanager.register(checker, PLUGIN_NAME)


def _new_tracer(cfg):
    from .bccloader import load_bcc
    from .preflight import run_all
    from .tracer import Tracer

    run_all()
    load_bcc()
    return Tracer(cfg)


def _worker_tracer(config: pytest.Config):
    """An xdist worker: the controller's tracer (None: load one here, as for a
    worker on another host, which cannot reach the controller's socket)."""
    from .tracer.server import SOCKET_KEY, RemoteTracer

    address = getattr(config, "workerinput", {}).get(SOCKET_KEY)
    if not address:
        return None
    try:
        return RemoteTracer(address)
    except OSError:
        return None


def _load(make):
    """make() under the plugin's usage errors: a missing privilege, kernel
    feature or BCC is one paragraph, a compile or attach failure says what to check."""
    from .bccloader import BCCNotFound
    from .preflight import EnvironmentProblem

    try:
        return make()
    except (EnvironmentProblem, BCCNotFound) as exc:
        raise pytest.UsageError(f"--ebpf-leaks cannot run: {exc}") from None
    except Exception as exc:  # BCC compile/attach failure
        raise pytest.UsageError(
            f"--ebpf-leaks cannot run: loading the eBPF tracer failed: {exc}. Check that the kernel "
            "headers match the running kernel (see scripts/setup-system.sh) and that the kernel has "
            "uprobes and BTF."
        ) from None


def _prepare_in_process(config: pytest.Config, *, restart: bool = False, why: str = "",
                        before_exec=None) -> list[str]:
    """pymalloc serves objects <= 512 B from arenas libc probes never see.
    With restart=True, restart pytest once with PYTHONMALLOC=malloc (opt out
    with PYTEST_MEMLEAK_EBPF_REEXEC=0). Returns header notes."""
    import sys

    from .inprocess import free_threaded, pymalloc_active

    notes = []
    if free_threaded():
        notes.append("free-threaded CPython: Python objects come from mimalloc, which libc probes cannot see; "
                     "in-process checking covers raw malloc-family blocks only")
        return notes
    if not pymalloc_active():
        if os.environ.get(REEXEC_ENV) == "done":
            notes.append("pytest was restarted with PYTHONMALLOC=malloc so Python objects made by extensions "
                         "are visible")
        else:
            notes.append("PYTHONMALLOC=malloc: Python objects are visible to the tracer")
        return notes
    worker = hasattr(config, "workerinput")
    if restart and os.environ.get(REEXEC_ENV) not in ("0", "done") and not worker and hasattr(sys, "orig_argv"):
        env = dict(os.environ, PYTHONMALLOC="malloc", **{REEXEC_ENV: "done"})
        sys.stdout.write(f"ebpf-leaks: restarting pytest with PYTHONMALLOC=malloc {why}"
                         f"(set {REEXEC_ENV}=0 to skip)\n")
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            if not os.access(sys.executable, os.X_OK):
                raise OSError(f"{sys.executable} is not executable")
            if before_exec is not None:
                before_exec()
            os.execve(sys.executable, list(sys.orig_argv), env)
        except OSError as exc:
            notes.append(f"could not restart pytest with PYTHONMALLOC=malloc ({exc})")
    notes.append("pymalloc is active: Python objects of 512 B or less made by C extensions are invisible "
                 "(pytest restarts itself with PYTHONMALLOC=malloc when extension modules are loaded at "
                 "collection; raw malloc-family blocks are exact either way)")
    return notes


_ATTACH = {"session": "3 uprobe session/multi links", "multi": "2 uprobe_multi links", "perf": "a perf event per probe"}


def _tracer_lines(tracer, settings) -> list[str]:
    """The header's tracer lines: probes, where free is probed, how attached."""
    from .report import budget_text

    free = next((p for p in tracer.probes if p.function == "free"), None)
    placed = f", free probed at +{free.offset} ('{free.instruction}')" if free else ""
    lines = [
        f"ebpf-leaks: tracer ready: {tracer.probe_count} probes ({len(tracer.probes)} allocator uprobes on "
        f"{tracer.libc}{placed}; {_ATTACH.get(tracer.attach_mode, tracer.attach_mode)}), loaded in "
        f"{tracer.load_seconds:.2f} s{' (compiled programs from the cache)' if tracer.cached else ''}; "
        f"default budget {budget_text(settings.default_budget)[7:]}"
    ]
    for mode, why in tracer.attach_errors.items():
        lines.append(f"ebpf-leaks: {_ATTACH[mode]} unavailable here ({why}); using the next best "
                     "(uprobe sessions need Linux 6.13+, uprobe_multi links 6.6+)")
    return lines


class LeakChecker:
    """Hooks active only with --ebpf-leaks."""

    def __init__(self, config: pytest.Config, engine):
        self.config = config
        self.engine = engine
        self._collector = None
        self.notes: list[str] = []

    # -- header / collection ----------------------------------------------

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        lines = _tracer_lines(self.engine.tracer, self.engine.settings)
        mode = self.engine.settings.in_process
        lines.append(f"ebpf-leaks: in-process checking: {mode}" + (f"; {'; '.join(self.notes)}" if self.notes else ""))
        return lines

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        default = self.engine.settings.default_budget
        for item in items:
            marker = item.get_closest_marker(MARKER)
            try:
                item.stash[budget_key] = resolve_budget(marker, default)
            except MarkerError as exc:
                item.stash[budget_key] = MarkerError(f"{item.nodeid}: {exc}")

    # -- per test ----------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        budget = item.stash.get(budget_key, None)
        if isinstance(budget, MarkerError):
            raise _MarkerFailure(str(budget))
        self.engine.begin()
        if self._whole_test_window(budget):
            self.engine.open_window()

    def _whole_test_window(self, budget) -> bool:
        s = self.engine.settings
        return s.in_process != "off" and s.in_process_scope == "test" and isinstance(budget, Budget) \
            and not budget.growth

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Restart with PYTHONMALLOC=malloc once collection shows that extension
        modules are loaded (or in 'all' mode), so Python objects they leak
        are visible; a session without extensions keeps pymalloc's speed."""
        mode = self.engine.settings.in_process
        if mode == "off" or session.config.getoption("collectonly"):
            return
        from .inprocess import extension_modules, pymalloc_active

        if not pymalloc_active():
            return
        mods = extension_modules(self.engine.settings.own_modules)
        if mode == "all" or mods:
            names = ", ".join(sorted(os.path.basename(m).split(".")[0] for m in mods)[:5])
            why = f"(extension modules loaded: {names}) " if mods else "(--ebpf-leaks-in-process=all) "
            self.notes = _prepare_in_process(session.config, restart=True, why=why, before_exec=self.engine.close)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        budget = item.stash.get(budget_key, None)
        if self.engine.settings.in_process == "off" or not isinstance(budget, Budget) or budget.growth \
                or not self.engine.active() or self._whole_test_window(budget):
            yield
            return
        # no collect before: frees of older blocks during the window are no-ops
        self.engine.open_window()
        try:
            yield
        finally:
            self.engine.close_window(collect=True)

    @pytest.hookimpl(tryfirst=True)
    def pytest_pyfunc_call(self, pyfuncitem: pytest.Function):
        """Growth mode: run the test body warmup + repeat times; measure the
        in-process figures after each measured repetition."""
        budget = pyfuncitem.stash.get(budget_key, None)
        if not isinstance(budget, Budget) or not budget.growth or self.engine.settings.in_process == "off":
            return None
        import gc
        import inspect

        fn = pyfuncitem.obj
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            return None
        args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        for _ in range(budget.warmup or 0):
            fn(**args)
        gc.collect()
        reps = []
        self.engine.open_window()
        try:
            for _ in range(budget.repeat):
                fn(**args)
                gc.collect()
                reps.append(self.engine.snapshot())
        finally:
            gc.collect()
            self.engine.close_window()
            self.engine.set_growth(budget.warmup or 0, budget.repeat, reps)
        return True

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if call.when == "teardown" and (self.engine.tracer.in_window() or self.engine.window_empty):
            self._finish_whole_test_window(item, report)
            return
        if not self.engine.active():
            return
        if call.when == "call" or (call.when == "setup" and report.outcome != "passed"):
            budget = item.stash.get(budget_key, self.engine.settings.default_budget)
            if self.engine.settings.wait:
                self.engine.wait_for_processes(self.engine.settings.wait)
            result = self.engine.finish(item.nodeid, budget)
            item.stash[result_key] = result
            self._apply(item, report, result)

    def _finish_whole_test_window(self, item: pytest.Item, report: pytest.TestReport) -> None:
        """Scope "test": in-process figures arrive at teardown; a leak then
        fails the test at teardown (pytest shows it as an error)."""
        from .report import failure_text, headline

        budget = item.stash.get(budget_key, self.engine.settings.default_budget)
        result = item.stash.get(result_key, None)
        if result is None or not isinstance(budget, Budget):
            self.engine.abandon()
            return
        was_over = result.over_budget
        self.engine.finish_in_process(result, budget)
        ip = result.in_process
        props = [("leak_in_process_bytes", ip.leaked.bytes), ("leak_bytes", result.leaked.bytes),
                 ("leak_blocks", result.leaked.blocks)]
        report.user_properties.extend(props)
        if result.over_budget and not was_over and report.outcome == "passed":
            text = failure_text(result)
            report.outcome = "failed"
            report.longrepr = LeakRepr(item, headline(result), text)

    def _apply(self, item: pytest.Item, report: pytest.TestReport, result) -> None:
        from .report import failure_text, headline, incomplete_headline, within_budget_headline

        ip = result.in_process
        props = [
            ("leak_bytes", result.leaked.bytes),
            ("leak_blocks", result.leaked.blocks),
            ("leak_budget_bytes", result.budget.bytes if result.budget.checked and result.budget.bytes is not None else ""),
            ("leak_processes", len(result.processes)),
        ]
        if ip is not None:
            props.append(("leak_in_process_bytes", ip.leaked.bytes))
        item.user_properties.extend(props)
        incomplete_fails = bool(result.incomplete) and self.engine.settings.on_incomplete == "error"
        if not (result.over_budget or incomplete_fails):
            if result.incomplete:
                item.warn(pytest.PytestWarning(f"{item.nodeid}: {incomplete_headline(result)}"))
            if result.leaked.blocks and report.outcome != "skipped":
                report.sections.append(("ebpf-leaks", failure_text(result, headline=within_budget_headline(result))))
            return
        first = headline(result) if result.over_budget else incomplete_headline(result)
        text = failure_text(result, headline=first)
        if report.outcome == "passed" and report.when == "call":
            report.outcome = "failed"
            report.longrepr = LeakRepr(item, first, text)
        elif report.failed and hasattr(report.longrepr, "addsection"):
            report.longrepr.addsection("ebpf leak report", text)
        else:
            report.sections.append(("ebpf leak report", text))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self._collector is not None:
            self._collector(report)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem):
        reports: list[pytest.TestReport] = []

        def collect(report):
            if report.nodeid == item.nodeid:
                reports.append(report)

        self._collector = collect
        outcome = yield
        self._collector = None
        if self.engine.active():
            # the test never reached its call report: interrupted (Ctrl-C, a
            # timeout plugin) or crashed. Report what its processes leaked so far.
            budget = item.stash.get(budget_key, self.engine.settings.default_budget)
            if not isinstance(budget, Budget):
                budget = self.engine.settings.default_budget
            try:
                result = self.engine.finish(item.nodeid, budget)
                result.warnings.append("the test was interrupted: these are the figures so far")
                item.stash[result_key] = result
                tw = self.config.get_terminal_writer()
                tw.line(f"\nebpf-leaks: {item.nodeid} was interrupted; so far: "
                        f"{result.leaked.bytes:,} B in {result.leaked.blocks:,} blocks leaked", yellow=True)
            except Exception:
                self.engine.abandon()
        result = item.stash.get(result_key, None)
        if result is not None:
            entry_outcome = _outcome(reports) if outcome.excinfo is None else "error"
            self.engine.record_json(result, entry_outcome, interrupted=outcome.excinfo is not None)

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config) -> None:
        from .report import summary_lines, write_summary

        tr = terminalreporter
        results = self.engine.results
        write_summary(tr, summary_lines(results), checked=len(results),
                      leaked=sum(r.leaked.bytes for r in results), report_seconds=self.engine.report_seconds,
                      json_path=self.engine.settings.json_path, flamegraphs=self.engine.flamegraphs)
        if config.getoption("ebpf_leaks_gen_suppressions"):
            from .report import gen_suppressions

            leaking = [r for r in self.engine.results if r.leaked.blocks]
            tr.write_sep("-", "suggested suppressions (review before use)")
            text = gen_suppressions(leaking) if leaking else "# no leaking stacks"
            for line in text.splitlines():
                tr.write_line(line)

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:  # xdist worker: the controller writes the report
            from .report import summary_lines

            workeroutput["ebpf_leaks"] = json.dumps({
                "tests": self.engine.json_entries,
                "summary": summary_lines(self.engine.results),
                "flamegraphs": self.engine.flamegraphs,
                "checked": len(self.engine.results),
                "leaked": sum(r.leaked.bytes for r in self.engine.results),
                "report_seconds": self.engine.report_seconds,
            })
            return
        from .report import write_json_report

        write_json_report(session.config, self.engine.settings.json_path, self.engine.json_entries,
                          self.engine.session_info())

    def pytest_unconfigure(self, config) -> None:
        self.engine.close()


class _MarkerFailure(Exception):
    """A bad leak_budget marker: fails that test's setup with a clear message."""


class XdistController:
    """With pytest-xdist: the controller loads the one tracer and serves it
    (shared.py); each worker checks its own tests through it; the controller
    merges their JSON entries and summaries."""

    def __init__(self, config: pytest.Config, settings, tracer, server):
        self.config = config
        self.settings = settings
        self.tracer = tracer
        self.server = server
        self.entries: list[dict] = []
        self.summary: list = []
        self.flamegraphs: list = []
        self.checked = 0
        self.leaked = 0

    notes: list = []

    def pytest_report_header(self, config):
        lines = _tracer_lines(self.tracer, self.settings)
        lines.append(f"ebpf-leaks: distributed: the controller's tracer serves every xdist worker (each "
                     f"allocation runs one BPF program however many workers); in-process checking: "
                     f"{self.settings.in_process}")
        from .inprocess import pymalloc_active

        if self.settings.in_process != "off" and pymalloc_active():
            lines.append("ebpf-leaks: with xdist, run pytest with PYTHONMALLOC=malloc to see Python objects "
                         "that C extensions leak (raw malloc-family blocks are exact either way)")
        elif self.settings.in_process != "off":
            lines[-1] += "".join(f"; {n}" for n in self.notes)
        return lines

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node):
        from .tracer.server import SOCKET_KEY

        node.workerinput[SOCKET_KEY] = self.server.address

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        data = getattr(node, "workeroutput", {}).get("ebpf_leaks")
        if not data:
            return
        d = json.loads(data)
        self.entries += d["tests"]
        self.summary += [tuple(x) for x in d["summary"]]
        self.flamegraphs += [tuple(x) for x in d["flamegraphs"]]
        self.checked += d["checked"]
        self.leaked += d["leaked"]

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        from .report import write_summary

        write_summary(terminalreporter, sorted(self.summary, key=lambda x: x[1]), checked=self.checked,
                      leaked=self.leaked, json_path=self.settings.json_path, flamegraphs=self.flamegraphs)

    def pytest_sessionfinish(self, session, exitstatus):
        from .engine import session_info
        from .report import write_json_report

        info = {**session_info(self.tracer), "workers": self.server.workers_served}
        write_json_report(session.config, self.settings.json_path,
                          sorted(self.entries, key=lambda e: e["nodeid"]), info)

    def pytest_unconfigure(self, config):
        self.server.close()
        self.tracer.close()


def _outcome(reports: list[pytest.TestReport]) -> str:
    by = {r.when: r for r in reports}
    setup, call, teardown = by.get("setup"), by.get("call"), by.get("teardown")
    if setup is not None and setup.failed:
        return "error"
    if setup is not None and setup.skipped:
        return "skipped"
    if call is not None and call.skipped:
        return "skipped"
    if call is not None and call.failed:
        return "failed"
    if teardown is not None and teardown.failed:
        return "error"
    return "passed"


def LeakRepr(item: pytest.Item, headline: str, text: str):
    """longrepr of a test failed by its leak budget, built from pytest's own
    exception-repr classes so it survives xdist serialization: the crash
    message (JUnit's failure message) is the self-contained first line."""
    from _pytest._code.code import ReprEntryNative, ReprExceptionInfo, ReprFileLocation, ReprTraceback

    path, lineno, _ = item.location
    lines = [line + "\n" for line in text.splitlines()]
    return ReprExceptionInfo(
        reprtraceback=ReprTraceback([ReprEntryNative(lines)], None, "native"),
        reprcrash=ReprFileLocation(path, (lineno or 0) + 1, headline),
    )
