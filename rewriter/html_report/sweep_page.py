"""The sweep's own page (``sweep --html``): the model, the environment, the budget, the speedup curve drawn in
the budget's metric, and a table of the Pareto front.

It renders from the sweep's JSON (:meth:`rewriter.sweep.SweepResult.to_dict`, plus an optional ``model``
name), so a page can be made again later from the JSON alone. The curve's x axis is the first term of the
budget that every point measured, in its "lower is better" form (``1 - cosine``, ``top-1 drop``,
``max abs``); a budget whose terms cannot be drawn (an SNR, or a JSON without ``budget_values``) falls back
to ``1 - cosine``, the error every sweep records. The front is taken on that axis.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rewriter.html_report._markup import cards, e, environment_line, fmt_ci, fmt_int, fmt_value, known, page, table
from rewriter.html_report.charts import CurvePoint, curve_svg
from rewriter.report import write_text
from rewriter.sweep import pareto_front

#: Budget metrics drawn on the x axis, as (axis name, value -> "lower is better" value).
_LOWER_IS_BETTER: dict[str, tuple[str, Callable[[float], float]]] = {
    "cosine": ("1 \u2212 cosine", lambda v: 1.0 - v),
    "top1": ("top-1 drop", lambda v: 1.0 - v),
    "top5": ("top-5 drop", lambda v: 1.0 - v),
    "top1_drop": ("top-1 drop", lambda v: v),
    "top5_drop": ("top-5 drop", lambda v: v),
    "max_abs": ("max abs error", lambda v: v),
    "mean_abs": ("mean abs error", lambda v: v),
    "max_rel": ("max relative error", lambda v: v),
}
_ERROR_AXIS = "1 \u2212 cosine (worst output)"


@dataclass(frozen=True)
class SweepAxis:
    """The x axis: its name and each point's value on it."""

    name: str
    values: list[float]


def sweep_axis(data: Mapping[str, Any]) -> SweepAxis:
    """The axis of the curve: the first budget term every point measured (see the module docstring)."""
    points = data.get("points") or []
    keys = list((points[0].get("budget_values") or {}) if points else {})
    for key in keys:
        metric, _, output = key.partition("@")
        vals = [(p.get("budget_values") or {}).get(key) for p in points]
        if metric in _LOWER_IS_BETTER and all(known(v) for v in vals):
            name, fn = _LOWER_IS_BETTER[metric]
            return SweepAxis(f"{name} ({'output ' + output if output else 'worst output'})", [fn(float(v)) for v in vals])  # type: ignore[arg-type]
    return SweepAxis(_ERROR_AXIS, [float(p["error"]) for p in points])


@dataclass(frozen=True)
class _Point:
    step: int
    speedup: float
    error: float  # on the axis: what pareto_front compares


def _front_steps(data: Mapping[str, Any], axis: SweepAxis) -> set[int]:
    pts = [_Point(int(p["step"]), float(p["speedup"]), x) for p, x in zip(data.get("points") or [], axis.values)]
    return {p.step for p in pareto_front(pts)}


def _what(p: Mapping[str, Any]) -> str:
    return "nothing (the input model)" if int(p["step"]) == 0 else str(p.get("label") or f"step {p['step']}")


def _curve(data: Mapping[str, Any], axis: SweepAxis, front: set[int]) -> str:
    points = []
    for p, x in zip(data["points"], axis.values):
        step = int(p["step"])
        tip = f"step {step}: {_what(p)}; speedup {fmt_ci(p)}; {axis.name} {x:.3g}"
        points.append(CurvePoint(x, float(p["speedup"]), float(p.get("ci_low", p["speedup"])), float(p.get("ci_high", p["speedup"])),
                                 f"step {step}", tip, step in front))
    return curve_svg(points, axis.name)


def _front_table(data: Mapping[str, Any], axis: SweepAxis, front: set[int]) -> str:
    rows = [(p, x) for p, x in zip(data["points"], axis.values) if int(p["step"]) in front]
    rows.sort(key=lambda r: r[1])
    extra_error = axis.name != _ERROR_AXIS
    has_metric = any(known(p.get("metric")) for p, _ in rows)
    head = ["step", "speedup [95% CI]", axis.name, *(["1 \u2212 cosine"] if extra_error else []), "max abs error",
            *(["task metric"] if has_metric else []), "MACs", "rewritten at this step"]
    body = []
    for p, x in rows:
        cells = [str(p["step"]), e(fmt_ci(p)), e(f"{x:.3g}")]
        cells += [e(f"{float(p['error']):.3g}")] if extra_error else []
        cells += [e(fmt_value(p.get("max_abs")))]
        cells += [e(fmt_value(p.get("metric")) if known(p.get("metric")) else "not measured")] if has_metric else []
        cells += [e(fmt_int(p.get("macs"))), e(_what(p))]
        body.append(cells)
    numeric = tuple(range(len(head) - 1))
    return table(head, body, numeric=numeric)


def _header(data: Mapping[str, Any]) -> list[str]:
    inp = data.get("input") or {}
    path = inp.get("path") or data.get("model")
    lines = []
    if known(path):
        lines.append(f"model <code>{e(path)}</code>" + (f" sha256 <code>{e(inp['sha256'])}</code>" if known(inp.get("sha256")) else ""))
    if known(data.get("budget")):
        lines.append(f"budget (the loosest the search may reach) <code>{e(data['budget'])}</code>")
    if known(data.get("feeds")):
        lines.append(f"feeds {e(data['feeds'])}")
    return [environment_line(data.get("environment") or {}), "<p>" + "<br>".join(lines) + "</p>" if lines else ""]


def _cards(data: Mapping[str, Any], axis: SweepAxis, front: set[int]) -> str:
    on_front = [(p, x) for p, x in zip(data["points"], axis.values) if int(p["step"]) in front]
    best, bx = max(on_front, key=lambda r: float(r[0]["speedup"]))
    seconds = data.get("seconds_search")
    return cards([
        ("steps measured (the input model is step 0)", str(len(data["points"]))),
        ("steps on the Pareto front", str(len(on_front))),
        (f"fastest on the front: step {best['step']}, at {axis.name} {bx:.3g}", fmt_ci(best)),
        ("search time", f"{float(seconds):.0f} s" if known(seconds) else ""),
    ])


def render_sweep_html(data: Mapping[str, Any], *, title: str | None = None) -> str:
    """The sweep page for a sweep's JSON dict (see the module docstring)."""
    inp = data.get("input") or {}
    name = title or f"onnx-bottleneck sweep: {os.path.basename(str(inp.get('path') or data.get('model') or 'model'))}"
    body = [f"<h1>{e(name)}</h1>", *_header(data)]
    if not data.get("points"):
        return page(name, [*body, "<h2>Speedup curve</h2>", '<p class="muted">The sweep measured no step.</p>'])
    axis = sweep_axis(data)
    front = _front_steps(data, axis)
    n = len(data["points"])
    body += [
        _cards(data, axis, front),
        f"<h2>Speedup vs {e(axis.name)}</h2>",
        f'<p class="muted">Each point is one step of the search: the model with every lossy rewrite kept so far, measured end to '
        f"end against the input ({n} point(s)). Orange: the Pareto front (no other step is both faster and more accurate), "
        "with the 95% CI of its speedup; labels are thinned so none overlap. Hover a point for its step and rewrite.</p>",
        _curve(data, axis, front),
        "<h2>The Pareto front</h2>",
        _front_table(data, axis, front),
    ]
    return page(name, body)


def write_sweep_html(path: str | os.PathLike[str], data: Mapping[str, Any], **kwargs: Any) -> None:
    """Render and write atomically."""
    write_text(render_sweep_html(data, **kwargs), path)

