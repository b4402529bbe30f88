"""The optimize report's page: summary, end-to-end latency, MACs and latency per layer, the Pareto curve
(when the report carries sweep points), the held-out split, the int8 stage (each unit's precision and why),
what bound the search, and the decision table."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from rewriter.html_report._markup import arrow, cards, e, environment_line, fmt_ci, fmt_int, fmt_value, known, page, table
from rewriter.html_report.charts import CurvePoint, bar_chart_svg, curve_svg, latency_chart_svg
from rewriter.html_report.layers import LayerRow
from rewriter.report import ParetoPoint, write_text
from rewriter.sweep import pareto_front


def _worst(numerics: Mapping[str, Mapping[str, Any]]) -> str:
    if not numerics:
        return "not measured"
    max_abs = max((s.get("max_abs") or 0.0) for s in numerics.values())
    cosines = [s["cosine"] for s in numerics.values() if known(s.get("cosine"))]
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
    rows, kinds = [], []
    for i, d in enumerate(decisions, 1):
        c = d.get("cost") or {}
        lat = d.get("latency")
        kind = _kind(d)
        rows.append([
            str(i), e(d.get("pass", "")), e(", ".join(d.get("nodes", []))), e(d.get("description", "")),
            e(arrow(fmt_int(c.get("macs_before")), fmt_int(c.get("macs_after")))),
            e(arrow(fmt_int(c.get("params_before")), fmt_int(c.get("params_after")))),
            e(_worst(d.get("numerics") or {})),
            e(fmt_ci(lat) + (f" ({lat['scope']})" if lat and known(lat.get("scope")) else "")),
            e(fmt_ci(d.get("end_to_end"))), f"<b>{e(kind.replace('_', ' '))}</b>", e(d.get("reason", "")),
        ])
        kinds.append(kind)
    return table(head, rows, numeric=(0, 4, 5, 6, 7, 8), row_class=kinds)


def _cards(report: Mapping[str, Any]) -> str:
    t = report.get("totals") or {}

    def pair(key: str, fmt: Any = str) -> str:
        b, a = t.get(f"{key}_before"), t.get(f"{key}_after")
        return arrow(fmt(b), fmt(a)) if known(b) and known(a) else ""

    counts = "" if not t else f"{t.get('kept', 0)} / {t.get('rolled_back', 0)} / {t.get('not_tried', 0)}"
    return cards([("nodes", pair("nodes")), ("MACs", pair("macs", fmt_int)), ("params", pair("params", fmt_int)),
                  ("rewrites kept / rolled back / not tried", counts),
                  ("end-to-end speedup [95% CI]", fmt_ci(t.get("final_latency")) if t else "")])


def end_to_end_rows(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any] | None]]:
    """``(setting, latency dict)`` rows of the end-to-end section: one per deployment profile of the report
    (``profiles``, schema 6; the primary first), else the run's own setting (``totals.final_latency``)."""
    env = report.get("environment") or {}
    provider = env.get("provider") if known(env.get("provider")) else None
    profiles = [p for p in report.get("profiles") or [] if isinstance(p, Mapping)]
    if profiles:
        return [(", ".join(x for x in (provider, f"{p.get('threads')} thread(s)", f"batch {p.get('batch')}",
                                        "primary" if p.get("primary") and len(profiles) > 1 else None) if x),
                 p.get("latency")) for p in profiles]
    setting = ", ".join(str(v) for v in (provider, f"{env['threads']} thread(s)" if known(env.get("threads")) else None) if known(v))
    return [(setting or "this run's settings", (report.get("totals") or {}).get("final_latency"))]


def _end_to_end_html(report: Mapping[str, Any]) -> list[str]:
    if not report.get("totals"):
        return []
    rows = []
    for setting, lat in end_to_end_rows(report):
        base = fmt_value(lat.get("base_median_ms")) + " ms" if lat and known(lat.get("base_median_ms")) else "not measured"
        cand = fmt_value(lat.get("candidate_median_ms")) + " ms" if lat and known(lat.get("candidate_median_ms")) else "not measured"
        pairs = str(lat["pairs"]) if lat and known(lat.get("pairs")) else "not measured"
        rows.append([e(setting), e(base), e(cand), e(fmt_ci(lat)), e(pairs)])
    head = ["deployment setting", "input median", "output median", "speedup [95% CI]", "interleaved pairs"]
    note = []
    if (report.get("totals") or {}).get("same_deployed_graph"):
        note = ['<p class="muted">Not timed: onnxruntime runs the same graph for the output as for the input (every rewrite kept '
                "is one its optimizer makes itself), so the latency is unchanged by construction.</p>"]
    return ["<h2>End-to-end latency</h2>", *note, table(head, rows, numeric=(1, 2, 3, 4))]


def _target_html(target: Any) -> str:
    """``target speedup 1.3x reached`` (or not reached) from the report's ``target_speedup``."""
    if not isinstance(target, dict) or not known(target.get("speedup")):
        return ""
    return f"target speedup {e(target.get('speedup'))}x {'reached' if target.get('reached') else 'not reached'}"


def _holdout_html(held: Any) -> list[str]:
    """The held-out test split: its status, the split sizes, the output's worst numerics on it and what was backed off."""
    if not isinstance(held, dict):
        return []
    sizes = held.get("sizes") or {}
    final = held.get("final") or {}
    split = ", ".join(f"{sizes[k]} {k}" for k in ("calibration", "validation", "test") if known(sizes.get(k)))
    status = str(held.get("status") or "checked").replace("_", " ")
    lines = [
        "<h2>Held-out test split</h2>",
        f"<p><b>{e(status)}</b>" + (f": {e(held['reason'])}" if known(held.get("reason")) else "")
        + (f"<br>feeds: {e(split)} (the test split never seen by the search)" if split else "")
        + (f"<br>output on the test split: max abs err / cosine {e(_worst(final.get('numerics') or {}))}" if final.get("numerics") else "")
        + (f"; metric {e(fmt_value(final.get('metric')))}" if known(final.get("metric")) else "")
        + (f" (input {e(fmt_value(held.get('metric_baseline')))})" if known(final.get("metric")) and known(held.get("metric_baseline")) else "")
        + "".join(f"<br>{e(f)}" for f in final.get("failures", []))
        + "</p>",
    ]
    backed = held.get("backed_off") or []
    if backed:
        rows = [[e(", ".join(b.get("descriptions", []))), e(fmt_value(b.get("spend"))), e(fmt_int(b.get("macs_saved"))),
                 "holds" if b.get("holds_after") else "still broken"] for b in backed]
        lines.append(table(["backed off", "budget spent", "MACs saved", "test split after"], rows, numeric=(1, 2)))
    return lines


def _search_html(search: Any) -> list[str]:
    """What bound the search: every candidate judged, the error budget, the clock or the target; with the counts."""
    if not isinstance(search, dict) or not search.get("candidates"):
        return []
    why = {"complete": "every candidate judged", "error_budget": "bound by the error budget", "time": "bound by the time budget",
           "target": "the target speedup was reached"}.get(str(search.get("bound")), str(search.get("bound")))
    untried = ", ".join(f"{n} {str(k).removeprefix('not_tried_')}" for k, n in (search.get("untried") or {}).items())
    spent = search.get("budget_spent")
    return [f"<p><b>Search</b>: {e(search.get('judged'))} of {e(search.get('candidates'))} candidates judged"
            + (f" ({e(untried)} left)" if untried else "") + (f"; error budget {100 * float(spent):.0f}% spent" if known(spent) else "")
            + f" -- {e(why)}</p>"]


def _precision_html(precision: Any) -> list[str]:
    """The int8 stage (``--precision int8``): status and why, the recipe, the latency against the float result, the
    budget on each split, and each unit's precision and reason."""
    if not isinstance(precision, dict):
        return []
    recipe = precision.get("recipe") or {}
    counts = precision.get("counts") or {}
    lines = ["<h2>Precision: int8</h2>",
             f"<p><b>{e(precision.get('status'))}</b>: {e(precision.get('reason'))}"
             + (f"<br>recipe: {e(', '.join(f'{k} {v}' for k, v in recipe.items()))}" if recipe else "")
             + "".join(f"<br>{e(n)}" for n in precision.get("normalizations") or [])
             + (f"<br>units: {e(counts.get('int8', 0))} int8, {e(counts.get('float', 0))} float; {e(precision.get('trials'))} trials, "
                f"{e(fmt_value(precision.get('seconds')))} s" if counts else "")
             + "".join(f"<br>budget on {e(k)} ({e(v.get('feeds'))} feeds): {'holds' if v.get('holds') else 'fails'}"
                       + (f", {100 * float(v['spend']):.0f}% spent" if known(v.get("spend")) else "")
                       for k, v in (precision.get("budget") or {}).items())
             + "".join(f"<br>int8 against float at threads={e(r.get('threads'))}, batch={e(r.get('batch'))}: {e(fmt_ci(r))}"
                       for r in precision.get("latency") or [])
             + "</p>"]
    nodes = precision.get("nodes") or []
    if nodes:
        rows = [[e(n.get("node")), e(n.get("op_type")), f"<b>{e(n.get('precision'))}</b>", e(n.get("reason"))] for n in nodes]
        lines.append(table(["node", "op", "precision", "why"], rows))
    return lines


def _pareto_html(pareto: Sequence[ParetoPoint]) -> list[str]:
    front = {id(p) for p in pareto_front(pareto)}
    points = [CurvePoint(p.error, p.speedup, p.speedup, p.speedup, p.label, f"{p.label + ': ' if p.label else ''}speedup {p.speedup:.3f}x, error {p.error:.3g}",
                         id(p) in front) for p in pareto]
    return ["<h2>Speedup vs error (Pareto front)</h2>", f'<p class="muted">{len(pareto)} point(s); {len(front)} on the front (orange).</p>',
            curve_svg(points, "error")]


def _layers_html(layers: Sequence[LayerRow]) -> list[str]:
    if not layers:
        return []
    body = ["<h2>MACs per layer</h2>", bar_chart_svg(layers, lambda r: (r.macs_before, r.macs_after), fmt_int, "MACs per layer")]
    if any(r.change is not None for r in layers):
        rounds = max((t.rounds for r in layers for t in (r.time_before, r.time_after) if t is not None), default=0)
        body += [
            "<h2>Latency per layer</h2>",
            f'<p class="muted">onnxruntime profiler at ORT_ENABLE_BASIC (nodes keep their names), milliseconds per run: the median of '
            f"{rounds} rounds (each a fresh session per side, the sides interleaved) with the range of the round medians as a whisker. "
            "A layer is drawn as changed only when the two ranges are disjoint and the medians differ by more than 5%; "
            "otherwise the difference is noise and it is drawn as unchanged. Bold names: layers a kept rewrite touched.</p>",
            latency_chart_svg(layers),
        ]
    return body


def _header(report: Mapping[str, Any]) -> list[str]:
    env = report.get("environment") or {}
    gate = report.get("gate") or {"passed": True, "failures": []}
    inp, out = report.get("input") or {}, report.get("output") or {}
    schema = [f"report schema {report['schema_version']}"] if known(report.get("schema_version")) else []
    files = []
    if known(inp.get("path")):
        files.append(f"input <code>{e(inp['path'])}</code>" + (f" sha256 <code>{e(inp['sha256'])}</code>" if known(inp.get("sha256")) else ""))
    files.append(f"output <code>{e(out['path'])}</code>" + (f" sha256 <code>{e(out['sha256'])}</code>" if known(out.get("sha256")) else "")
                 if known(out.get("path")) else "output not written")
    run = [f"budget <code>{e(report['budget'])}</code>"] if known(report.get("budget")) else []
    run += [f"feeds {e(report['feeds'])}"] if known(report.get("feeds")) else []
    run += [_target_html(report.get("target_speedup"))] if _target_html(report.get("target_speedup")) else []
    if run:
        files.append("; ".join(run))
    return [
        environment_line(env, schema),
        f'<p><span class="badge {"pass" if gate.get("passed") else "fail"}">gate {"passed" if gate.get("passed") else "failed"}</span> '
        + "".join(f"<br>{e(f)}" for f in gate.get("failures", [])) + "</p>",
        "<p>" + "<br>".join(files) + "</p>",
    ]


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
    inp = report.get("input") or {}
    name = title or f"onnx-bottleneck report: {os.path.basename(str(inp.get('path') or 'model'))}"
    body = [f"<h1>{e(name)}</h1>", *_header(report), _cards(report), *_end_to_end_html(report), *_layers_html(layers)]
    if pareto:
        body += _pareto_html(pareto)
    body += _holdout_html(report.get("holdout"))
    body += _precision_html(report.get("precision"))
    body += ["<h2>Decisions</h2>", *_search_html(report.get("search")), _decision_table(report.get("decisions", []))]
    return page(name, body)


def write_html(path: str | os.PathLike[str], report: Mapping[str, Any], **kwargs: Any) -> None:
    """Render and write atomically."""
    write_text(render_html(report, **kwargs), path)
