"""Inline SVG charts: paired per-layer bars (MACs; latency with its spread) and the speedup curve.

Labels never overlap: the curve labels only the points of its Pareto front, and only those whose label
box (estimated generously from the text length, :data:`CHAR_W`) fits the plot without touching a label
placed before it; every point keeps its full description in a hover ``<title>``. The same estimate lets
tests check the geometry without a browser (:func:`text_boxes`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rewriter.html_report._markup import (
    AFTER_COLOUR,
    BEFORE_COLOUR,
    FRONT_COLOUR,
    UNCHANGED_COLOUR,
    e,
    fmt_ms,
    nice_ticks,
    short,
)
from rewriter.html_report.layers import LayerRow

#: Most bars drawn per chart; the largest layers are kept (in graph order) and the rest counted.
MAX_BARS = 150
#: Width of one character of an 11px label, generous (DejaVu Sans digits are 0.64 em, 7.0 px).
CHAR_W = 7.2
#: Height of an 11px label's box: 11px above the baseline, 3px below.
LABEL_ASCENT, LABEL_DESCENT = 11.0, 3.0


# -- geometry ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float

    def overlaps(self, other: Box) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1

    def inside(self, other: Box) -> bool:
        return other.x0 <= self.x0 and self.x1 <= other.x1 and other.y0 <= self.y0 and self.y1 <= other.y1


def label_box(x: float, y: float, text: str, anchor: str = "start") -> Box:
    """The estimated box of an 11px label drawn at ``(x, y)`` (its baseline) with ``text-anchor``."""
    w = len(text) * CHAR_W
    x0 = x if anchor == "start" else x - w if anchor == "end" else x - w / 2
    return Box(x0, y - LABEL_ASCENT, x0 + w, y + LABEL_DESCENT)


_TEXT_RE = re.compile(r'<text x="([-0-9.]+)" y="([-0-9.]+)"(?: text-anchor="(\w+)")? class="(?:pl|ax|lb|lb touched|vl|lg)">(?:<title>.*?</title>)?([^<]*)</text>')


def text_boxes(svg: str) -> list[tuple[str, Box]]:
    """Estimated boxes of the labels of a chart (point labels, ticks, row names, values, legends; not the
    rotated axis title), read back from its markup."""
    import html

    out = []
    for x, y, anchor, raw in _TEXT_RE.findall(svg):
        text = html.unescape(raw)
        out.append((text, label_box(float(x), float(y), text, anchor or "start")))
    return out


# -- bars ----------------------------------------------------------------------------------------------
def _select(rows: Sequence[LayerRow], value: Callable[[LayerRow], tuple[float | None, float | None]]) -> tuple[list[LayerRow], int]:
    """Rows with a non-zero value on either side; at most MAX_BARS (the largest), kept in graph order."""
    nonzero = [r for r in rows if (value(r)[0] or 0) > 0 or (value(r)[1] or 0) > 0]
    if len(nonzero) <= MAX_BARS:
        return nonzero, 0
    size = [max(value(r)[0] or 0, value(r)[1] or 0) for r in nonzero]
    keep = set(sorted(range(len(nonzero)), key=lambda i: -size[i])[:MAX_BARS])
    return [r for i, r in enumerate(nonzero) if i in keep], len(nonzero) - MAX_BARS


def _svg_open(width: float, height: float, title: str) -> str:
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}">'


def _legend(x: float, items: Sequence[tuple[str, str]]) -> list[str]:
    out = []
    for colour, text in items:
        out.append(f'<rect x="{x}" y="6" width="12" height="10" fill="{colour}"/><text x="{x + 16}" y="15" class="lg">{e(text)}</text>')
        x += 16 + len(text) * CHAR_W + 14
    return out


def _row_label(r: LayerRow, x: float, y: float) -> str:
    cls = "lb touched" if r.touched else "lb"
    tip = f"{r.name} ({r.op}){', rewritten' if r.touched else ''}"
    return f'<text x="{x}" y="{y}" text-anchor="end" class="{cls}"><title>{e(tip)}</title>{e(short(r.name) + " (" + r.op + ")")}</text>'


def bar_chart_svg(rows: Sequence[LayerRow], value: Callable[[LayerRow], tuple[float | None, float | None]], fmt: Callable[[float], str],
                  title: str) -> str:
    """Horizontal paired bars per layer: before (grey) and after (blue). ``value(row) -> (before, after)``."""
    chosen, hidden = _select(rows, value)
    if not chosen:
        return f'<p class="muted">{e(title)}: nothing to show.</p>'
    label_w, bar_w, value_w, row_h, top = 300, 560, 170, 22, 30
    width, height = label_w + bar_w + value_w, top + row_h * len(chosen) + 10
    vmax = max(max(value(r)[0] or 0, value(r)[1] or 0) for r in chosen) or 1.0
    parts = [_svg_open(width, height, title), *_legend(label_w, [(BEFORE_COLOUR, "before"), (AFTER_COLOUR, "after")])]
    for i, r in enumerate(chosen):
        y = top + i * row_h
        b, a = value(r)
        parts.append(_row_label(r, label_w - 6, y + 13))
        for k, (v, colour) in enumerate(((b, BEFORE_COLOUR), (a, AFTER_COLOUR))):
            if v is not None:
                w = max(1.0, bar_w * v / vmax) if v > 0 else 0.0
                parts.append(f'<rect x="{label_w}" y="{y + 2 + k * 9}" width="{w:.1f}" height="8" fill="{colour}"><title>{e(fmt(v))}</title></rect>')
        note = fmt(b) if a == b and b is not None else f"{fmt(b) if b is not None else 'new'} \u2192 {fmt(a) if a is not None else 'removed'}"
        parts.append(f'<text x="{label_w + bar_w + 6}" y="{y + 13}" class="vl">{e(note)}</text>')
    parts.append("</svg>")
    return "".join(parts) + (f'<p class="muted">{hidden} smaller layer(s) not shown.</p>' if hidden else "")


def _latency_note(r: LayerRow) -> str:
    b, a = r.time_before, r.time_after
    if b is None and a is not None:
        return f"new: {fmt_ms(a.median)}"
    if a is None and b is not None:
        return f"removed (was {fmt_ms(b.median)})"
    assert a is not None and b is not None
    if r.change == "unchanged":
        return f"{fmt_ms(b.median)}, unchanged (within noise)"
    pct = (a.median / b.median - 1) * 100 if b.median > 0 else 0.0
    return f"{b.median:.3f} \u2192 {fmt_ms(a.median)}, {r.change} ({pct:+.0f}%)"


def latency_chart_svg(rows: Sequence[LayerRow]) -> str:
    """Per-layer latency: the median bar of each side with its spread (a whisker from the lowest to the highest
    round median); a layer whose change lies within the noise has its after bar in the before bar's light grey
    and says "unchanged"; the names of the layers a kept rewrite touched are bold."""
    timed = [r for r in rows if r.time_before is not None or r.time_after is not None]
    chosen, hidden = _select(timed, lambda r: (r.ms_before, r.ms_after))
    if not chosen:
        return '<p class="muted">No layer recorded a kernel time.</p>'
    label_w, bar_w, value_w, row_h, top = 300, 520, 270, 22, 30
    width, height = label_w + bar_w + value_w, top + row_h * len(chosen) + 10
    # Scaled to the medians; a whisker reaching past the chart (one slow round) is cut at its edge.
    vmax = 1.1 * max(max(t.median for t in (r.time_before, r.time_after) if t is not None) for r in chosen) or 1.0
    legend = [(BEFORE_COLOUR, "before"), (AFTER_COLOUR, "after, changed"), (UNCHANGED_COLOUR, "after, within noise")]
    parts = [_svg_open(width, height, "latency per layer"), *_legend(label_w, legend)]
    for i, r in enumerate(chosen):
        y = top + i * row_h
        parts.append(_row_label(r, label_w - 6, y + 13))
        after_colour = UNCHANGED_COLOUR if r.change == "unchanged" else AFTER_COLOUR
        for k, (t, colour) in enumerate(((r.time_before, BEFORE_COLOUR), (r.time_after, after_colour))):
            if t is None:
                continue
            yy = y + 2 + k * 9
            tip = f"median {fmt_ms(t.median)}, rounds {t.low:.3f}-{t.high:.3f} ms ({t.rounds} rounds)"
            parts.append(f'<rect x="{label_w}" y="{yy}" width="{max(1.0, bar_w * min(1.0, t.median / vmax)):.1f}" height="8" fill="{colour}"><title>{e(tip)}</title></rect>')
            x_lo, x_hi = (label_w + bar_w * min(1.0, v / vmax) for v in (t.low, t.high))
            parts.append(f'<line x1="{x_lo:.1f}" x2="{x_hi:.1f}" y1="{yy + 4}" y2="{yy + 4}" stroke="#2d3748" stroke-width="1"/>')
        parts.append(f'<text x="{label_w + bar_w + 6}" y="{y + 13}" class="vl">{e(_latency_note(r))}</text>')
    parts.append("</svg>")
    return "".join(parts) + (f'<p class="muted">{hidden} smaller layer(s) not shown.</p>' if hidden else "")


# -- the speedup curve ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurvePoint:
    """One point: ``x`` the error in the chart's unit (lower is better), the speedup with its CI, a short
    ``label`` (drawn when the point is on the front and there is room) and the hover ``tip``."""

    x: float
    speedup: float
    low: float
    high: float
    label: str
    tip: str
    front: bool


class _XScale:
    """Linear, or log10 when the positive values span more than two decades (zeros then sit one decade
    left of the smallest positive value, at a tick labelled 0)."""

    def __init__(self, xs: Sequence[float], left: float, width: float) -> None:
        pos = [x for x in xs if x > 0]
        self.log = bool(pos) and max(pos) / min(pos) > 100
        self.zero = math.floor(math.log10(min(pos))) - 1 if self.log else 0.0
        self.has_zero = self.log and any(x <= 0 for x in xs)
        vals = [self.f(x) for x in xs]
        lo, hi = min(vals), max(vals)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        pad = (hi - lo) * 0.05
        self.lo, self.hi, self.left, self.width = lo - pad, hi + pad, left, width

    def f(self, x: float) -> float:
        return (math.log10(x) if x > 0 else self.zero) if self.log else x

    def px(self, x: float) -> float:
        return self.left + (self.f(x) - self.lo) / (self.hi - self.lo) * self.width

    def ticks(self) -> list[tuple[float, str]]:
        if not self.log:
            return [(t, f"{t:.3g}") for t in nice_ticks(self.lo, self.hi) if self.lo <= t <= self.hi]
        decades = list(range(math.ceil(self.lo), math.floor(self.hi) + 1))
        stride = max(1, math.ceil(48 / (self.width / max(1.0, self.hi - self.lo))))
        out = [(0.0, "0")] if self.has_zero else []
        for k in decades[::-1][::stride][::-1]:
            if self.has_zero and k <= self.zero + 0.5:
                continue
            out.append((10.0**k, f"{10.0**k:g}" if -3 <= k <= 3 else f"1e{k}"))
        return out


_OFFSETS = ((7, -7, "start"), (7, 15, "start"), (-7, -7, "end"), (-7, 15, "end"))


def place_labels(anchors: Sequence[tuple[float, float, str]], area: Box, avoid: Sequence[Box] = ()) -> list[tuple[float, float, str, str]]:
    """Labels for ``(x, y, text)`` points in the order given, each at the first of four spots around its
    point whose box lies inside ``area`` and overlaps neither a label placed before nor a box of ``avoid``
    (the markers); a point with no such spot is left unlabelled. Returns ``(x, y, anchor, text)``."""
    placed: list[tuple[float, float, str, str]] = []
    boxes: list[Box] = list(avoid)
    for px, py, text in anchors:
        for dx, dy, anchor in _OFFSETS:
            box = label_box(px + dx, py + dy, text, anchor)
            if box.inside(area) and not any(box.overlaps(b) for b in boxes):
                placed.append((px + dx, py + dy, anchor, text))
                boxes.append(box)
                break
    return placed


def curve_svg(points: Sequence[CurvePoint], xlabel: str, ylabel: str = "speedup (end to end)") -> str:
    """Speedup against error: every point with its hover tip, the front as a line with its 95% CIs, labels on
    the front where they fit (the fastest first, then by increasing error), a dashed line at 1x."""
    if not points:
        return ""
    width, height, ml, mr, mt, mb = 760, 440, 70, 20, 20, 55
    pw, ph = width - ml - mr, height - mt - mb
    xs = _XScale([p.x for p in points], ml, pw)
    front = sorted((p for p in points if p.front), key=lambda p: (p.x, -p.speedup))
    spd = [p.speedup for p in points] + [p.low for p in front] + [p.high for p in front] + [1.0]
    y0, y1 = min(spd), max(spd)
    ypad = max((y1 - y0) * 0.08, 0.02)
    y0, y1 = y0 - ypad, y1 + ypad

    def py(v: float) -> float:
        return mt + (1 - (v - y0) / (y1 - y0)) * ph

    parts = [_svg_open(width, height, f"{ylabel} versus {xlabel}"), f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fbfbfd" stroke="#cbd5e0"/>']
    for t in nice_ticks(y0, y1):
        if y0 <= t <= y1:
            parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#edf2f7"/>')
            parts.append(f'<text x="{ml - 6}" y="{py(t) + 4:.1f}" text-anchor="end" class="ax">{t:g}x</text>')
    for t, text in xs.ticks():
        parts.append(f'<line x1="{xs.px(t):.1f}" x2="{xs.px(t):.1f}" y1="{mt}" y2="{mt + ph}" stroke="#edf2f7"/>')
        parts.append(f'<text x="{xs.px(t):.1f}" y="{mt + ph + 16}" text-anchor="middle" class="ax">{e(text)}</text>')
    if y0 <= 1.0 <= y1:
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{py(1.0):.1f}" y2="{py(1.0):.1f}" stroke="#718096" stroke-dasharray="4 3"/>')
    for p in front:
        if p.high > p.low:
            parts.append(f'<line x1="{xs.px(p.x):.1f}" x2="{xs.px(p.x):.1f}" y1="{py(p.low):.1f}" y2="{py(p.high):.1f}" stroke="{FRONT_COLOUR}" stroke-opacity="0.5"/>')
    if len(front) > 1:
        pts = " ".join(f"{xs.px(p.x):.1f},{py(p.speedup):.1f}" for p in front)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{FRONT_COLOUR}" stroke-width="2"/>')
    for p in sorted(points, key=lambda p: p.front):  # the front on top
        colour = FRONT_COLOUR if p.front else BEFORE_COLOUR
        parts.append(f'<circle cx="{xs.px(p.x):.1f}" cy="{py(p.speedup):.1f}" r="{5 if p.front else 4}" fill="{colour}"><title>{e(p.tip)}</title></circle>')
    fastest = max(front, key=lambda p: p.speedup, default=None)
    order = [fastest] + [p for p in front if p is not fastest] if fastest is not None else []
    anchors = [(xs.px(p.x), py(p.speedup), p.label) for p in order if p.label]
    markers = [Box(xs.px(p.x) - 5, py(p.speedup) - 5, xs.px(p.x) + 5, py(p.speedup) + 5) for p in front]
    for x, y, anchor, text in place_labels(anchors, Box(ml + 2, mt + 2, ml + pw - 2, mt + ph - 2), markers):
        parts.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" class="pl">{e(text)}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 12}" text-anchor="middle" class="at">{e(xlabel)}{" (log scale)" if xs.log else ""}</text>')
    parts.append(f'<text x="16" y="{mt + ph / 2}" text-anchor="middle" class="at" transform="rotate(-90 16 {mt + ph / 2})">{e(ylabel)}</text>')
    parts.append("</svg>")
    return "".join(parts)
