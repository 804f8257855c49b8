"""Reporting, the end of the result pipeline: every text the plugin shows —
the failure's headline (and the incomplete one), the budget, frames (one
formatter for stacks, flame graph labels and generated suppressions), the
failure text (terminal and JUnit body), the suppressions used, the generated
suppressions, the end-of-run summary — and the JSON report (schema version 1)."""

from __future__ import annotations

import re
import signal as _signal
from typing import TYPE_CHECKING, Iterable, Mapping

from .accounting import ProcessLeak, StackLeak, TestLeakResult
from .atomic import write_json_atomic
from .sizes import format_blocks, format_bytes
from .suppressions import DEFAULT_SUPPRESSIONS, suppression_target
from .verdict import Problem, Verdict

if TYPE_CHECKING:
    from .marks import Budget

JSON_VERSION = 1


FRAME_STYLES = ("stack", "label", "symbol")


def format_frame(f, style: str = "stack") -> str:
    """The one frame formatter; `f` is a frame dict (resolve.frame_dict) or
    a symbolize.Frame.

    "stack" (terminal and JUnit stacks): ``function+0xoff (module) at file:line``,
    ``[unknown] (module)``, ``0xip [unknown]`` or ``[stack not captured]``;
    "label" (flame graph frames, gen-suppressions' innermost frame): the
    function, else ``[unknown] (module)``, else ``[unknown]``;
    "symbol" (the symbolizer's own view): build-id and file-offset details
    for frames it could not place in a module."""
    get = f.get if isinstance(f, Mapping) else (lambda k, _f=f: getattr(_f, k, None))
    fn, module, off, addr = get("function"), get("module"), get("offset"), get("address")
    if style == "label":
        if fn:
            return fn
        return f"[unknown] ({module})" if module else "[unknown]"
    if style == "symbol":
        bid = get("build_id")
        if fn is not None:
            s = f"{fn}+0x{(off or 0):x} ({module if module else f'build-id {bid}'})"
        elif module is not None:
            s = f"[unknown] ({module}+0x{(addr or 0):x})"
        elif bid is not None:
            s = f"[unknown] (build-id {bid}+0x{(addr or 0):x})"
        elif addr is not None:
            s = f"0x{addr:x} [unknown]"
        else:
            s = "[unknown]"
        if get("file") and get("line"):
            s += f" at {get('file')}:{get('line')}"
        return s
    if style != "stack":
        raise ValueError(f"frame style must be one of {FRAME_STYLES}, got {style!r}")
    if fn:
        s = f"{fn}+{off:#x}" if off is not None else fn
        s += f" ({module})" if module else ""
    elif module:
        s = f"[unknown] ({module}+{off:#x})" if off is not None else f"[unknown] ({module})"
    elif addr is not None:
        s = f"{addr:#x} [unknown]"
    else:
        s = "[stack not captured]"
    if get("file"):
        s += f" at {get('file')}" + (f":{get('line')}" if get("line") else "")
    return s


def budget_text(budget: Budget) -> str:
    """``budget 1,024 B``, ``budget 1,024 B, 3 blocks``, ``budget none`` or ``budget off``."""
    if not budget.checked:
        return "budget off"
    parts = []
    if budget.bytes is not None:
        parts.append(format_bytes(budget.bytes))
    if budget.blocks is not None:
        parts.append(format_blocks(budget.blocks))
    return "budget " + (", ".join(parts) if parts else "none")


def _per_repetition(result: TestLeakResult) -> str:
    """" per repetition" when the whole leaked figure is growth mode's
    per-repetition one (no launched process leaked)."""
    ip = result.in_process
    return " per repetition" if ip is not None and ip.growth and not result.leaking_processes else ""


def headline(result: TestLeakResult) -> str:
    """The failure's first line, self-contained. Each figure once: the
    in-process part is given apart only when processes leaked too."""
    n_leaking = len(result.leaking_processes)
    procs = f"{n_leaking} of {len(result.processes)} process{'es' if len(result.processes) != 1 else ''}"
    amount = f"{format_bytes(result.leaked.bytes)} in {format_blocks(result.leaked.blocks)}"
    ip = result.in_process
    if ip is not None and (ip.leaked.bytes or ip.leaked.blocks):
        if not n_leaking:
            return (f"leak budget exceeded: {amount} leaked in-process{_per_repetition(result)} "
                    f"({budget_text(result.budget)})")
        per = " per repetition" if ip.growth else ""
        where = f"in-process ({format_bytes(ip.leaked.bytes)}{per}) and by {procs}"
        return f"leak budget exceeded: {amount} leaked {where} ({budget_text(result.budget)})"
    return f"leak budget exceeded: {amount} leaked by {procs} ({budget_text(result.budget)})"


_headline = headline   # failure_text's keyword argument `headline` hides the function


# verdict.Problem code -> its sentence (the Problem's fields by name)
PROBLEM_TEXTS = {
    "in_process_lost": "{n:,} allocations of the pytest process were not recorded "
                       "(a map was full: raise --ebpf-leaks-max-blocks)",
    "lost_blocks": "{n:,} allocations of pid {pid} ({comm}) were not recorded: the live-block map was full "
                   "(raise --ebpf-leaks-max-blocks)",
    "lost_handoffs": "{n:,} allocator calls of pid {pid} ({comm}) were not recorded: the hand-off map was full "
                     "(too many threads inside the allocator at once)",
    "not_covered": "pid {pid} ({comm}, {exe}): allocations not visible, {reason}",
    "lost_processes": "{n:,} processes could not be tracked: the process map was full "
                      "(raise --ebpf-leaks-max-processes)",
    "lost_stacks": "{n:,} stacks of pid {pid} ({comm}) were not captured (stack map full: raise "
                   "--ebpf-leaks-max-stacks); byte counts are still exact",
    "lost_events": "{n:,} exec/open events were lost (ring buffer full): some frames may not be symbolized",
}


def problem_text(p: Problem) -> str:
    """The sentence of one verdict problem (verdict.Problem)."""
    return PROBLEM_TEXTS[p.code].format(n=p.n, pid=p.pid, comm=p.comm, exe=p.exe or "?",
                                        reason=p.reason or "its allocator is not probed")


def render_problems(result: TestLeakResult, verdict: Verdict) -> TestLeakResult:
    """Write the verdict's problems into `result` as text: `incomplete`, and
    the verdict's warnings first in `warnings` (warnings others added since a
    previous render stay, after them)."""
    result.incomplete = [problem_text(p) for p in verdict.incomplete]
    mine = [problem_text(p) for p in verdict.warnings]
    result.warnings = mine + result.warnings[result.verdict_warnings:]
    result.verdict_warnings = len(mine)
    return result


def incomplete_headline(result: TestLeakResult) -> str:
    return "leak tracking incomplete: " + "; ".join(result.incomplete)


def within_budget_headline(result: TestLeakResult) -> str:
    """The first line of the report section of a test that leaked within its budget."""
    return (f"leaked {result.leaked.bytes:,} B in {result.leaked.blocks:,} blocks{_per_repetition(result)} "
            f"(within {budget_text(result.budget)})")


def suppressions_used_lines(result: TestLeakResult) -> list[str]:
    """The failure text's "Suppressions used:" block (empty when nothing was suppressed)."""
    if not result.suppressions_used:
        return []
    lines = ["Suppressions used:"]
    for u in result.suppressions_used:
        lines.append(f"  {u['stacks']:>5,} stacks {format_bytes(u['bytes']):>12} in {format_blocks(u['blocks'])}: "
                     f"leak:{u['pattern']} ({suppression_source(u['pattern'], u['source'])})")
    return lines


def suppression_source(pattern: str, source: str) -> str:
    """Where a used suppression comes from, as the reports print it. A
    default whose pattern alone would match every stack (the dynamic loader's
    ``*``) says what confines it, so it cannot be read as ``leak:*``."""
    if source != "default" or pattern.strip("*^$"):
        return source
    s = next((d for d in DEFAULT_SUPPRESSIONS if d.pattern == pattern and d.modules), None)
    if s is None:
        return source
    frames = "the innermost frame" if s.top_frames == 1 else f"the {s.top_frames} innermost frames"
    mods = ", ".join(s.modules[:-1]) + f" or {s.modules[-1]}" if len(s.modules) > 1 else s.modules[0]
    return f"default: only when {frames} {'is' if s.top_frames == 1 else 'are'} in {mods}"


def suppressions_table(used) -> list[str]:
    """LSan-like "Suppressions used:" table of suppressions.SuppressionUse rows
    (empty when nothing was suppressed)."""
    if not used:
        return []
    rows = [(f"{u.stacks:,}", f"{u.bytes:,}", f"{u.blocks:,}", u.pattern, suppression_source(u.pattern, u.source))
            for u in used]
    head = ("stacks", "bytes", "blocks", "pattern", "source")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    lines = ["Suppressions used:"]
    for r in [head] + rows:
        lines.append(f"  {r[0]:>{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:<{w[3]}}  {r[4]}")
    return lines


def _status(p: ProcessLeak) -> str:
    if p.running_at_test_end:
        return "running"
    if p.signal:
        try:
            return _signal.Signals(p.signal).name
        except ValueError:
            return f"signal {p.signal}"
    if p.exit_code is not None:
        return f"exit {p.exit_code}"
    return "exited"


KIND_TEXT = {"definite": "definitely lost", "indirect": "indirectly lost", "possible": "possibly lost",
             "reachable": "still reachable", "unclassified": "unclassified"}
_KIND_ORDER = {"definite": 0, "indirect": 0, "unclassified": 1, "possible": 2, "reachable": 3}


def _amount_text(a) -> str:
    return f"{format_bytes(a.bytes)} in {format_blocks(a.blocks)}" if a.blocks or a.bytes else "-"


def process_table(result: TestLeakResult) -> list[str]:
    rows = [("pid", "ppid", "comm", "status", "leaked", "lost", "possible", "reachable", "unclassified",
             "allocated (lifetime)", "exe")]
    for p in result.processes:
        rows.append((
            str(p.pid), str(p.ppid), p.comm, _status(p),
            f"{format_bytes(p.leaked.bytes)} in {format_blocks(p.leaked.blocks)}",
            _amount_text(p.kind_amount("definite", "indirect")), _amount_text(p.kind_amount("possible")),
            _amount_text(p.kind_amount("reachable")), _amount_text(p.kind_amount("unclassified")),
            f"{format_bytes(p.allocated.bytes)} in {format_blocks(p.allocated.blocks)}",
            p.exe or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    for p in result.processes:
        if not p.classified and p.reason and p.outstanding.blocks:
            lines.append(f"  pid {p.pid} ({p.comm}): its blocks are unclassified: {p.reason}")
    return lines


def kind_properties(result: TestLeakResult) -> list[tuple[str, int]]:
    """JUnit properties: the test's processes' outstanding bytes per leak kind."""
    return [(f"leak_{k}_bytes", sum(p.kind_amount(k).bytes for p in result.processes))
            for k in ("definite", "indirect", "possible", "reachable")]


def top_stacks(result: TestLeakResult, *, max_stacks: int = 10, max_frames: int = 16) -> list[str]:
    entries: list[tuple[StackLeak, object]] = [
        (s, p) for p in result.processes for s in p.stacks if not s.suppressed
    ]
    if result.in_process is not None:
        entries += [(s, None) for s in result.in_process.stacks if not s.suppressed]
    entries.sort(key=lambda e: (_KIND_ORDER.get(e[0].kind, 1) if e[1] is not None or result.in_process.classified
                                else 1, -e[0].bytes, -e[0].blocks))
    lines = []
    truncated_hint = False
    per = " per repetition" if result.in_process is not None and result.in_process.growth else ""
    for i, (s, p) in enumerate(entries[:max_stacks], 1):
        origin = f"pid {p.pid} ({p.comm})" if p is not None else "the pytest process (in-process)"
        named = p is not None or result.in_process.classified   # an unclassified window's stacks: as before
        kind = f" {KIND_TEXT.get(s.kind, s.kind)}" if named else per
        lines.append(f"  #{i} {format_bytes(s.bytes)} in {format_blocks(s.blocks)}{kind} from {origin}:")
        for f in s.frames[:max_frames]:
            lines.append(f"      {'(found on the stack) ' if f.get('scanned') else ''}{format_frame(f)}")
        if len(s.frames) > max_frames:
            lines.append(f"      ... {len(s.frames) - max_frames} more frames")
        if s.captured and len(s.frames) <= 2:
            truncated_hint = True
    if len(entries) > max_stacks:
        rest = entries[max_stacks:]
        lines.append(
            f"  ... and {len(rest)} more stacks with {format_bytes(sum(s.bytes for s, _ in rest))} "
            f"in {format_blocks(sum(s.blocks for s, _ in rest))}"
        )
    if truncated_hint:
        lines.append(
            "  (short stacks: the code was probably built without frame pointers; "
            "build with -fno-omit-frame-pointer for full stacks)"
        )
    return lines


def _window_kinds_text(ip) -> str:
    """`` (lost ..., possible ..., reachable ..., unclassified ...)`` of a
    classified window's outstanding blocks, as the process table gives them."""
    if not ip.classified:
        return ""
    parts = [("lost", ip.kind_amount("definite", "indirect")), ("possible", ip.kind_amount("possible")),
             ("reachable", ip.kind_amount("reachable")), ("unclassified", ip.kind_amount("unclassified"))]
    return " (" + ", ".join(f"{name} {_amount_text(a)}" for name, a in parts) + ")"


def in_process_lines(result: TestLeakResult) -> list[str]:
    ip = result.in_process
    if ip is None:
        return []
    if ip.growth:
        # one scale: per measured repetition (the window's totals over their number)
        m = max(len(ip.growth.get("per_repetition", ())), 1)
        lines = [f"  in-process ({ip.mode}), per repetition (mean of {m:,}): leaked {format_bytes(ip.leaked.bytes)} "
                 f"in {format_blocks(ip.leaked.blocks)}; outstanding {format_bytes(ip.outstanding.bytes // m)} in "
                 f"{format_blocks(ip.outstanding.blocks // m)}; allocated {format_bytes(ip.allocated.bytes // m)} in "
                 f"{format_blocks(ip.allocated.blocks // m)}"]
    else:
        lines = [f"  in-process ({ip.mode}): leaked {format_bytes(ip.leaked.bytes)} in "
                 f"{format_blocks(ip.leaked.blocks)}; outstanding {format_bytes(ip.outstanding.bytes)} in "
                 f"{format_blocks(ip.outstanding.blocks)}{_window_kinds_text(ip)}; allocated "
                 f"{format_bytes(ip.allocated.bytes)} in {format_blocks(ip.allocated.blocks)}"]
    if ip.growth:
        g = ip.growth
        reps = ", ".join(f"+{d['bytes']:,} B/{d['blocks']:,}" for d in g.get("deltas", []))
        lines.append(f"  growth mode: warmup {g['warmup']}, repeat {g['repeat']}; growth per repetition: {reps}"
                     f" -> {'keeps growing' if g.get('growing') else 'not growing'}")
    return lines


def failure_text(result: TestLeakResult, *, headline: str | None = None) -> str:
    lines = [headline or _headline(result), ""]
    if result.processes:
        lines += process_table(result)
    lines += in_process_lines(result)
    if result.leaked.blocks:
        lines += ["", "Top leaking stacks (lost memory first, then largest):"]
        lines += top_stacks(result)
    used = suppressions_used_lines(result)
    if used:
        lines += [""] + used
    for w in result.incomplete:
        lines.append(f"INCOMPLETE: {w}")
    for w in result.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def summary_lines(results: Iterable[TestLeakResult]) -> list[tuple[str, str]]:
    """(severity, line) per test that leaked or was incompletely tracked:
    severity 'fail' (over budget / incomplete) or 'note' (leaked within budget)."""
    lines = []
    for r in results:
        if r.over_budget:
            lines.append(("fail", f"{r.nodeid}: {headline(r)}"))
        elif r.incomplete:
            lines.append(("fail", f"{r.nodeid}: {incomplete_headline(r)}"))
        elif r.leaked.blocks:
            lines.append(("note", f"{r.nodeid}: leaked {format_bytes(r.leaked.bytes)} in "
                                  f"{format_blocks(r.leaked.blocks)}{_per_repetition(r)} " + (f"(within {budget_text(r.budget)})" if r.budget.checked else "(budget off)")))
    return lines


def json_report(entries: Iterable[dict], *, session: dict | None = None) -> dict:
    doc = {"version": JSON_VERSION, "tests": list(entries)}
    if session:
        doc["session"] = session
    return doc


def write_summary(tr, lines: list, *, checked: int, leaked: int, report_seconds: float | None = None,
                  json_path: str | None = None, flamegraphs: Iterable = ()) -> None:
    """The end-of-run "ebpf leak summary" section on pytest's terminal reporter."""
    failing = sum(1 for sev, _ in lines if sev == "fail")
    timing = f"; report time {report_seconds:.2f} s" if report_seconds is not None else ""
    tr.write_sep("=", "ebpf leak summary")
    tr.write_line(f"{checked} tests checked, {failing} over budget or incomplete; "
                  f"{leaked:,} B leaked in total{timing}")
    for sev, line in lines:
        tr.write_line(line, red=sev == "fail", yellow=sev == "note")
    if json_path:
        tr.write_line(f"JSON leak report: {json_path}")
    for folded, svg in flamegraphs:
        tr.write_line(f"flame graph: {svg} (folded stacks: {folded})")


def write_json_report(config, path: str | None, entries: list, session: dict | None = None) -> None:
    """Write the JSON report; an OS error is reported on the terminal, not raised."""
    if not path:
        return
    try:
        write_json_atomic(path, json_report(entries, session=session))
    except OSError as exc:
        config.get_terminal_writer().line(f"ebpf-leaks: could not write the JSON report {path!r}: {exc}", red=True)


def gen_suppressions(results, summary=None) -> str:
    """Ready-to-paste ``leak:`` entries for each leaking, unsuppressed stack of a
    TestLeakResult (or of several), largest first, one entry per distinct
    pattern, each after a comment giving bytes/blocks and the test(s).

    The entry names the innermost frame with a function name that is not in
    the C/C++ runtime (libc, ld.so, libstdc++, libgcc_s) or the Python
    interpreter (python3.X, libpython) and is not an entry
    point (main, start_thread, ...): an exact ``^function$``. Without one, the
    innermost unnamed frame's module, as ``/basename$`` (that file in any
    directory), unless it is the process's executable. Stacks with neither get
    a comment only: suppressing libc, libstdc++, main or the whole program
    would hide every leak (suppressions.suppression_target chooses).
    `summary` (suppressions.apply): stacks it hides are left out, and so are
    stacks of leak kinds the test's budget does not count."""
    if hasattr(results, "processes"):
        results = [results]
    entries: dict[str, list] = {}   # pattern -> [bytes, blocks, stacks, tests, what]
    orphans: list[str] = []
    matched = summary.matches if summary is not None else {}
    for r in results:
        owners = [(p, f"pid {p.pid} ({p.comm})", p.exe) for p in r.processes]
        in_process = getattr(r, "in_process", None)
        if in_process is not None:
            owners.append((in_process, "the pytest process (in-process)", None))
        counts = r.budget.kinds
        for p, who, exe in owners:
            for s in p.stacks:
                if id(s) in matched or not (s.blocks or s.bytes):
                    continue
                if s.kind not in (p.kinds if p is in_process else counts):
                    continue   # a kind the budget does not count (still reachable, ...)
                where = f"{who} in {r.nodeid}"
                if not getattr(s, "captured", True):
                    orphans.append(f"# {s.bytes:,} B in {s.blocks:,} block(s) by {where}: stack not captured")
                    continue
                pattern, what = suppression_target(s.frames, exe)
                if pattern is None:
                    inner = s.frames[0] if s.frames else {}
                    label = format_frame(dict(inner, module=inner.get("module") or "?"), "label")
                    orphans.append(
                        f"# {s.bytes:,} B in {s.blocks:,} block(s) by {where}: no function outside the "
                        f"C/C++ runtime and the program's entry points to suppress by (innermost: {label})"
                    )
                    continue
                e = entries.setdefault(pattern, [0, 0, 0, [], what])
                e[0] += s.bytes
                e[1] += s.blocks
                e[2] += 1
                if r.nodeid not in e[3]:
                    e[3].append(r.nodeid)
    lines: list[str] = []

    def one_line(text: str) -> str:  # a comment must not spill onto the next line
        return re.sub(r"[\x00-\x1f\x7f]", " ", text)

    for pattern, (nbytes, nblocks, nstacks, tests, what) in sorted(
            entries.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0])):
        t = tests[0] + (f" and {len(tests) - 1} more test(s)" if len(tests) > 1 else "")
        stacks = f" from {nstacks} stacks" if nstacks > 1 else ""
        lines.append(one_line(f"# {nbytes:,} B in {nblocks:,} block(s){stacks} leaked in {t}; {what}"))
        lines.append(f"leak:{pattern}")
    lines.extend(one_line(o) for o in orphans)
    return "\n".join(lines) + ("\n" if lines else "")
