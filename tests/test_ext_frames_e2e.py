"""End-to-end, real eBPF: the pytest process's own frames (libpython's and
the extension's) are named from the first test of a session, and a word the
BPF program found on the stack is shown as a frame only when it is a return
address."""

import os

import pytest

pytestmark = pytest.mark.ebpf



@pytest.fixture(scope="module")
def leakext(leakext_moddir):
    return str(leakext_moddir)


def _stack_lines(out: str, test: str) -> list[str]:
    """The frame lines of a test's first stack in the terminal output."""
    text = out.split(f"_ {test} _", 1)[1]
    text = text.split("#1 ", 1)[1]
    lines = []
    for line in text.splitlines()[1:]:
        if not line.startswith("      "):
            break
        lines.append(line.strip())
    return lines


def test_own_frames_are_named_from_the_first_test(pytester, run_plugin, leakext):
    pytester.makeconftest(f"import sys; sys.path.insert(0, {leakext!r})")
    pytester.makepyfile(test_first="""
        import leakext
        def test_raw_malloc_first():
            leakext.leak(3, 1000)
        def test_objects_second():
            leakext.leak_objects(2)
    """)
    result, doc = run_plugin("--ebpf-leaks-kinds=all")
    out = result.stdout.str()
    first, second = doc["tests"]
    assert first["in_process"]["leaked"] == {"bytes": 3000, "blocks": 3}
    for t in (first, second):
        (stack,) = t["in_process"]["stacks"]
        for f in stack["frames"]:
            assert f["module"] and f["function"] and f["file"] and f["line"], (t["nodeid"], f)
        assert not any("[unknown]" in line for line in _stack_lines(out, t["nodeid"].split("::")[-1]))
    inner = first["in_process"]["stacks"][0]["frames"][0]
    assert inner["function"] == "leakext_leak" and inner["file"].endswith("leakext.c")
    assert inner["module"].startswith(leakext)
    assert any(os.path.basename(f["module"]).startswith("libpython")
               for f in second["in_process"]["stacks"][0]["frames"])
    lines = _stack_lines(out, "test_raw_malloc_first")
    assert lines[0].startswith("leakext_leak+0x") and "leakext.c:" in lines[0]


def test_only_return_addresses_found_on_the_stack_are_frames(pytester, run_plugin, leakext):
    """leak_planted: strdup (libc) pushes a word the fixture planted in %rbx,
    which the BPF scan finds before the real return address."""
    pytester.makeconftest(f"import sys; sys.path.insert(0, {leakext!r})")
    pytester.makepyfile(test_planted="""
        import leakext
        def test_real_return_address():
            leakext.leak_planted(2)
        def test_function_pointer():
            leakext.leak_planted(2, "function")
        def test_inside_code():
            leakext.leak_planted(2, "code")
    """)
    result, doc = run_plugin("--ebpf-leaks-kinds=all")
    out = result.stdout.str()
    t = {x["nodeid"].split("::")[-1]: x["in_process"] for x in doc["tests"]}
    for name in t:
        assert t[name]["leaked"] == {"bytes": 18, "blocks": 2}, name     # strdup("planted!"): 9 B each
    (real,) = t["test_real_return_address"]["stacks"]
    assert [(f["function"], f.get("scanned", False)) for f in real["frames"]] == [
        ("strdup", False), ("leakext_strdup_planted", True)]
    assert real["frames"][1]["offset"] == 9                  # right after `call strdup`
    assert "(found on the stack) leakext_strdup_planted+0x9 (" in out
    for name in ("test_function_pointer", "test_inside_code"):
        (stack,) = t[name]["stacks"]
        assert [f["function"] for f in stack["frames"]] == ["strdup"], name
        assert "(found on the stack)" not in "\n".join(_stack_lines(out, name))
