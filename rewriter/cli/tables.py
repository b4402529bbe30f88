"""Terminal rendering of results: each function turns a library result into rich tables and lines of
text, in the order a command prints them. Nothing here computes or measures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

from rich.table import Table
from rich.text import Text

Renderable = Union[Table, str]


def fmt_int(n: int) -> str:
    """``1234567`` as ``1.23M``."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def passes_table(available: Mapping[str, Any]) -> Table:
    """The passes by name: exact or lossy, run by default or not, and what each does."""
    table = Table(title="Passes")
    for col in ("name", "kind", "default", "what it does"):
        table.add_column(col)
    for name, cls in available.items():
        table.add_row(name, "exact" if cls.exact else "lossy", "yes" if cls.exact else "no", cls.summary)
    return table


def analysis_tables(result: Any, top: int) -> list[Table]:
    """An :class:`~rewriter.analysis.Analysis`: its ``top`` expensive dense KxK convs and the op histogram."""
    ranked = result.expensive_convs()
    table = Table(title=f"Expensive dense KxK convs ({len(ranked)}; top {min(top, len(ranked))})")
    for col in ("#", "node", "kernel", "channels", "output", "MACs", "share"):
        table.add_column(col, justify="right" if col in ("#", "MACs", "share") else "left")
    for i, (c, share) in enumerate(ranked[:top], 1):
        kernel = "x".join(map(str, c.kernel))
        table.add_row(str(i), c.name, kernel, f"{c.in_channels}->{c.out_channels}", "x".join(map(str, c.output_shape or ())), fmt_int(c.macs), f"{share:.1%}")
    hist = Table(title="Op histogram")
    hist.add_column("op")
    hist.add_column("count", justify="right")
    for op, n in result.histogram.items():
        hist.add_row(op, str(n))
    return [table, hist]


def optimize_summary(result: Any, metric: str | None = None) -> list[Renderable]:
    """An :class:`~rewriter.pipeline.OptimizeResult`: the decisions, then the totals, numerics and target."""
    shown: list[Renderable] = []
    table = Table(title="Decisions")
    for col in ("pass", "nodes", "MACs", "max abs err", "speedup [95% CI]", "decision"):
        table.add_column(col, overflow="fold")
    for d in result.decisions:
        v = d.verdict
        err_txt = "-"
        if v is not None and v.numerics:
            err_txt = f"{max(s.max_abs for s in v.numerics.values()):.2e}"
        lat = "-"
        if v is not None and v.latency is not None:
            lat = f"{v.latency.ci} {v.latency_scope}"
        c = d.candidate
        decision = "kept" if d.kept else d.reason if not d.tried else f"rolled back: {d.reason}"  # not-tried reasons say so
        table.add_row(c.pass_name, ", ".join(c.nodes), f"{fmt_int(c.cost.macs_before)}->{fmt_int(c.cost.macs_after)}", err_txt, lat, decision)
    if result.decisions:
        shown.append(table)
    skips = sum(len(r.skips) for r in result.passes)
    if skips:
        shown.append(f"{skips} place(s) skipped by passes (reasons in the JSON report)")
    b, a = result.before, result.after
    saved = f" ({fmt_int(b.total_macs - a.total_macs)} saved, {1 - a.total_macs / b.total_macs:.1%})" if a.total_macs < b.total_macs else ""
    shown.append(
        f"nodes {sum(b.histogram.values())} -> {sum(a.histogram.values())}, MACs {fmt_int(b.total_macs)} -> {fmt_int(a.total_macs)}{saved}, "
        f"params {fmt_int(b.total_params)} -> {fmt_int(a.total_params)}"
    )
    used = getattr(result, "numerics_feeds", 0)
    on = f" (on {used} validation feed{'s' if used != 1 else ''})" if used else ""
    for name, s in result.final_numerics.items():
        shown.append(f"output {name}: max abs err {s.max_abs:.3g}, cosine {s.cosine:.6f}" + (f", top-1 agreement {s.top1:.3f}" if s.top1 is not None else "") + on)
    if result.target_speedup is not None:
        target = result.final_latency.ci if result.final_latency is not None else "nothing kept"
        shown.append(f"target speedup {result.target_speedup:g}x: {'reached' if result.target_reached else 'not reached'} ({target})")
    shown += holdout_lines(getattr(result, "holdout", None), metric)
    summary = getattr(result, "search", None)
    if summary is not None and summary.candidates:
        shown.append(summary.line())
    return shown


def holdout_lines(held: Any, metric: str | None = None) -> list[str]:
    """A :class:`~rewriter.holdout.Holdout`: what the held-out confirmation found, and the task metric on the
    test split before and after (when the metric scores splits)."""
    if held is None or held.status == "off":
        return []
    sizes = held.sizes
    shown = [f"held-out test split ({sizes['test']} feeds the search never saw; {sizes['validation']} validation, "
             f"{sizes['calibration']} calibration): {held.status.replace('_', ' ')} -- {held.reason}"]
    if held.metric_split and held.metric_baseline is not None:
        after = held.final.metric if held.final is not None and held.final.metric is not None else held.metric_baseline
        name = f"metric {metric}" if metric else "metric"
        shown.append(f"{name} on the held-out test split (data the search never scored): before {held.metric_baseline:.4g}, "
                     f"after {after:.4g}")
    return shown


def fleet_table(result: Any) -> Table:
    """A :class:`~rewriter.fleet.FleetResult`: one row per model."""
    table = Table(title=f"Models ({result.mode})")
    for col in ("model", "status", "settings", "kept", "rolled back", "speedup [95% CI]", "MACs", "seconds", "output / error"):
        table.add_column(col, overflow="fold", justify="right" if col in ("kept", "rolled back", "seconds") else "left")
    for m in result.models:
        speedup = "-" if m.speedup is None else f"{m.speedup:.3f}x [{m.speedup_ci[0]:.3f}, {m.speedup_ci[1]:.3f}]"
        macs = "-" if m.macs_before is None else f"{fmt_int(m.macs_before)}->{fmt_int(m.macs_after or 0)}"
        table.add_row(Text(m.input), m.status, Text(_settings(m.settings)), str(m.kept), str(m.rolled_back), speedup, macs,
                      f"{m.seconds:.1f}", Text((m.output if m.ok else m.error) or ""))
    return table


def _settings(settings: dict[str, Any]) -> str:
    """A model's settings in a zoo job: the shapes given, batch dims taken as 1, the config tables that matched."""
    parts = [f"{k}:{'x'.join(map(str, v))}" for k, v in settings.get("input_shapes", {}).items()]
    parts += [f"{n['input']}: batch 1" for n in settings.get("input_shape_notes", [])]
    if settings.get("tables"):
        parts.append("tables " + ", ".join(settings["tables"]))
    return "; ".join(parts) or "-"


def validation_summary(rep: Any, base_name: str, feeds: int, metric: str | None) -> list[Renderable]:
    """A validation report: numerics per output, the metric and the latency A/B."""
    table = Table(title=f"Numerics vs {base_name} ({feeds} feeds; budget {rep.budget})")
    for col in ("output", "max abs", "mean abs", "max rel", "cosine", "SNR dB", "top-1", "top-5"):
        table.add_column(col, justify="left" if col == "output" else "right")
    for name, s in rep.numerics.items():
        table.add_row(name, f"{s.max_abs:.3g}", f"{s.mean_abs:.3g}", f"{s.max_rel:.3g}", f"{s.cosine:.6f}", f"{s.snr_db:.1f}",
                      "-" if s.top1 is None else f"{s.top1:.3f}", "-" if s.top5 is None else f"{s.top5:.3f}")
    shown: list[Renderable] = [table]
    if rep.metric_base is not None:
        shown.append(f"metric {metric}: base {rep.metric_base:.6g}, candidate {rep.metric_candidate:.6g}")
    if rep.latency is not None:
        lat = rep.latency
        shown.append(f"latency: base {lat.base_median_s * 1e3:.3f} ms, candidate {lat.candidate_median_s * 1e3:.3f} ms, speedup {lat.ci} over {lat.ci.pairs} interleaved pairs")
    return shown


def sweep_table(result: Any, model_name: str) -> Table:
    """A :class:`~rewriter.sweep.SweepResult`: one row per step, ``*`` on the Pareto front."""
    table = Table(title=f"Sweep of {model_name} (budget reached: {result.search.budget})")
    for col in ("step", "rewrite", "speedup [95% CI]", "1 - cosine", "max abs", "metric", "front"):
        table.add_column(col, overflow="fold")
    for p in result.points:
        table.add_row(str(p.step), p.label, f"{p.speedup:.3f}x [{p.ci_low:.3f}, {p.ci_high:.3f}]", f"{p.error:.2e}",
                      f"{p.max_abs:.3g}", "-" if p.metric is None else f"{p.metric:.4g}", "*" if p.step in result.front else "")
    return table


def op_time_table(res: Any) -> Table:
    """A benchmark's time per op type."""
    table = Table(title="Time per op type")
    for col in ("op", "ms/run", "share"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for op, share in res.op_share.items():
        table.add_row(op, f"{res.op_time_ms[op]:.3f}", f"{share:.1%}")
    return table
