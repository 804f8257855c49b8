"""Flame graphs of leaked memory: folded stacks and a self-contained SVG.

``folded`` writes Brendan Gregg's folded-stack format, read by flamegraph.pl,
inferno and speedscope: one line per distinct stack,
``comm (pid);outermost;...;innermost <weight>``. Those tools split a line at
its LAST space, so spaces inside frame labels (C++ names such as
``operator new(unsigned long)``) need no escaping; ``;`` separates frames, so a
``;`` inside a label is written as ``:``, and line breaks/tabs as spaces.

``svg`` renders folded text as a flame graph (root at the bottom, each frame a
rectangle whose width is proportional to its weight, hover tooltips giving
the label, the amount and the share of the total). It is one self-contained
file: no script, no external fonts or stylesheets.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Collection, Mapping, Sequence
from xml.sax.saxutils import escape as _xml_escape

from .atomic import write_text_atomic
from .report import format_frame

__all__ = ["folded", "frame_label", "parse_folded", "svg", "write_flamegraphs", "safe_file_stem"]

WEIGHTS = ("bytes", "blocks")
IN_PROCESS_ROOT = "pytest (in-process)"   # root frame of result.in_process stacks


# --------------------------------------------------------------------------
# Folded stacks
# --------------------------------------------------------------------------

_BREAKS = re.compile(r"[\r\n\t\v\f]")


def _clean(label: str) -> str:
    label = _BREAKS.sub(" ", label).replace(";", ":")
    return label.strip() or "[empty]"


def frame_label(frame: Mapping) -> str:
    """report.format_frame's "label" form (``function``, else ``[unknown]
    (module)``, else ``[unknown]``), made safe for a folded line."""
    return _clean(format_frame(frame, "label"))


def folded(result, *, weight: str = "bytes", skip: Collection[int] = ()) -> str:
    """Folded stacks of a TestLeakResult's leaked blocks, one line per
    distinct stack (identical label sequences are merged), sorted; stacks whose
    weight is 0 are left out. The root frame is ``comm (pid)``, or
    ``pytest (in-process)`` for ``result.in_process`` stacks. ``skip``: ids of StackLeak objects to leave out
    (e.g. ``SuppressionSummary.matches``)."""
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    totals: dict[str, int] = {}
    owners = [(_clean(f"{p.comm} ({p.pid})"), p.stacks) for p in result.processes]
    in_process = getattr(result, "in_process", None)
    if in_process is not None:
        owners.append((IN_PROCESS_ROOT, in_process.stacks))
    for root, stacks in owners:
        for s in stacks:
            if id(s) in skip:
                continue
            w = s.bytes if weight == "bytes" else s.blocks
            if w <= 0:
                continue
            if getattr(s, "captured", True) and s.frames:
                labels = [frame_label(f) for f in reversed(s.frames)]
            else:
                labels = ["[stack not captured]"]
            key = ";".join([root] + labels)
            totals[key] = totals.get(key, 0) + w
    return "".join(f"{k} {v}\n" for k, v in sorted(totals.items()))


def parse_folded(text: str) -> list[tuple[list[str], float]]:
    """(frames outermost first, weight) per line of folded text; blank lines
    are skipped, a line without a trailing number raises ValueError."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        if not line:
            continue
        stack, sep, num = line.rpartition(" ")
        try:
            w = float(num) if sep else None
        except ValueError:
            w = None
        if w is None or not stack or w < 0 or w != w or w == float("inf"):
            raise ValueError(f"folded line {n} is not '<frames> <weight>': {line!r}")
        out.append((stack.split(";"), int(w) if w == int(w) else w))
    return out


# --------------------------------------------------------------------------
# SVG
# --------------------------------------------------------------------------

class _Node:
    __slots__ = ("name", "value", "children")

    def __init__(self, name: str):
        self.name = name
        self.value = 0
        self.children: dict[str, _Node] = {}


def _tree(stacks: Sequence[tuple[list[str], float]]) -> _Node:
    root = _Node("all")
    for frames, w in stacks:
        root.value += w
        node = root
        for name in frames:
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = _Node(name)
            child.value += w
            node = child
    return root


def _color(name: str) -> str:
    """Deterministic warm color from the label (flamegraph.pl's 'hot' palette)."""
    h = hashlib.sha1(name.encode("utf-8", "surrogatepass")).digest()
    v1, v2, v3 = h[0] / 255, h[1] / 255, h[2] / 255
    if name.startswith("[unknown]") or name == "[stack not captured]":
        return f"rgb({180 + int(40 * v1)},{180 + int(40 * v1)},{180 + int(40 * v1)})"
    return f"rgb({205 + int(50 * v3)},{int(230 * v1)},{int(55 * v2)})"


def _amount(v: float, unit: str) -> str:
    n = f"{v:,}" if isinstance(v, int) else f"{v:,.2f}"
    if unit == "bytes":
        return f"{n} B"
    if unit == "blocks":
        return f"{n} block{'s' if v != 1 else ''}"
    return f"{n} {unit}".rstrip()


def _attr(s: str) -> str:
    return _xml_escape(s, {'"': "&quot;"})


def svg(folded_text: str, *, title: str, unit: str = "bytes", width: int = 1200,
        frame_height: int = 16, font_size: float = 12.0) -> str:
    """A self-contained SVG flame graph of folded stacks: one rectangle per
    node of the merged stack tree (root 'all' at the bottom), widths
    proportional to weight, hover ``<title>`` with label, amount and percentage,
    labels truncated to fit, colors derived from the label."""
    stacks = parse_folded(folded_text)
    root = _tree(stacks)
    pad_x, top, bottom = 10, 48, 24
    inner = width - 2 * pad_x
    depth = 0

    def measure(node: _Node, d: int) -> None:
        nonlocal depth
        depth = max(depth, d)
        for c in node.children.values():
            measure(c, d + 1)

    measure(root, 0)
    height = top + (depth + 1) * frame_height + bottom
    char_w = font_size * 0.59
    total = root.value
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        "<style>text{font-family:Verdana,'DejaVu Sans',sans-serif;fill:#000}"
        ".t{font-size:%gpx}.h{font-size:17px}.s{font-size:12px;fill:#555}"
        "g.f:hover rect{stroke:#000;stroke-width:0.6}</style>" % font_size,
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#f8f8f8"/>',
        f'<text class="h" x="{width / 2:g}" y="22" text-anchor="middle">{_xml_escape(title)}</text>',
        f'<text class="s" x="{width / 2:g}" y="38" text-anchor="middle">'
        f'{_xml_escape(f"leaked {_amount(total, unit)}; width = share of {unit}")}</text>',
    ]
    if total <= 0:
        out.append(f'<text class="s" x="{width / 2:g}" y="{top + frame_height:g}" '
                   'text-anchor="middle">no leaked memory</text>')
        out.append("</svg>")
        return "\n".join(out) + "\n"

    def emit(node: _Node, x: float, d: int) -> None:
        w = inner * node.value / total
        y = height - bottom - (d + 1) * frame_height
        pct = 100.0 * node.value / total
        tip = f"{node.name} ({_amount(node.value, unit)}, {pct:.2f}%)"
        out.append(f'<g class="f"><title>{_xml_escape(tip)}</title>'
                   f'<rect x="{x:.3f}" y="{y}" width="{w:.3f}" height="{frame_height - 1}" '
                   f'fill="{_color(node.name)}" rx="2" ry="2"/>')
        fit = int((w - 6) // char_w)
        if fit >= 3:
            text = node.name if len(node.name) <= fit else node.name[:fit - 2] + ".."
            out.append(f'<text class="t" x="{x + 3:.3f}" y="{y + frame_height - 4.5:g}">'
                       f'{_xml_escape(text)}</text>')
        out.append("</g>")
        cx = x
        for c in sorted(node.children.values(), key=lambda n: n.name):
            emit(c, cx, d + 1)
            cx += inner * c.value / total

    emit(root, float(pad_x), 0)
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------

def safe_file_stem(nodeid: str, max_len: int = 120) -> str:
    """A file name stem for a test nodeid: only ``[A-Za-z0-9._-]``, never
    hidden or a path, with a short hash of the full nodeid so that nodeids
    that differ only in replaced characters never collide."""
    digest = hashlib.sha1(nodeid.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid).strip("._-")
    stem = re.sub(r"\.{2,}", ".", stem)[:max_len].rstrip("._-")
    return f"{stem or 'test'}-{digest}"


def write_flamegraphs(result, outdir: str | os.PathLike, *, weight: str = "bytes",
                      skip: Collection[int] = ()) -> tuple[str, str]:
    """Write ``<stem>.folded`` and ``<stem>.svg`` for a TestLeakResult into
    ``outdir`` (created if needed); returns (folded_path, svg_path)."""
    outdir = os.fspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    stem = safe_file_stem(result.nodeid)
    text = folded(result, weight=weight, skip=skip)
    folded_path = os.path.join(outdir, stem + ".folded")
    svg_path = os.path.join(outdir, stem + ".svg")
    write_text_atomic(folded_path, text)
    write_text_atomic(svg_path, svg(text, title=f"Leaked {weight}: {result.nodeid}", unit=weight))
    return folded_path, svg_path
