"""The HTML report: one self-contained file (inline CSS and SVG, no scripts, no external resources).

It shows the run's summary, per-layer MACs and (when profiled) per-layer latency before and after as
bars, the speedup-vs-error Pareto curve when a sweep's points are given, and the decision table.

Per-layer latency comes from onnxruntime's profiler (the ``<node>_kernel_time`` events of a Chrome
trace, summed per node name). Sessions are built at ``ORT_ENABLE_BASIC`` so that every timed kernel is a
node of the graph and keeps its name; ``ORT_ENABLE_ALL`` fuses and renames nodes (NCHWc layouts,
Conv+activation), which would leave most times without a layer. The end-to-end figures of the report
stay the ``ORT_ENABLE_ALL`` ones.

:func:`render_html` needs only the JSON report (a dict) plus optional layer rows and Pareto points, so a
report can be rendered again later from its JSON.
"""

from __future__ import annotations

import html
import json
import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from rewriter.analysis import Analysis
from rewriter.report import ParetoPoint, write_text
from rewriter.shapes import Shape
from rewriter.sweep import pareto_front
from rewriter.validation.runtime import RuntimeOptions

#: Most bars drawn per chart; the largest layers are kept (in graph order) and the rest counted.
MAX_BARS = 150
BEFORE_COLOUR = "#a0aec0"
AFTER_COLOUR = "#2b6cb0"
FRONT_COLOUR = "#dd6b20"


@dataclass(frozen=True)
class LayerRow:
    """One layer (graph node by name) before and after; ``None`` where the layer does not exist."""

    name: str
    op: str
    macs_before: int | None
    macs_after: int | None
    ms_before: float | None = None
    ms_after: float | None = None


# -- data --------------------------------------------------------------------------------------------
def node_durations_from_trace(events: Iterable[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Kernel microseconds of each node name, one entry per run, from onnxruntime's Chrome-trace profile."""
    out: dict[str, list[float]] = {}
    suffix = "_kernel_time"
    for ev in events:
        name = str(ev.get("name", ""))
        if ev.get("cat") != "Node" or not name.endswith(suffix):
            continue
        out.setdefault(name[: -len(suffix)], []).append(float(ev.get("dur", 0)))
    return out


def node_times(
    proto: onnx.ModelProto,
    input_shapes: Mapping[str, Shape],
    options: RuntimeOptions | None = None,
    *,
    runs: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """Median milliseconds per run of each node, profiled by onnxruntime at ``ORT_ENABLE_BASIC``."""
    from rewriter.validation.feeds import input_specs, random_feeds
    from rewriter.validation.runtime import deploy_session

    base = options or RuntimeOptions()
    opts = RuntimeOptions(provider=base.provider, threads=base.threads, optimization="basic")
    feed = random_feeds(input_specs(proto, dict(input_shapes)), 1, seed=seed)[0]
    with tempfile.TemporaryDirectory() as tmp:
        session = deploy_session(proto, opts, profile_prefix=os.path.join(tmp, "profile"))
        names = [o.name for o in session.get_outputs()]
        for _ in range(max(1, runs)):
            session.run(names, feed)
        with open(session.end_profiling(), encoding="utf-8") as fh:
            events = json.load(fh)
    return {k: statistics.median(v) / 1e3 for k, v in node_durations_from_trace(events).items()}


def layer_rows(
    before: Analysis,
    after: Analysis,
    times_before: Mapping[str, float] | None = None,
    times_after: Mapping[str, float] | None = None,
) -> list[LayerRow]:
    """Layers of both versions matched by node name, in graph order; a new node sits just before the
    next layer (in the rewritten graph) that both versions have, after the layers it replaced."""
    b_cost = {c.name: c for c in before.nodes}
    a_cost = {c.name: c for c in after.nodes}
    order: dict[str, tuple[float, int]] = {c.name: (i, 0) for i, c in enumerate(before.nodes)}
    nxt, sub = float(len(before.nodes)), 0
    for c in reversed(after.nodes):  # a new node goes just before the next layer both versions have
        if c.name in b_cost:
            nxt, sub = order[c.name][0], 0
        else:
            sub -= 1
            order[c.name] = (nxt - 0.5, sub)
    tb, ta = times_before or {}, times_after or {}
    rows = []
    for name in sorted(order, key=lambda n: order[n]):
        bc, ac = b_cost.get(name), a_cost.get(name)
        op = (bc or ac).op  # type: ignore[union-attr]
        rows.append(
            LayerRow(
                name, op,
                None if bc is None else bc.macs, None if ac is None else ac.macs,
                None if bc is None else (tb.get(name, 0.0) if times_before is not None else None),
                None if ac is None else (ta.get(name, 0.0) if times_after is not None else None),
            )
        )
    return rows


def profile_layers(result: Any, options: RuntimeOptions | None = None, *, runs: int = 10) -> list[LayerRow]:
    """Layer rows of an :class:`~rewriter.pipeline.OptimizeResult`, with per-layer times before and after."""
    shapes = result.input_shapes
    before = node_times(result.original, shapes, options, runs=runs)
    after = node_times(result.model, shapes, options, runs=runs)
    return layer_rows(result.before, result.after, before, after)


# -- formatting --------------------------------------------------------------------------------------
def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt_int(n: float | int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} ms"


def _ci(lat: Mapping[str, Any] | None) -> str:
    if not lat:
        return "-"
    return f"{lat['speedup']:.3f}x [{lat['ci_low']:.3f}, {lat['ci_high']:.3f}]"


def _short(text: str, n: int = 34) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


# -- charts (inline SVG) -----------------------------------------------------------------------------
def _select(rows: Sequence[LayerRow], value: Any) -> tuple[list[LayerRow], int]:
    """Rows with a non-zero value on either side; at most MAX_BARS (the largest), kept in graph order."""
    nonzero = [r for r in rows if (value(r)[0] or 0) > 0 or (value(r)[1] or 0) > 0]
    if len(nonzero) <= MAX_BARS:
        return nonzero, 0
    keep = set(sorted(range(len(nonzero)), key=lambda i: -max(value(nonzero[i])[0] or 0, value(nonzero[i])[1] or 0))[:MAX_BARS])
    return [r for i, r in enumerate(nonzero) if i in keep], len(nonzero) - MAX_BARS


def bar_chart_svg(rows: Sequence[LayerRow], value: Any, fmt: Any, title: str) -> str:
    """Horizontal paired bars per layer: before (grey) and after (blue). ``value(row) -> (before, after)``."""
    chosen, hidden = _select(rows, value)
    if not chosen:
        return f'<p class="muted">{_e(title)}: nothing to show.</p>'
    label_w, bar_w, value_w, row_h, top = 300, 560, 150, 22, 30
    width = label_w + bar_w + value_w
    height = top + row_h * len(chosen) + 10
    vmax = max(max(value(r)[0] or 0, value(r)[1] or 0) for r in chosen) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
        f'<rect x="{label_w}" y="6" width="12" height="10" fill="{BEFORE_COLOUR}"/><text x="{label_w + 16}" y="15" class="lg">before</text>',
        f'<rect x="{label_w + 80}" y="6" width="12" height="10" fill="{AFTER_COLOUR}"/><text x="{label_w + 96}" y="15" class="lg">after</text>',
    ]
    for i, r in enumerate(chosen):
        y = top + i * row_h
        b, a = value(r)
        label = f"{_short(r.name)} ({r.op})"
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" class="lb"><title>{_e(r.name)}</title>{_e(label)}</text>')
        for k, (v, colour) in enumerate(((b, BEFORE_COLOUR), (a, AFTER_COLOUR))):
            if v is None:
                continue
            w = max(1.0, bar_w * v / vmax) if v > 0 else 0.0
            parts.append(f'<rect x="{label_w}" y="{y + 2 + k * 9}" width="{w:.1f}" height="8" fill="{colour}"><title>{_e(fmt(v))}</title></rect>')
        note = fmt(b) if a == b else f"{fmt(b) if b is not None else 'new'} \u2192 {fmt(a) if a is not None else 'removed'}"
        parts.append(f'<text x="{label_w + bar_w + 6}" y="{y + 13}" class="vl">{_e(note)}</text>')
    parts.append("</svg>")
    more = f'<p class="muted">{hidden} smaller layer(s) not shown.</p>' if hidden else ""
    return "".join(parts) + more


def pareto_svg(points: Sequence[ParetoPoint], xlabel: str = "error", ylabel: str = "speedup") -> str:
    """Scatter of (error, speedup) with the Pareto front drawn as a line; log x when errors span decades."""
    if not points:
        return ""
    width, height, ml, mr, mt, mb = 680, 420, 70, 30, 20, 55
    pw, ph = width - ml - mr, height - mt - mb
    errs = [p.error for p in points]
    spd = [p.speedup for p in points] + [1.0]
    log_x = min(errs) > 0 and max(errs) / min(errs) > 100
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    x0, x1 = fx(min(errs)), fx(max(errs))
    if x1 - x0 < 1e-12:
        x0, x1 = x0 - 0.5, x1 + 0.5
    pad = (x1 - x0) * 0.06
    x0, x1 = x0 - pad, x1 + pad
    y0, y1 = min(spd), max(spd)
    ypad = max((y1 - y0) * 0.08, 0.02)
    y0, y1 = y0 - ypad, y1 + ypad

    def px(v: float) -> float:
        return ml + (fx(v) - x0) / (x1 - x0) * pw

    def py(v: float) -> float:
        return mt + (1 - (v - y0) / (y1 - y0)) * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="speedup versus error">',
        f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fbfbfd" stroke="#cbd5e0"/>',
    ]
    for t in _nice_ticks(y0, y1):
        if y0 <= t <= y1:
            parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#edf2f7"/>')
            parts.append(f'<text x="{ml - 6}" y="{py(t) + 4:.1f}" text-anchor="end" class="ax">{t:g}x</text>')
    xticks = [10**k for k in range(math.floor(x0), math.ceil(x1) + 1)] if log_x else _nice_ticks(x0, x1)
    for t in xticks:
        if x0 <= fx(t) <= x1:
            parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{mt}" y2="{mt + ph}" stroke="#edf2f7"/>')
            parts.append(f'<text x="{px(t):.1f}" y="{mt + ph + 16}" text-anchor="middle" class="ax">{t:.3g}</text>')
    if y0 <= 1.0 <= y1:
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{py(1.0):.1f}" y2="{py(1.0):.1f}" stroke="#718096" stroke-dasharray="4 3"/>')
    front = sorted(pareto_front(points), key=lambda q: (q.error, -q.speedup))
    on_front = {id(p) for p in front}
    if len(front) > 1:
        pts = " ".join(f"{px(p.error):.1f},{py(p.speedup):.1f}" for p in front)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{FRONT_COLOUR}" stroke-width="2"/>')
    for p in points:
        colour = FRONT_COLOUR if id(p) in on_front else BEFORE_COLOUR
        tip = f"{p.label + ': ' if p.label else ''}speedup {p.speedup:.3f}x, error {p.error:.3g}"
        parts.append(f'<circle cx="{px(p.error):.1f}" cy="{py(p.speedup):.1f}" r="5" fill="{colour}"><title>{_e(tip)}</title></circle>')
        if id(p) in on_front and p.label:
            parts.append(f'<text x="{px(p.error) + 7:.1f}" y="{py(p.speedup) - 7:.1f}" class="pl">{_e(_short(p.label, 20))}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 12}" text-anchor="middle" class="at">{_e(xlabel)}{" (log scale)" if log_x else ""}</text>')
    parts.append(f'<text x="16" y="{mt + ph / 2}" text-anchor="middle" class="at" transform="rotate(-90 16 {mt + ph / 2})">{_e(ylabel)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# -- the page ----------------------------------------------------------------------------------------
_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:24px;color:#1a202c;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e2e8f0;padding-bottom:4px}
.muted{color:#718096;font-size:12px}.pass{color:#22543d;background:#c6f6d5}.fail{color:#742a2a;background:#fed7d7}
.badge{display:inline-block;padding:2px 8px;border-radius:4px;font-weight:600;font-size:13px}
table{border-collapse:collapse;font-size:12px;margin-top:6px}th,td{border:1px solid #e2e8f0;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f7fafc}td.n{text-align:right;font-variant-numeric:tabular-nums}tr.kept td{background:#f0fff4}tr.rolled_back td{background:#fffaf0}tr.not_tried td{color:#718096}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:10px}.card{border:1px solid #e2e8f0;border-radius:6px;padding:8px 12px;min-width:150px}
.card b{display:block;font-size:16px}.card span{color:#718096;font-size:12px}
svg text{font-family:inherit}svg .lb{font-size:11px;fill:#2d3748}svg .vl{font-size:11px;fill:#4a5568}svg .lg{font-size:11px;fill:#4a5568}
svg .ax{font-size:11px;fill:#4a5568}svg .at{font-size:12px;fill:#2d3748}svg .pl{font-size:11px;fill:#9c4221}
code{font-size:12px}
"""


def _worst(numerics: Mapping[str, Mapping[str, Any]]) -> str:
    if not numerics:
        return "-"
    max_abs = max((s.get("max_abs") or 0.0) for s in numerics.values())
    cosines = [s["cosine"] for s in numerics.values() if s.get("cosine") is not None]
    return f"{max_abs:.2e}" + (f" / {min(cosines):.6f}" if cosines else "")


def _kind(d: Mapping[str, Any]) -> str:
    """``kept``, ``rolled_back`` or ``not_tried`` (reports before schema 3 had no ``not_tried``)."""
    kind = d.get("decision")
    if kind in ("kept", "rolled_back", "not_tried"):
        return str(kind)
    return "kept" if d.get("kept") else "rolled_back"


def _decision_table(decisions: Sequence[Mapping[str, Any]]) -> str:
    if not decisions:
        return '<p class="muted">No candidate was found: nothing to decide.</p>'
    head = ["#", "pass", "nodes", "description", "MACs", "params", "max abs err / cosine", "speedup [95% CI]", "pass end-to-end", "decision", "reason"]
    rows = ["<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for i, d in enumerate(decisions, 1):
        c = d.get("cost", {})
        lat = d.get("latency")
        lat_txt = "-" if not lat else f"{_ci(lat)} ({lat.get('scope')})"
        kind = _kind(d)
        cells = [
            f'<td class="n">{i}</td>', f"<td>{_e(d['pass'])}</td>", f"<td>{_e(', '.join(d['nodes']))}</td>",
            f"<td>{_e(d.get('description', ''))}</td>",
            f'<td class="n">{_fmt_int(c.get("macs_before"))} \u2192 {_fmt_int(c.get("macs_after"))}</td>',
            f'<td class="n">{_fmt_int(c.get("params_before"))} \u2192 {_fmt_int(c.get("params_after"))}</td>',
            f'<td class="n">{_e(_worst(d.get("numerics") or {}))}</td>', f'<td class="n">{_e(lat_txt)}</td>',
            f'<td class="n">{_e(_ci(d.get("end_to_end")))}</td>',
            f"<td><b>{_e(kind.replace('_', ' '))}</b></td>", f"<td>{_e(d.get('reason', ''))}</td>",
        ]
        rows.append(f'<tr class="{_e(kind)}">' + "".join(cells) + "</tr>")
    rows.append("</tbody></table>")
    return "".join(rows)


def _cards(report: Mapping[str, Any]) -> str:
    t = report.get("totals", {})
    final = t.get("final_latency")
    items = [
        ("nodes", f"{t.get('nodes_before', '-')} \u2192 {t.get('nodes_after', '-')}"),
        ("MACs", f"{_fmt_int(t.get('macs_before'))} \u2192 {_fmt_int(t.get('macs_after'))}"),
        ("params", f"{_fmt_int(t.get('params_before'))} \u2192 {_fmt_int(t.get('params_after'))}"),
        ("rewrites kept / rolled back / not tried", f"{t.get('kept', 0)} / {t.get('rolled_back', 0)} / {t.get('not_tried', 0)}"),
        ("end-to-end speedup [95% CI]", _ci(final) if final else "not measured"),
    ]
    return '<div class="cards">' + "".join(f"<div class=\"card\"><b>{_e(v)}</b><span>{_e(k)}</span></div>" for k, v in items) + "</div>"


def _target_html(target: Any) -> str:
    """``; target speedup 1.3x reached`` (or not reached) from the report's ``target_speedup``."""
    if not isinstance(target, dict):
        return ""
    return f"; target speedup {_e(target.get('speedup'))}x {'reached' if target.get('reached') else 'not reached'}"


def _holdout_html(held: Any) -> list[str]:
    """The held-out test split: its status, the split sizes, the output's worst numerics on it and what was backed off."""
    if not isinstance(held, dict):
        return []
    sizes = held.get("sizes") or {}
    final = held.get("final") or {}
    lines = [
        "<h2>Held-out test split</h2>",
        f"<p><b>{_e(str(held.get('status', '?')).replace('_', ' '))}</b>: {_e(held.get('reason', ''))}<br>"
        f"feeds: {_e(sizes.get('calibration', '-'))} calibration, {_e(sizes.get('validation', '-'))} validation, "
        f"{_e(sizes.get('test', '-'))} test (never seen by the search)"
        + (f"<br>output on the test split: max abs err / cosine {_e(_worst(final.get('numerics') or {}))}" if final.get("numerics") else "")
        + (f"; metric {_e(final.get('metric'))} (input {_e(held.get('metric_baseline'))})" if final.get("metric") is not None else "")
        + "".join(f"<br>{_e(f)}" for f in final.get("failures", []))
        + "</p>",
    ]
    backed = held.get("backed_off") or []
    if backed:
        rows = "".join(
            f"<tr><td>{_e(', '.join(b.get('descriptions', [])))}</td><td class=\"n\">{_e(b.get('spend'))}</td>"
            f"<td class=\"n\">{_fmt_int(b.get('macs_saved'))}</td><td>{'holds' if b.get('holds_after') else 'still broken'}</td></tr>"
            for b in backed
        )
        lines.append("<table><thead><tr><th>backed off</th><th>budget spent</th><th>MACs saved</th><th>test split after</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table>")
    return lines


def render_html(
    report: Mapping[str, Any],
    *,
    layers: Sequence[LayerRow] = (),
    pareto: Sequence[ParetoPoint] | None = None,
    title: str | None = None,
) -> str:
    """The HTML page for a report dict (see :func:`rewriter.report.build_report`)."""
    if pareto is None and report.get("pareto"):
        pareto = [ParetoPoint(float(p["speedup"]), float(p["error"]), str(p.get("label", ""))) for p in report["pareto"]]
    env = report.get("environment", {})
    gate = report.get("gate") or {"passed": True, "failures": []}
    inp, out = report.get("input", {}), report.get("output", {})
    name = title or f"onnx-bottleneck report: {os.path.basename(str(inp.get('path') or 'model'))}"
    body = [
        f"<h1>{_e(name)}</h1>",
        f'<p class="muted">onnx-bottleneck {_e(env.get("tool_version", "?"))}, onnxruntime {_e(env.get("onnxruntime", "?"))}, '
        f'provider {_e(env.get("provider", "?"))}, {_e(env.get("threads", "?"))} thread(s), {_e(env.get("cpu", "?"))}; '
        f"report schema {_e(report.get('schema_version', '?'))}</p>",
        f'<p><span class="badge {"pass" if gate.get("passed") else "fail"}">gate {"passed" if gate.get("passed") else "failed"}</span> '
        + "".join(f"<br>{_e(f)}" for f in gate.get("failures", []))
        + "</p>",
        f"<p>input <code>{_e(inp.get('path'))}</code> sha256 <code>{_e(inp.get('sha256'))}</code><br>"
        f"output <code>{_e(out.get('path') or '(not written)')}</code> sha256 <code>{_e(out.get('sha256') or '-')}</code><br>"
        f"budget <code>{_e(report.get('budget', '-'))}</code>; feeds {_e(report.get('feeds', '-'))}"
        + _target_html(report.get("target_speedup")) + "</p>",
        _cards(report),
        "<h2>MACs per layer</h2>",
        bar_chart_svg(layers, lambda r: (r.macs_before, r.macs_after), _fmt_int, "MACs per layer") if layers else '<p class="muted">No layer data.</p>',
    ]
    if any(r.ms_before is not None or r.ms_after is not None for r in layers):
        body += [
            "<h2>Latency per layer</h2>",
            '<p class="muted">onnxruntime profiler, ORT_ENABLE_BASIC (nodes keep their names), milliseconds per run.</p>',
            bar_chart_svg(layers, lambda r: (r.ms_before, r.ms_after), _fmt_ms, "latency per layer"),
        ]
    if pareto:
        front = pareto_front(pareto)
        body += [
            "<h2>Speedup vs error (Pareto front)</h2>",
            f'<p class="muted">{len(pareto)} point(s); {len(front)} on the front (orange).</p>',
            pareto_svg(pareto),
        ]
    body += _holdout_html(report.get("holdout"))
    body += ["<h2>Decisions</h2>", _decision_table(report.get("decisions", []))]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(name)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_html(path: str | os.PathLike[str], report: Mapping[str, Any], **kwargs: Any) -> None:
    """Render and write atomically."""
    write_text(render_html(report, **kwargs), path)
