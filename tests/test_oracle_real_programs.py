"""Exactness against the valgrind oracle on real programs nobody here wrote:
per process, outstanding bytes/blocks and lifetime totals must be equal to
valgrind's "in use at exit" and "total heap usage"."""

import json
import os
import random
import shutil
import subprocess

import pytest

import oracle

pytestmark = pytest.mark.ebpf

ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": "/tmp", "TZ": "UTC"}


def _workload(tmp):
    rnd = random.Random(7)
    (tmp / "words.txt").write_text("\n".join(f"{rnd.randrange(10**9)} w{rnd.randrange(5000)}" for _ in range(20000)) + "\n")
    (tmp / "data.json").write_text(json.dumps({"items": [{"id": i, "tags": [f"t{i % 7}", "x" * (i % 13)]} for i in range(300)]}))
    (tmp / "script.sql").write_text(
        "create table t(a integer, b text);\n"
        "with recursive c(x) as (select 1 union all select x+1 from c where x < 5000) "
        "insert into t select x, hex(randomblob(8)) from c;\n"
        "create index ti on t(b);\nselect count(*), sum(a) from t;\n"
    )
    (tmp / "blob.bin").write_bytes(bytes(rnd.randrange(256) for _ in range(200000)))
    return {
        "ls": ["ls", "-la", "/usr/bin"],
        "sort": ["sort", "-k2", str(tmp / "words.txt")],
        "sqlite3": ["sh", "-c", f"exec sqlite3 :memory: < {tmp / 'script.sql'}"],
        "jq": ["jq", "-c", ".items[] | select(.id % 50 == 0)", str(tmp / "data.json")],
        "xz": ["xz", "-c", "-1", str(tmp / "blob.bin")],
        "uniq": ["sh", "-c", f"sort {tmp / 'words.txt'} | uniq -c | sort -n | tail -3"],
    }


def test_real_programs_match_valgrind(pytester, run_plugin, tmp_path):
    missing = [p for p in ("sqlite3", "jq", "xz", "valgrind") if not shutil.which(p)]
    if missing:
        pytest.fail(f"missing programs for the oracle test: {missing} (make test installs them)")
    cmds = _workload(tmp_path)
    pytester.makepyfile(test_real=f"""
        import subprocess, pytest
        CMDS = {cmds!r}
        ENV = {ENV!r}
        @pytest.mark.leak_budget(None)
        @pytest.mark.parametrize("name", sorted(CMDS))
        def test_cmd(name):
            subprocess.run(CMDS[name], env=ENV, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, check=True)
    """)
    result, doc = run_plugin()
    result.assert_outcomes(passed=len(cmds))
    got = {t["nodeid"].split("[")[1].rstrip("]"): t for t in doc["tests"]}
    checked = 0
    for name, argv in sorted(cmds.items()):
        with open(os.devnull, "wb") as devnull:
            vg = oracle.run_valgrind(argv, env=ENV, stdout=devnull, timeout=300)
        ours = [p for p in got[name]["processes"]]
        # the shells' own figures depend on valgrind's extra environment variables
        # (dash copies the environment): compare every non-shell process
        ref = [h for h in vg.heaps.values() if os.path.basename(h.exe or "") not in ("sh", "dash")]
        ours = [p for p in ours if p["comm"] not in ("sh",)]
        assert len(ours) == len(ref), (name, [p["comm"] for p in ours], [h.command for h in ref])
        key_ours = sorted((p["outstanding"]["bytes"], p["outstanding"]["blocks"], p["allocated"]["blocks"]) for p in ours)
        key_ref = sorted((h.in_use_bytes, h.in_use_blocks, h.total_allocs) for h in ref)
        assert key_ours == key_ref, name
        checked += len(ours)
    assert checked >= 8
    assert sum(p['outstanding']['blocks'] for t in doc['tests'] for p in t['processes']) > 1000
