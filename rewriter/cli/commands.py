"""Commands that read and measure: ``analyze``, ``passes``, ``validate``, ``sweep``, ``bench``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from rewriter.cli.app import ConfigOpt, err, guarded, model_path, out, pass_options, quiet
from rewriter.cli.groups import BUDGET, FEEDS, MODEL, OUTPUT, SEARCH, TIMING, ModelArgs, compose
from rewriter.cli.tables import analysis_tables, fmt_int, op_time_table, passes_table, sweep_table, validation_summary
from rewriter.options import BudgetOptions, FeedOptions, MeasureOptions, SearchOptions

#: ``validate`` and ``sweep`` word some shared flags their own way.
_RANDOM_FEEDS = {"seed": {"help": None}}
#: The feed flags of commands that hold nothing out (validate compares on every feed; sweep maps the
#: search's own curve): all but --holdout-fraction, which they set to 0.
_ALL_FEEDS = ("feeds", "images", "image_spec", "data_loader_script", "num_feeds", "seed")


@guarded
@compose(model_args=MODEL)
def analyze(
    model: Path = typer.Argument(..., help="ONNX model file."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full analysis as JSON.", rich_help_panel=OUTPUT.panel),
    top: int = typer.Option(20, "--top", min=1, help="How many expensive convs to list.", rich_help_panel=OUTPUT.panel),
    config_file: Optional[Path] = ConfigOpt,
    *,
    model_args: ModelArgs,
) -> None:
    """MACs and params per node, the expensive dense KxK convs, and the op histogram."""
    from rewriter.analysis import analyze as run_analysis
    from rewriter.report import write_json

    m = model_args.load(model)
    result = run_analysis(m)
    if json_path is not None:
        write_json({"model": str(model), "input_shapes": {k: list(v) for k, v in m.input_shapes.items()}, **result.to_dict()}, json_path)
    if quiet():
        return
    out.print(f"{model}: {sum(result.histogram.values())} nodes, {fmt_int(result.total_macs)} MACs, {fmt_int(result.total_params)} params"
              + (f" (normalized on load: {'; '.join(m.normalized)})" if m.normalized else ""))
    for table in analysis_tables(result, top):
        out.print(table)


@guarded
def list_passes() -> None:
    """List the available passes (exact ones run by default)."""
    from rewriter.registry import available_passes

    out.print(passes_table(available_passes()))


@guarded
@compose(
    model_args=MODEL.only("input_shape"),
    feeds=FEEDS.only(*_ALL_FEEDS).but(num_feeds={"default": 16, "help": "Random feeds to compare on."}, **_RANDOM_FEEDS),
    budget=BUDGET.only("max_error", "rtol", "atol", "metric", "max_metric_drop", "min_metric").but(
        max_error={"help": "Lossy budget (default: exact gate at --rtol/--atol)."}, rtol={"help": None}, atol={"help": None},
    ),
    measure=TIMING.only("latency", "threads", "provider").but(latency={"help": None}),
)
def validate(
    base: Path = typer.Argument(..., help="Reference model."),
    candidate: Path = typer.Argument(..., help="Model to judge against the reference."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON.", rich_help_panel=OUTPUT.panel),
    config_file: Optional[Path] = ConfigOpt,
    *,
    model_args: ModelArgs,
    feeds: FeedOptions,
    budget: BudgetOptions,
    measure: MeasureOptions,
) -> None:
    """Numerics per output and the latency ratio with its 95% CI; exit 1 if out of budget or slower."""
    from rewriter.model import Model
    from rewriter.options import validation_config
    from rewriter.report import write_json
    from rewriter.validation.compare import validate_models
    from rewriter.validation.feeds import FeedSet

    shapes = model_args.shapes()
    base_model = Model.from_source(model_path(base), shapes)
    feedset: FeedSet = replace(feeds, holdout_fraction=0.0).feedset(base_model)
    if feeds.feeds or feeds.images:  # validate compares on every given sample
        feedset = FeedSet(feedset.validation + feedset.calibration, [], feedset.source)
    config = validation_config(budget, measure)
    rep = validate_models(base_model, model_path(candidate), input_shapes=shapes, feeds=feedset, config=config, exact=budget.max_error is None)
    if json_path is not None:
        write_json(rep.to_dict(), json_path)
    if not quiet():
        for shown in validation_summary(rep, base.name, len(feedset.validation), budget.metric):
            out.print(shown)
    for f in rep.failures:
        err.print(f"fail: {f}", markup=False)
    if rep.slower:
        err.print(f"fail: candidate is slower (speedup {rep.latency.ci})", markup=False)  # type: ignore[union-attr]
    out.print("PASS" if rep.passed else "FAIL")
    if not rep.passed:
        raise typer.Exit(1)


@guarded
@compose(
    search=SEARCH.only("passes", "time_budget", "screen").but(
        passes={"annotation": str, "default": "bottleneck", "help": "Comma-separated passes to sweep (lossy ones are measured per step)."},
        time_budget={"help": "Seconds of validation the search may spend."},
    ),
    model_args=MODEL.only("input_shape"),
    feeds=FEEDS.only(*_ALL_FEEDS).but(num_feeds={"help": "Random feeds (without --feeds/--images)."}, **_RANDOM_FEEDS),
    budget=BUDGET.only("max_error", "metric", "max_metric_drop", "min_metric").but(
        max_error={"annotation": str, "default": "cosine>=0.99", "help": "The loosest budget the search may reach."},
    ),
    measure=TIMING.only("threads", "provider", "max_pairs"),
)
def sweep(
    model: Path = typer.Argument(..., help="ONNX model file (never modified)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the points as JSON.", rich_help_panel=OUTPUT.panel),
    html: Optional[Path] = typer.Option(None, "--html", help="Write the sweep as a self-contained HTML page (the curve in the budget's metric, the Pareto front).", rich_help_panel=OUTPUT.panel),
    config_file: Optional[Path] = ConfigOpt,
    *,
    search: SearchOptions,
    model_args: ModelArgs,
    feeds: FeedOptions,
    budget: BudgetOptions,
    measure: MeasureOptions,
) -> None:
    """The speedup-vs-error Pareto curve of a lossy search, measured end to end at every kept step."""
    from rewriter.config import build_passes
    from rewriter.html_report import write_sweep_html
    from rewriter.model import Model
    from rewriter.options import validation_config
    from rewriter.report import check_output_paths, write_json
    from rewriter.sweep import sweep as run_sweep

    src = model_path(model)
    check_output_paths(None, json_path, html)
    selected = build_passes(search.passes, pass_options(config_file))
    measure.runtime().providers()
    config = validation_config(budget, measure)
    source = Model.from_source(src, model_args.shapes())
    feedset = replace(feeds, holdout_fraction=0.0).feedset(source)
    result = run_sweep(source, selected, feeds=feedset, config=config, time_budget_s=search.time_budget, screen=search.screen,
                       input_path=src)
    data = {"model": str(model), **result.to_dict()}
    if json_path is not None:
        write_json(data, json_path)
    if html is not None:
        write_sweep_html(html, data)
    out.print(sweep_table(result, model.name))


@guarded
@compose(model_args=MODEL.only("input_shape"), measure=TIMING.only("threads", "provider"))
def bench(
    model: Path = typer.Argument(..., help="ONNX model file."),
    runs: int = typer.Option(50, "--runs", min=2, help="Timed runs.", rich_help_panel=TIMING.panel),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON.", rich_help_panel=OUTPUT.panel),
    config_file: Optional[Path] = ConfigOpt,
    *,
    model_args: ModelArgs,
    measure: MeasureOptions,
) -> None:
    """Latency median and spread, and each op type's share of the time (onnxruntime profiler)."""
    from rewriter.report import write_json
    from rewriter.validation.profile import bench_model

    threads, provider = measure.threads, measure.provider
    res = bench_model(model_path(model), input_shapes=model_args.shapes(), runs=runs, options=measure.runtime())
    if json_path is not None:
        write_json({"model": str(model), "provider": provider, "threads": threads, "latency": res.latency.to_dict(),
                    "op_share": res.op_share, "op_time_ms_per_run": res.op_time_ms}, json_path)
    lat = res.latency
    out.print(f"{model}: median {lat.median_s * 1e3:.3f} ms (p5 {lat.p05_s * 1e3:.3f}, p95 {lat.p95_s * 1e3:.3f}) over {lat.runs} runs, {threads} thread(s), {provider}")
    if quiet():
        return
    out.print(op_time_table(res))
