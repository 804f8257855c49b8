"""The plugin against the fixtures' exact expectations (tests/fixtures/expected.py,
themselves verified against valgrind and a gdb tracer in test_oracle_fixtures.py):
every process tree, every allocator, every way to exit."""

import json
import os

import pytest

import oracle

pytestmark = pytest.mark.ebpf

E = oracle.load_expected()
# a pty for fd 1 is not what a test's subprocess gets; every other case runs
CASES = [c for c in E.CASES.values() if c.stdout in ("pipe", "file", "devnull")]


def test_fixture_cases_are_exact(pytester, run_plugin, tmp_path):
    built = {k: str(v) for k, v in oracle.build_fixtures().items()}
    cmds = {c.id: (c.argv(built), c.stdout) for c in CASES}
    pytester.makepyfile(test_cases=f"""
        import subprocess, pytest, tempfile
        CMDS = {cmds!r}
        @pytest.mark.leak_budget(None)
        @pytest.mark.parametrize("cid", sorted(CMDS))
        def test_case(cid):
            argv, out = CMDS[cid]
            if out == "file":
                with tempfile.TemporaryFile() as f:
                    subprocess.run(argv, stdout=f, stderr=subprocess.DEVNULL)
            elif out == "devnull":
                subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            else:
                subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    """)
    result, doc = run_plugin("-p", "no:randomly")
    result.assert_outcomes(passed=len(CASES))
    got = {t["nodeid"].split("[", 1)[1][:-1]: t for t in doc["tests"]}
    problems = {}
    for case in CASES:
        procs = got[case.id]["processes"]
        pids = {p["pid"] for p in procs}
        roots = [p for p in procs if p["ppid"] not in pids]
        assert len(roots) == 1, (case.id, procs)
        observed = [{"pid": p["pid"], "ppid": p["ppid"], "exe": p["exe"] or p["comm"],
                     "bytes": p["outstanding"]["bytes"], "blocks": p["outstanding"]["blocks"]} for p in procs]
        errs = E.compare(case, observed, roots[0]["pid"], view="contract")
        root = roots[0]
        if case.returncode < 0:
            if root["signal"] != -case.returncode:
                errs.append(f"signal {root['signal']} != {-case.returncode}")
        elif root["exit_code"] != case.returncode:
            errs.append(f"exit code {root['exit_code']} != {case.returncode}")
        if any(p["running_at_test_end"] for p in procs):
            errs.append("a process was still running")
        if errs:
            problems[case.id] = errs
    assert not problems, json.dumps(problems, indent=1)
    assert len(CASES) >= 30
