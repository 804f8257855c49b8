"""What the plugin does in each kind of pytest process with --ebpf-leaks on;
pytest_configure registers exactly one of these:

- Standalone: a session without xdist. Loads the tracer, checks every test,
  writes the terminal summary and the JSON report, and restarts pytest once
  with PYTHONMALLOC=malloc when collection loaded extension modules.
- DistController: the xdist controller. Loads the one tracer and serves it to
  the workers (collects and runs no tests), then merges their figures.
- DistWorker: an xdist worker. Checks its tests through the controller's
  tracer (its own when the controller's socket is out of reach), and sends its
  figures to the controller.

Standalone and DistWorker share the per-test hooks (Checker); per-test state
lives in the item's stash. The engine and everything heavy are imported only
when a role starts."""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any

import pytest

from . import growth, reexec
from .marks import MARKER, Budget, MarkerError, resolve_budget

budget_key = pytest.StashKey[Any]()     # Budget, or MarkerError for a bad marker
result_key = pytest.StashKey[Any]()     # TestLeakResult
reports_key = pytest.StashKey[list]()   # the test's TestReports (setup, call, teardown)
growth_ran_key = pytest.StashKey[bool]()  # growth mode repeated the test
WORKEROUTPUT_KEY = "ebpf_leaks"          # a worker's figures for the controller (JSON text)


def is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def is_xdist_controller(config: pytest.Config) -> bool:
    if is_xdist_worker(config):
        return False
    try:
        return config.getoption("dist", "no") not in ("no", None) and bool(config.getoption("numprocesses", None))
    except ValueError:
        return False


class _MarkerFailure(Exception):
    """A bad leak_budget marker: fails that test's setup with a clear message."""


# the name reports show for it ("pytest_memleak_ebpf.plugin._MarkerFailure: <message>", in the
# terminal and in JUnit's failure message) is part of the plugin's output
_MarkerFailure.__module__ = "pytest_memleak_ebpf.plugin"


# -- loading the tracer ------------------------------------------------------

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


def _new_tracer(settings):
    """This process's own tracer, after the preflight checks."""
    from .bccloader import load_bcc
    from .engine import new_tracer
    from .preflight import run_all

    run_all()
    load_bcc()
    return new_tracer(settings)


def _controller_tracer(config: pytest.Config):
    """An xdist worker's client of the controller's tracer (None: the worker
    runs on another host and cannot reach the controller's socket)."""
    from .tracer.server import SOCKET_KEY, RemoteTracer

    address = config.workerinput.get(SOCKET_KEY)
    if not address:
        return None
    try:
        return RemoteTracer(address)
    except OSError:
        return None


def _pymalloc_problem(tracer, settings, pid: int, *, probes: bool = True) -> str | None:
    """Why process `pid`'s windows cannot probe its pymalloc ("" when not
    asked: in-process checking off, or pymalloc not serving Python objects),
    or None when they can (`probes`=False: leave out whether its functions
    can be probed, which enabling them says). The xdist controller asks it
    of itself for its workers (they run its interpreter)."""
    from .inprocess import free_threaded, pymalloc_active

    if settings.in_process == "off" or free_threaded() or not pymalloc_active():
        return ""
    if settings.in_process_kinds:
        # a freed pymalloc block keeps its words: the scan tells free blocks from
        # live ones by pymalloc's own structures, which must be found first
        from .kinds.pymalloc import locate
        from .procmaps import read_regions

        try:
            locate(read_regions(pid), os.path.realpath(f"/proc/{pid}/exe"))
        except (LookupError, OSError) as exc:
            return f"in-process leak kinds cannot tell pymalloc's free blocks from its live ones: {exc}"
    return tracer.pymalloc_problem(pid) if probes else None


def _probe_pymalloc(tracer, settings) -> str | None:
    """Have this process's windows probe its pymalloc, when in-process
    checking is on and pymalloc serves Python objects: None when they will,
    else why not ("" when nothing was asked)."""
    problem = _pymalloc_problem(tracer, settings, os.getpid(), probes=False)
    return problem if problem is not None else tracer.enable_pymalloc_probes()


# -- the header ----------------------------------------------------------------

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
    probed = getattr(tracer, "allocators_probed", None)
    if probed:   # the allocator of every exec (tracer/execpause.py)
        lines.append("ebpf-leaks: allocators probed: " + ", ".join(f"{k} ({p})" for p, k in probed.items())
                     + "; any other a process execs with (jemalloc, tcmalloc, mimalloc, musl, static programs) "
                     "is probed at that exec")
    for mode, why in tracer.attach_errors.items():
        lines.append(f"ebpf-leaks: {_ATTACH[mode]} unavailable here ({why}); using the next best "
                     "(uprobe sessions need Linux 6.13+, uprobe_multi links 6.6+)")
    return lines


# -- checking tests ------------------------------------------------------------

class Checker:
    """The per-test hooks of a process that runs tests (Standalone, DistWorker)
    on a LeakEngine."""

    def __init__(self, config: pytest.Config, engine):
        self.config = config
        self.engine = engine
        self._item: pytest.Item | None = None   # the test whose protocol is running

    @classmethod
    def _load_engine(cls, config: pytest.Config, settings):
        """The LeakEngine on this role's tracer; settings.own_modules: what loading it mapped."""
        from .engine import LeakEngine
        from .inprocess import mapped_modules

        before = mapped_modules()
        engine = _load(lambda: LeakEngine(settings, cls._tracer(config, settings)))
        settings.own_modules = mapped_modules() - before
        return engine

    @staticmethod
    def _tracer(config: pytest.Config, settings):
        return _new_tracer(settings)

    def _budget(self, item: pytest.Item):
        return item.stash.get(budget_key, self.engine.settings.default_budget)

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        default = self.engine.settings.default_budget
        for item in items:
            marker = item.get_closest_marker(MARKER)
            try:
                item.stash[budget_key] = resolve_budget(marker, default)
            except MarkerError as exc:
                item.stash[budget_key] = MarkerError(f"{item.nodeid}: {exc}")

    def _whole_test_window(self, budget) -> bool:
        s = self.engine.settings
        return s.in_process != "off" and s.in_process_scope == "test" and isinstance(budget, Budget) \
            and not budget.growth

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        budget = item.stash.get(budget_key, None)
        if isinstance(budget, MarkerError):
            raise _MarkerFailure(str(budget))
        self.engine.begin(budget if isinstance(budget, Budget) else None)
        if self._whole_test_window(budget):
            self.engine.open_window()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        budget = item.stash.get(budget_key, None)
        if self.engine.settings.in_process == "off" or not isinstance(budget, Budget) \
                or not self.engine.active():
            yield
            return
        if budget.growth:
            yield from self._growth_call(item, budget)
            return
        if self._whole_test_window(budget):
            yield
            return
        if growth.is_testcase(item):
            yield from self._testcase_method_window(item)
            return
        # no collect before: frees of older blocks during the window are no-ops
        self.engine.open_window()
        try:
            yield
        finally:
            self.engine.close_window(collect=True)

    def _testcase_method_window(self, item: pytest.Function):
        """Scope "call" for a unittest.TestCase test: the window covers the test
        method only — setUp and tearDown run inside pytest's call phase, but
        like a function's fixtures they are outside the call's window (scope
        "test" covers them). A method that never ran (setUp failed, skipped)
        gets an empty window."""
        engine, orig = self.engine, item.obj
        ran = []

        if inspect.iscoroutinefunction(orig):
            @functools.wraps(orig)
            async def method(*args, **kwargs):
                ran.append(True)
                engine.open_window()
                try:
                    return await orig(*args, **kwargs)
                finally:
                    engine.close_window(collect=True)

            # pytest's runtest leaves an async test to unittest, which looks the method up on the instance
            testcase = item.instance
            setattr(testcase, item.name, method)
            try:
                yield
            finally:
                delattr(testcase, item.name)
        else:
            @functools.wraps(orig)
            def method(*args, **kwargs):
                ran.append(True)
                engine.open_window()
                try:
                    return orig(*args, **kwargs)
                finally:
                    engine.close_window(collect=True)

            item.obj = method    # TestCaseFunction.runtest binds item.obj on the instance
            try:
                yield
            finally:
                item.obj = orig
        if not ran:
            engine.open_window()
            engine.close_window()

    def _growth_call(self, item: pytest.Item, budget: Budget):
        """Growth mode's call phase: a unittest.TestCase test is repeated whole
        here; a test function through pytest_pyfunc_call; any test that was
        not repeated (and did not fail or skip on its own) fails, naming why."""
        if growth.is_testcase(item):
            def repeated():
                growth.run_testcase_repetitions(self.engine, item, budget)
                item.stash[growth_ran_key] = True

            item.runtest = repeated      # what pytest's pytest_runtest_call calls
            try:
                outcome = yield
            finally:
                del item.runtest
        else:
            outcome = yield
        if outcome.excinfo is None and not item.stash.get(growth_ran_key, False):
            outcome.force_exception(pytest.fail.Exception(
                growth.unrepeatable(item, budget, growth.why_not_repeated(item)), pytrace=False))

    @pytest.hookimpl(tryfirst=True)
    def pytest_pyfunc_call(self, pyfuncitem: pytest.Function):
        budget = pyfuncitem.stash.get(budget_key, None)
        if not isinstance(budget, Budget) or not budget.growth or self.engine.settings.in_process == "off":
            return None
        ran = growth.run_repetitions(self.engine, pyfuncitem, budget)
        if not ran:   # a coroutine: its async plugin would run it once
            pytest.fail(growth.unrepeatable(pyfuncitem, budget, growth.why_not_repeated(pyfuncitem)), pytrace=False)
        pyfuncitem.stash[growth_ran_key] = True
        return ran

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
            if self.engine.settings.wait:
                self.engine.wait_for_processes(self.engine.settings.wait)
            result = self.engine.finish(item.nodeid, self._budget(item))
            item.stash[result_key] = result
            self._apply(item, report, result)

    def _finish_whole_test_window(self, item: pytest.Item, report: pytest.TestReport) -> None:
        """Scope "test": in-process figures arrive at teardown; a leak then
        fails the test at teardown (pytest shows it as an error)."""
        from .report import failure_text, headline

        budget = self._budget(item)
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
        """The test's verdict and report sections from its result."""
        from .report import failure_text, headline, incomplete_headline, kind_properties, within_budget_headline

        ip = result.in_process
        props = [
            ("leak_bytes", result.leaked.bytes),
            ("leak_blocks", result.leaked.blocks),
            ("leak_budget_bytes", result.budget.bytes if result.budget.checked and result.budget.bytes is not None else ""),
            ("leak_processes", len(result.processes)),
        ]
        if ip is not None:
            props.append(("leak_in_process_bytes", ip.leaked.bytes))
        props += kind_properties(result)
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
        item = self._item
        if item is not None and report.nodeid == item.nodeid:
            item.stash[reports_key].append(report)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem):
        item.stash[reports_key] = []
        self._item = item
        outcome = yield
        self._item = None
        if self.engine.active():
            # the test never reached its call report: interrupted (Ctrl-C, a
            # timeout plugin) or crashed. Report what its processes leaked so far.
            budget = self._budget(item)
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
            entry_outcome = _outcome(item.stash[reports_key]) if outcome.excinfo is None else "error"
            self.engine.record_json(result, entry_outcome, interrupted=outcome.excinfo is not None)

    def _leaked(self) -> int:
        return sum(r.leaked.bytes for r in self.engine.results)

    def pytest_unconfigure(self, config) -> None:
        self.engine.close()


class Standalone(Checker):
    """A session without xdist: checks its tests, reports them."""

    def __init__(self, config: pytest.Config, engine, notes: list[str], probe_problem: str | None = ""):
        super().__init__(config, engine)
        self.notes = notes   # the header's in-process notes
        self.probe_problem = probe_problem   # None: pymalloc is probed in the windows (_probe_pymalloc)

    @classmethod
    def start(cls, config: pytest.Config, settings) -> "Standalone":
        engine = cls._load_engine(config, settings)
        problem = _probe_pymalloc(engine.tracer, settings)
        notes = reexec.in_process_notes(probe_problem=problem) if settings.in_process != "off" else []
        return cls(config, engine, notes, problem)

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        lines = _tracer_lines(self.engine.tracer, self.engine.settings)
        mode = self.engine.settings.in_process
        lines.append(f"ebpf-leaks: in-process checking: {mode}" + (f"; {'; '.join(self.notes)}" if self.notes else ""))
        return lines

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Restart with PYTHONMALLOC=malloc once collection shows that extension
        modules are loaded (or in 'all' mode), so Python objects they leak
        are visible; a session without extensions keeps pymalloc's speed."""
        if session.config.getoption("collectonly"):
            return
        why = reexec.restart_reason(self.engine.settings.in_process, self.engine.settings.own_modules,
                                    probed=self.probe_problem is None)
        if why is not None:
            self.notes = reexec.in_process_notes(probe_problem=self.probe_problem, restart=True, why=why,
                                                 before_exec=self.engine.close)

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config) -> None:
        from .report import summary_lines, write_summary

        tr = terminalreporter
        write_summary(tr, summary_lines(self.engine.results), checked=len(self.engine.results),
                      leaked=self._leaked(), report_seconds=self.engine.report_seconds,
                      json_path=self.engine.settings.json_path, flamegraphs=self.engine.flamegraphs)
        if config.getoption("ebpf_leaks_gen_suppressions"):
            from .report import gen_suppressions

            leaking = [r for r in self.engine.results if r.leaked.blocks]
            tr.write_sep("-", "suggested suppressions (review before use)")
            text = gen_suppressions(leaking) if leaking else "# no leaking stacks"
            for line in text.splitlines():
                tr.write_line(line)

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        from .report import write_json_report

        write_json_report(session.config, self.engine.settings.json_path, self.engine.json_entries,
                          self.engine.session_info())


class DistWorker(Checker):
    """An xdist worker: checks its tests through the controller's tracer and
    hands its figures to the controller, which reports them (a worker's own
    terminal output is not shown)."""

    @classmethod
    def start(cls, config: pytest.Config, settings) -> "DistWorker":
        engine = cls._load_engine(config, settings)
        _probe_pymalloc(engine.tracer, settings)
        return cls(config, engine)

    @staticmethod
    def _tracer(config: pytest.Config, settings):
        return _controller_tracer(config) or _new_tracer(settings)

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        from .report import summary_lines

        self.config.workeroutput[WORKEROUTPUT_KEY] = json.dumps({
            "tests": self.engine.json_entries,
            "summary": summary_lines(self.engine.results),
            "flamegraphs": self.engine.flamegraphs,
            "checked": len(self.engine.results),
            "leaked": self._leaked(),
            "report_seconds": self.engine.report_seconds,
        })


class DistController:
    """The xdist controller: loads the one tracer and serves it (each
    allocation runs one BPF program however many workers); each worker checks
    its own tests through it; merges the workers' JSON entries and summaries."""

    def __init__(self, config: pytest.Config, settings, tracer, server, notes: list[str]):
        self.config = config
        self.settings = settings
        self.tracer = tracer
        self.server = server
        self.notes = notes   # the header's in-process notes
        self.entries: list[dict] = []
        self.summary: list = []
        self.flamegraphs: list = []
        self.checked = 0
        self.leaked = 0

    @classmethod
    def start(cls, config: pytest.Config, settings) -> "DistController":
        from .tracer.server import TracerServer

        tracer = _load(lambda: _new_tracer(settings))
        tracer.add_spawner(os.getpid())
        server = TracerServer(tracer)
        # workers cannot restart themselves (and the controller does not collect): their
        # pymalloc is probed in their windows when it can be (they run this interpreter), else
        # the header says how to make Python objects visible
        notes = (reexec.in_process_notes(probe_problem=_pymalloc_problem(tracer, settings, os.getpid()))
                 if settings.in_process != "off" else [])
        return cls(config, settings, tracer, server, notes)

    def pytest_report_header(self, config):
        lines = _tracer_lines(self.tracer, self.settings)
        lines.append(f"ebpf-leaks: distributed: the controller's tracer serves every xdist worker (each "
                     f"allocation runs one BPF program however many workers); in-process checking: "
                     f"{self.settings.in_process}")
        if self.settings.in_process != "off":
            lines[-1] += "".join(f"; {n}" for n in self.notes)
        return lines

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node):
        from .tracer.server import SOCKET_KEY

        node.workerinput[SOCKET_KEY] = self.server.address

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        data = getattr(node, "workeroutput", {}).get(WORKEROUTPUT_KEY)
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
    """The JSON entry's outcome from the test's setup, call and teardown reports."""
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
