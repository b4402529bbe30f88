"""Commands that write models: ``optimize``, ``optimize-many`` and ``apply``."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer

from rewriter.cli.app import ConfigOpt, err, guarded, log, model_path, model_tables, out, pass_options, quiet
from rewriter.cli.groups import BUDGET, FEEDS, MODEL, OUTPUT, SEARCH, TIMING, ModelArgs, OutputArgs, compose
from rewriter.cli.tables import fleet_table, optimize_summary
from rewriter.errors import GateFailed, InputError
from rewriter.job import OptimizeOptions
from rewriter.options import BudgetOptions, FeedOptions, MeasureOptions, SearchOptions

#: The groups ``optimize`` and ``optimize-many`` share: every option of one guarded optimization.
_OPTIMIZE_GROUPS = {"search": SEARCH, "model_args": MODEL, "feeds": FEEDS, "budget": BUDGET, "measure": TIMING}
#: The --help panels of options of one command: optimize-many's workers, apply's plan.
_WORKERS, _PLAN = "Workers", "Plan"


def _optimize_options(
    config_file: Optional[Path], search: SearchOptions, model_args: ModelArgs, feeds: FeedOptions, budget: BudgetOptions,
    measure: MeasureOptions, external_data: Optional[bool], input_shapes: Optional[dict[str, tuple[int, ...]]] = None,
) -> OptimizeOptions:
    """The library's OptimizeOptions from the groups' objects (and --config's pass options)."""
    return OptimizeOptions.compose(
        search, feeds, budget, measure, pass_options=pass_options(config_file),
        input_shapes=model_args.shapes() if input_shapes is None else input_shapes,
        max_model_bytes=model_args.max_model_bytes, external_data=external_data,
    )


@guarded
@compose(**_OPTIMIZE_GROUPS, output=OUTPUT)
def optimize(
    model: Path = typer.Argument(..., help="ONNX model file (never modified)."),
    config_file: Optional[Path] = ConfigOpt,
    *,
    search: SearchOptions,
    model_args: ModelArgs,
    feeds: FeedOptions,
    budget: BudgetOptions,
    measure: MeasureOptions,
    output: OutputArgs,
) -> None:
    """Run the guarded pipeline and write the optimized model and its report."""
    from rewriter.html_report import layer_rows, profile_layers, write_html
    from rewriter.io import check_output_path, save_model, sha256_file
    from rewriter.job import optimize_model
    from rewriter.progress import DecisionProgress
    from rewriter.report import check_output_paths, write_json
    from rewriter.validation.runtime import shared_file, shared_payloads
    from rewriter.zoo import plan_for

    target = output.output
    assert target is not None  # a required option
    src = model_path(model)
    check_output_path(src, target, in_place=output.in_place)  # neither the model nor its data files
    shapes = model_args.shapes()
    if search.fail_if_no_speedup and not measure.latency:
        raise InputError("--fail-if-no-speedup needs latency measurement; drop --no-latency")
    check_output_paths(target, output.report, output.html, output.save_plan)
    options = _optimize_options(config_file, search, model_args, feeds, budget, measure, output.external_data, shapes)
    options = plan_for(src, options, model_tables(config_file)).options  # its [models."PATTERN"] tables, if any
    shown = DecisionProgress(err, enabled=sys.stderr.isatty() and not quiet(), time_budget_s=options.time_budget)
    with shared_payloads():  # a big result is written once, for its sessions and then as the output
        outcome = optimize_model(src, options, progress=shown, on_decision=shown.on_decision, on_round=shown.on_round)
        result, gate = outcome.result, outcome.gate
        if not gate:
            save_model(result.model, target, external_data=output.external_data, serialized=shared_file(result.model))
    out_sha = None
    if not gate:
        out_sha = sha256_file(target)
        if output.save_plan is not None:
            outcome.plan(out_sha).save(output.save_plan)
    data = outcome.report(str(model), str(target), out_sha)
    if output.report is not None:
        write_json(data, output.report)
    if output.html is not None:  # nothing to rewrite: MACs only, nothing to time (the inputs may not be feedable)
        layers = layer_rows(result.before, result.after) if result.nothing_to_rewrite else profile_layers(result, outcome.config.runtime)
        write_html(output.html, data, layers=layers)
    if not quiet():
        for line in optimize_summary(result, options.metric):
            out.print(line)
    if gate:
        raise GateFailed("gate failed, no output written: " + "; ".join(gate))
    normalized = f" (normalized on load: {'; '.join(result.normalized)})" if result.normalized else ""
    if result.nothing_to_rewrite:
        same = "bytes identical to the input file" if out_sha == outcome.input_sha256 else "same graph, other bytes than the input file"
        out.print(f"nothing to rewrite: wrote {target} unchanged ({same}){normalized}")
        return
    kept, replaced = len(result.in_model), len(result.kept) - len(result.in_model)
    out.print(f"wrote {target}: {kept} rewrite(s) kept" + (f" ({replaced} more kept, then replaced by stronger ones)" if replaced else "")
              + f", {len(result.rolled_back)} rolled back"
              + (f", {len(result.not_tried)} not tried" if result.not_tried else "")
              + (f", end-to-end speedup {_speedups(result)} ({_timed(options)})" if result.final_latency else "")
              + (", end-to-end latency unchanged by construction: onnxruntime runs the same graph as for the input (not timed)"
                 if result.same_deployed else "") + _precision(result) + normalized)


def _precision(result: Any) -> str:
    """The int8 stage, for the closing line ("" for fp32)."""
    stage = result.precision
    if stage is None:
        return ""
    return f"; int8: {stage.status} ({stage.reason})"


def _speedups(result: Any) -> str:
    """The end-to-end speedup, with the profile of each where there are several."""
    if not result.profile_latency:
        return str(result.final_latency.ci)
    return "; ".join(f"{p.latency.ci} at {p.profile.label}" for p in result.profile_latency)


def _timed(options: OptimizeOptions) -> str:
    """How the latency was measured, for the closing line: threads (or profiles) and provider."""
    profiles = options.deployments()
    if len(profiles) > 1:
        return f"onnxruntime, {options.provider}"
    p = profiles[0]
    batch = f", batch {p.batch}" if p.batch != 1 else ""
    return f"onnxruntime, {p.threads} intra-op thread{'s' if p.threads != 1 else ''}{batch}, {options.provider}"


@guarded
@compose(**_OPTIMIZE_GROUPS, output=OUTPUT.only("external_data"))
def optimize_many_cmd(
    models: list[Path] = typer.Argument(..., help="ONNX model files (never modified)."),
    out_dir: Path = typer.Option(..., "--out-dir", help="Folder for <stem>.onnx, <stem>.report.json and summary.json (created if missing).", rich_help_panel=OUTPUT.panel),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Models at once: local worker processes (default: one per core) or Ray tasks in flight.", rich_help_panel=_WORKERS),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Run each model as a Ray task on this cluster: auto, ray://HOST:10001 or local (needs the 'ray' extra of onnx-bottleneck).", rich_help_panel=_WORKERS),
    cpus_per_job: Optional[int] = typer.Option(None, "--cpus-per-job", min=1, help="Whole CPUs each Ray task requests (default: --threads).", rich_help_panel=_WORKERS),
    save_plans: bool = typer.Option(False, "--save-plans", help="Also write each model's kept rewrites as <stem>.plan.json for `apply`.", rich_help_panel=OUTPUT.panel),
    config_file: Optional[Path] = ConfigOpt,
    *,
    search: SearchOptions,
    model_args: ModelArgs,
    feeds: FeedOptions,
    budget: BudgetOptions,
    measure: MeasureOptions,
    output: OutputArgs,
) -> None:
    """Optimize many models, one guarded job each (local processes or Ray tasks); exit 1 if any failed.

    An --input-shape applies to every model that has that input; settings per model (by file stem or glob) go in
    the models tables of --config (docs/report.md, "Per-model tables")."""
    from rewriter.fleet import optimize_many

    options = _optimize_options(config_file, search, model_args, feeds, budget, measure, output.external_data)
    result = optimize_many(models, out_dir, options, jobs=jobs, ray_address=ray_address, cpus_per_job=cpus_per_job, save_plans=save_plans,
                           per_model=model_tables(config_file))
    if not quiet():
        out.print(fleet_table(result))
    counts = result.counts()
    how = f"{result.workers} worker process(es)" if result.mode == "local" else f"up to {result.workers} Ray task(s) in flight"
    out.print(f"{counts['ok']} of {counts['total']} model(s) ok ({how}, {result.seconds:.1f} s); summary: {result.summary}")
    if result.failed:
        names = ", ".join(m.input for m in result.failed[:5]) + (", ..." if len(result.failed) > 5 else "")
        err.print(f"error: {len(result.failed)} of {counts['total']} model(s) failed ({names}); see {result.summary}", markup=False)
        raise typer.Exit(1)


@guarded
@compose(
    model_args=MODEL.only("max_model_bytes"),
    feeds=FEEDS.only("feeds", "images", "image_spec", "data_loader_script", "seed", "holdout_fraction").but(
        seed={"help": "Seed of the feeds split (calibrated lossy steps only)."},
        holdout_fraction={"help": "The --holdout-fraction optimize split the feeds with (calibrated lossy steps only)."}),
    output=OUTPUT.only("output", "in_place", "external_data").but(output={"help": "Where to write the rewritten model."}),
)
def apply_plan_cmd(
    model: Path = typer.Argument(..., help="ONNX model file (never modified)."),
    plan: Path = typer.Option(..., "--plan", help="Plan written by optimize --save-plan.", rich_help_panel=_PLAN),
    force: bool = typer.Option(False, "--force", help="Replay even if the model or calibration data differ from the plan's.", rich_help_panel=_PLAN),
    config_file: Optional[Path] = ConfigOpt,
    *,
    model_args: ModelArgs,
    feeds: FeedOptions,
    output: OutputArgs,
) -> None:
    """Replay a plan's rewrites without measuring: the same model and plan give the same bytes."""
    from rewriter.io import check_output_path, save_model, sha256_file
    from rewriter.model import Model
    from rewriter.plan import Plan, apply_plan

    target = output.output
    assert target is not None  # a required option
    src = model_path(model)
    check_output_path(src, target, in_place=output.in_place)  # neither the model nor its data files
    the_plan = Plan.load(plan)
    max_bytes = model_args.max_model_bytes
    feedset = None
    if (the_plan.calibration is not None or the_plan.precision is not None) and (feeds.feeds or feeds.images or feeds.data_loader_script):
        source = Model.from_source(src, the_plan.input_shapes or None, max_bytes=max_bytes)
        feedset = replace(feeds, num_feeds=1).feedset(source)
    result = apply_plan(src, the_plan, force=force, max_model_bytes=max_bytes, feeds=feedset)
    save_model(result.model, target, external_data=output.external_data)
    sha = sha256_file(target)
    if the_plan.output_sha256 and result.sha256_matches and sha != the_plan.output_sha256:
        log.warning("output sha256 differs from the one recorded in the plan (another onnx/protobuf version?)")
    out.print(f"wrote {target}: {len(result.applied)} rewrite(s) replayed, sha256 {sha}")
