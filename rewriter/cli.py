"""Command-line interface: a thin layer over the library.

Exit codes: 0 success; 1 a gate failed (numerics, metric, or slower than the input) and no output model
was written; 2 bad input or usage, reported in one line (``--debug`` shows the traceback).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from rewriter.errors import GateFailed, InputError, RewriterError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Guarded structural rewrites for ONNX CNNs: every rewrite is validated by onnxruntime before it is kept.",
    pretty_exceptions_enable=False,
)
# Not a terminal (CI logs, pipes): no colours, and tables wide enough not to cut names.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 200)
log = logging.getLogger("rewriter")

F = TypeVar("F", bound=Callable[..., Any])

_state = {"debug": False}


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (safe under test runners)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.INFO if verbose else (logging.ERROR if quiet else logging.WARNING)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("onnx-rewriter: %(message)s"))
    root = logging.getLogger("rewriter")
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("passes").handlers[:] = [handler]
    logging.getLogger("passes").setLevel(level)


def guarded(fn: F) -> F:
    """Turn library errors into one-line messages and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except RewriterError as exc:
            if _state["debug"]:
                raise
            err.print(f"error: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted", markup=False)
            raise typer.Exit(130) from None
        except Exception as exc:  # never a traceback for a user unless asked
            if _state["debug"]:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            err.print(f"error: {type(exc).__name__}: {first} (rerun with --debug for details)", markup=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each decision."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and the essential result."),
) -> None:
    _state["debug"] = debug
    _state["quiet"] = quiet
    _state["verbose"] = verbose
    _setup_logging(verbose, quiet)


# -- shared option helpers ---------------------------------------------------------------------------
InputShapeOpt = typer.Option(None, "--input-shape", help="Resolve an input's dims: NAME:1x3x224x224 (repeatable).")
FeedsOpt = typer.Option(None, "--feeds", help=".npy/.npz file of inputs (repeatable); default: seeded random feeds.")
ImagesOpt = typer.Option(None, "--images", help="Folder of images to use as feeds (needs --image-spec).")
ImageSpecOpt = typer.Option(None, "--image-spec", help="HxW[,NCHW|NHWC][,RGB|BGR][,mean=a/b/c][,std=a/b/c][,scale=s]")
MetricOpt = typer.Option(None, "--metric", help="Task metric module:function(session) -> float, higher is better.")
MetricDropOpt = typer.Option(0.01, "--max-metric-drop", help="Largest allowed drop of --metric.")
MetricFloorOpt = typer.Option(None, "--min-metric", help="Floor --metric must stay at or above.")
ThreadsOpt = typer.Option(1, "--threads", min=1, help="Intra-op threads of the timed sessions.")
ProviderOpt = typer.Option("cpu", "--provider", help="Execution provider for timing: cpu, cuda, tensorrt.")


def _config_defaults(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """--config FILE: the file's keys become this command's defaults; flags on the command line still win."""
    if value is None or ctx.resilient_parsing:
        return value
    from rewriter.config import command_defaults, load_config, option_key

    root = ctx.find_root()
    try:
        others = {k for cmd in getattr(root.command, "commands", {}).values() for p in cmd.params if (k := option_key(p))}
        found = command_defaults(load_config(value), ctx.command.params, global_params=root.command.params, other_keys=others)
    except RewriterError as exc:
        if _state["debug"]:
            raise
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(2) from None
    ctx.default_map = {**(ctx.default_map or {}), **found.default_map}
    for name, flag in found.global_options.items():  # --quiet/--verbose/--debug given before the command win
        source = root.get_parameter_source(name)
        if source is None or source.name != "COMMANDLINE":
            _state[name] = flag
    if found.global_options:
        _setup_logging(bool(_state.get("verbose")), bool(_state.get("quiet")))
    return value


ConfigOpt = typer.Option(
    None, "--config", is_eager=True, callback=_config_defaults,
    help="TOML file of option defaults: keys are option names (max-error = \"cosine>=0.999\"); flags given here win.",
)


def _shapes(texts: Optional[list[str]]) -> dict[str, tuple[int, ...]]:
    from rewriter.shapes import parse_input_shapes

    return parse_input_shapes(texts or [])


def _model_path(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an ONNX model file")
    return path


def _feedset(model, feeds: Optional[list[Path]], count: int, seed: int, images: Optional[Path] = None, image_spec: Optional[str] = None):  # type: ignore[no-untyped-def]
    """Feeds for validation: an image folder or user files (split into calibration/validation), else seeded random."""
    from rewriter.validation.feeds import feedset_for, input_specs

    return feedset_for(input_specs(model.proto, model.input_shapes), feeds=feeds, images=images, image_spec=image_spec, count=count, seed=seed)


def _quiet() -> bool:
    return bool(_state.get("quiet"))


def _fmt_int(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


# -- commands ----------------------------------------------------------------------------------------
@app.command()
@guarded
def analyze(
    model: Path = typer.Argument(..., help="ONNX model file."),
    input_shape: Optional[list[str]] = InputShapeOpt,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full analysis as JSON."),
    top: int = typer.Option(20, "--top", min=1, help="How many expensive convs to list."),
    config_file: Optional[Path] = ConfigOpt,
    max_model_bytes: Optional[int] = typer.Option(None, "--max-model-bytes", min=1, help="Refuse models (file plus external data) larger than this."),
) -> None:
    """MACs and params per node, the expensive dense KxK convs, and the op histogram."""
    from rewriter.analysis import analyze as run_analysis
    from rewriter.model import Model
    from rewriter.report import write_json

    m = Model.from_source(_model_path(model), _shapes(input_shape), max_bytes=max_model_bytes)
    result = run_analysis(m)
    ranked = result.expensive_convs()
    if json_path is not None:
        write_json({"model": str(model), "input_shapes": {k: list(v) for k, v in m.input_shapes.items()}, **result.to_dict()}, json_path)
    if _quiet():
        return
    out.print(f"{model}: {sum(result.histogram.values())} nodes, {_fmt_int(result.total_macs)} MACs, {_fmt_int(result.total_params)} params")
    table = Table(title=f"Expensive dense KxK convs ({len(ranked)}; top {min(top, len(ranked))})")
    for col in ("#", "node", "kernel", "channels", "output", "MACs", "share"):
        table.add_column(col, justify="right" if col in ("#", "MACs", "share") else "left")
    for i, (c, share) in enumerate(ranked[:top], 1):
        kernel = "x".join(map(str, c.kernel))
        table.add_row(str(i), c.name, kernel, f"{c.in_channels}->{c.out_channels}", "x".join(map(str, c.output_shape or ())), _fmt_int(c.macs), f"{share:.1%}")
    out.print(table)
    hist = Table(title="Op histogram")
    hist.add_column("op")
    hist.add_column("count", justify="right")
    for op, n in result.histogram.items():
        hist.add_row(op, str(n))
    out.print(hist)


@app.command(name="passes")
@guarded
def list_passes() -> None:
    """List the available passes (exact ones run by default)."""
    from rewriter.registry import available_passes

    table = Table(title="Passes")
    for col in ("name", "kind", "default", "what it does"):
        table.add_column(col)
    for name, cls in available_passes().items():
        table.add_row(name, "exact" if cls.exact else "lossy", "yes" if cls.exact else "no", cls.summary)
    out.print(table)


# -- options shared by optimize and optimize-many ------------------------------------------------------
PassesOpt = typer.Option(None, "--passes", help="Comma-separated pass names (default: all exact passes).")
MetricRayOpt = typer.Option(None, "--metric-ray-address", help="Run a sharded --metric's map over this Ray cluster (auto, ray://HOST:10001); needs the 'ray' extra of onnx-rewriter.")
NumFeedsOpt = typer.Option(8, "--num-feeds", min=1, help="Random feeds to judge numerics on.")
SeedOpt = typer.Option(0, "--seed", help="Seed of random feeds.")
MaxErrorOpt = typer.Option(None, "--max-error", help="Budget of lossy passes, e.g. cosine>=0.999,top1-drop<=0.01.")
RtolOpt = typer.Option(1e-4, "--rtol", help="Exact gate: relative tolerance.")
AtolOpt = typer.Option(1e-5, "--atol", help="Exact gate: absolute tolerance.")
LatencyOpt = typer.Option(True, "--latency/--no-latency", help="Gate rewrites on measured latency.")
SubgraphOpt = typer.Option(True, "--subgraph/--whole-model", help="Time each rewrite on its region (fast) or the whole model.")
MinSpeedupOpt = typer.Option(1.0, "--min-speedup", help="Lossy rewrites are kept only if the speedup CI lies above this.")
ExactMinSpeedupOpt = typer.Option(0.99, "--exact-min-speedup", help="Exact rewrites are rolled back if the speedup CI lies wholly below this.")
MaxPairsOpt = typer.Option(40, "--max-pairs", min=4, help="Most interleaved timing pairs per comparison.")
TimeBudgetOpt = typer.Option(None, "--time-budget", min=0, help="Seconds the optimization may take (search and closing measurements; candidates left are not tried).")
TargetSpeedupOpt = typer.Option(None, "--target-speedup", help="Lossy passes stop once the whole model is measured this much faster than the input (95% CI lower bound), leaving the rest of the error budget unspent; with --fail-if-no-speedup, the gate requires it.")
MaxModelBytesOpt = typer.Option(None, "--max-model-bytes", min=1, help="Refuse models (file plus external data) larger than this.")
ExternalDataOpt = typer.Option(None, "--external-data/--no-external-data", help="Store weights in OUTPUT.data (default: only over 2 GiB).")
ScreenOpt = typer.Option(True, "--screen/--no-screen", help="Lossy passes: measure each family's mildest rewrite alone first and try candidates by MACs saved per predicted error (off: the pass's own order).")
FailIfNoSpeedupOpt = typer.Option(False, "--fail-if-no-speedup", help="Gate: exit 1, writing nothing, unless the end-to-end speedup CI lies above 1.")


def _optimize_options(config_file: Optional[Path], **values: Any):  # type: ignore[no-untyped-def]
    """The library's OptimizeOptions from a command's option values (and --config's pass options)."""
    from rewriter.config import load_config
    from rewriter.job import OptimizeOptions

    pass_options = load_config(config_file).pass_options if config_file is not None else {}
    values["feeds"] = tuple(str(f) for f in values.get("feeds") or ())
    values["images"] = None if values.get("images") is None else str(values["images"])
    return OptimizeOptions(pass_options=pass_options, **values)


@app.command()
@guarded
def optimize(
    model: Path = typer.Argument(..., help="ONNX model file (never modified)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the optimized model."),
    passes: Optional[str] = PassesOpt,
    input_shape: Optional[list[str]] = InputShapeOpt,
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here."),
    feeds: Optional[list[Path]] = FeedsOpt,
    images: Optional[Path] = ImagesOpt,
    image_spec: Optional[str] = ImageSpecOpt,
    metric: Optional[str] = MetricOpt,
    max_metric_drop: float = MetricDropOpt,
    min_metric: Optional[float] = MetricFloorOpt,
    metric_ray_address: Optional[str] = MetricRayOpt,
    num_feeds: int = NumFeedsOpt,
    seed: int = SeedOpt,
    max_error: Optional[str] = MaxErrorOpt,
    rtol: float = RtolOpt,
    atol: float = AtolOpt,
    latency: bool = LatencyOpt,
    subgraph: bool = SubgraphOpt,
    threads: int = ThreadsOpt,
    provider: str = ProviderOpt,
    min_speedup: float = MinSpeedupOpt,
    exact_min_speedup: float = ExactMinSpeedupOpt,
    max_pairs: int = MaxPairsOpt,
    time_budget: Optional[float] = TimeBudgetOpt,
    target_speedup: Optional[float] = TargetSpeedupOpt,
    screen: bool = ScreenOpt,
    max_model_bytes: Optional[int] = MaxModelBytesOpt,
    in_place: bool = typer.Option(False, "--in-place", help="Allow -o to be the input file."),
    external_data: Optional[bool] = ExternalDataOpt,
    fail_if_no_speedup: bool = FailIfNoSpeedupOpt,
    save_plan: Optional[Path] = typer.Option(None, "--save-plan", help="Write the kept rewrites as a plan for `apply`."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report (profiles each layer before and after)."),
    config_file: Optional[Path] = ConfigOpt,
) -> None:
    """Run the guarded pipeline and write the optimized model and its report."""
    from rewriter.html_report import profile_layers, write_html
    from rewriter.io import check_output_path, save_model, sha256_file
    from rewriter.job import optimize_model
    from rewriter.progress import decision_progress
    from rewriter.report import check_output_paths, write_json

    src = _model_path(model)
    check_output_path(src, output, in_place=in_place)  # neither the model nor its data files
    shapes = _shapes(input_shape)
    if fail_if_no_speedup and not latency:
        raise InputError("--fail-if-no-speedup needs latency measurement; drop --no-latency")
    check_output_paths(output, report, html, save_plan)
    options = _optimize_options(
        config_file, passes=passes, input_shapes=shapes, feeds=feeds, images=images, image_spec=image_spec, metric=metric,
        max_metric_drop=max_metric_drop, min_metric=min_metric, metric_ray_address=metric_ray_address, num_feeds=num_feeds,
        seed=seed, max_error=max_error, rtol=rtol, atol=atol, latency=latency, subgraph=subgraph, threads=threads,
        provider=provider, min_speedup=min_speedup, exact_min_speedup=exact_min_speedup, max_pairs=max_pairs,
        time_budget=time_budget, target_speedup=target_speedup, screen=screen, max_model_bytes=max_model_bytes,
        external_data=external_data, fail_if_no_speedup=fail_if_no_speedup,
    )
    outcome = optimize_model(src, options, progress=decision_progress(err, sys.stderr.isatty() and not _quiet()))
    result, gate = outcome.result, outcome.gate
    out_sha = None
    if not gate:
        save_model(result.model, output, external_data=external_data)
        out_sha = sha256_file(output)
        if save_plan is not None:
            outcome.plan(out_sha).save(save_plan)
    data = outcome.report(str(model), str(output), out_sha)
    if report is not None:
        write_json(data, report)
    if html is not None:
        write_html(html, data, layers=profile_layers(result, outcome.config.runtime))
    if not _quiet():
        _print_optimize(result)
    if gate:
        raise GateFailed("gate failed, no output written: " + "; ".join(gate))
    kept, replaced = len(result.in_model), len(result.kept) - len(result.in_model)
    out.print(f"wrote {output}: {kept} rewrite(s) kept" + (f" ({replaced} more kept, then replaced by stronger ones)" if replaced else "")
              + f", {len(result.decisions) - len(result.kept)} rolled back"
              + (f", end-to-end speedup {result.final_latency.ci}" if result.final_latency else ""))


def _print_optimize(result) -> None:  # type: ignore[no-untyped-def]
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
        decision = "kept" if d.kept else f"rolled back: {d.reason}"
        table.add_row(c.pass_name, ", ".join(c.nodes), f"{_fmt_int(c.cost.macs_before)}->{_fmt_int(c.cost.macs_after)}", err_txt, lat, decision)
    if result.decisions:
        out.print(table)
    skips = sum(len(r.skips) for r in result.passes)
    if skips:
        out.print(f"{skips} place(s) skipped by passes (reasons in the JSON report)")
    b, a = result.before, result.after
    out.print(
        f"nodes {sum(b.histogram.values())} -> {sum(a.histogram.values())}, MACs {_fmt_int(b.total_macs)} -> {_fmt_int(a.total_macs)}, "
        f"params {_fmt_int(b.total_params)} -> {_fmt_int(a.total_params)}"
    )
    for name, s in result.final_numerics.items():
        out.print(f"output {name}: max abs err {s.max_abs:.3g}, cosine {s.cosine:.6f}" + (f", top-1 agreement {s.top1:.3f}" if s.top1 is not None else ""))
    if result.target_speedup is not None:
        shown = result.final_latency.ci if result.final_latency is not None else "nothing kept"
        out.print(f"target speedup {result.target_speedup:g}x: {'reached' if result.target_reached else 'not reached'} ({shown})")


@app.command(name="optimize-many")
@guarded
def optimize_many_cmd(
    models: list[Path] = typer.Argument(..., help="ONNX model files (never modified)."),
    out_dir: Path = typer.Option(..., "--out-dir", help="Folder for <stem>.onnx, <stem>.report.json and summary.json (created if missing)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Models at once: local worker processes (default: one per core) or Ray tasks in flight."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Run each model as a Ray task on this cluster: auto, ray://HOST:10001 or local (needs the 'ray' extra of onnx-rewriter)."),
    cpus_per_job: Optional[int] = typer.Option(None, "--cpus-per-job", min=1, help="Whole CPUs each Ray task requests (default: --threads)."),
    save_plans: bool = typer.Option(False, "--save-plans", help="Also write each model's kept rewrites as <stem>.plan.json for `apply`."),
    passes: Optional[str] = PassesOpt,
    input_shape: Optional[list[str]] = InputShapeOpt,
    feeds: Optional[list[Path]] = FeedsOpt,
    images: Optional[Path] = ImagesOpt,
    image_spec: Optional[str] = ImageSpecOpt,
    metric: Optional[str] = MetricOpt,
    max_metric_drop: float = MetricDropOpt,
    min_metric: Optional[float] = MetricFloorOpt,
    metric_ray_address: Optional[str] = MetricRayOpt,
    num_feeds: int = NumFeedsOpt,
    seed: int = SeedOpt,
    max_error: Optional[str] = MaxErrorOpt,
    rtol: float = RtolOpt,
    atol: float = AtolOpt,
    latency: bool = LatencyOpt,
    subgraph: bool = SubgraphOpt,
    threads: int = ThreadsOpt,
    provider: str = ProviderOpt,
    min_speedup: float = MinSpeedupOpt,
    exact_min_speedup: float = ExactMinSpeedupOpt,
    max_pairs: int = MaxPairsOpt,
    time_budget: Optional[float] = TimeBudgetOpt,
    target_speedup: Optional[float] = TargetSpeedupOpt,
    screen: bool = ScreenOpt,
    max_model_bytes: Optional[int] = MaxModelBytesOpt,
    external_data: Optional[bool] = ExternalDataOpt,
    fail_if_no_speedup: bool = FailIfNoSpeedupOpt,
    config_file: Optional[Path] = ConfigOpt,
) -> None:
    """Optimize many models, one guarded job each (local processes or Ray tasks); exit 1 if any failed."""
    from rewriter.fleet import optimize_many

    options = _optimize_options(
        config_file, passes=passes, input_shapes=_shapes(input_shape), feeds=feeds, images=images, image_spec=image_spec,
        metric=metric, max_metric_drop=max_metric_drop, min_metric=min_metric, metric_ray_address=metric_ray_address,
        num_feeds=num_feeds, seed=seed, max_error=max_error, rtol=rtol, atol=atol, latency=latency, subgraph=subgraph,
        threads=threads, provider=provider, min_speedup=min_speedup, exact_min_speedup=exact_min_speedup, max_pairs=max_pairs,
        time_budget=time_budget, target_speedup=target_speedup, screen=screen, max_model_bytes=max_model_bytes,
        external_data=external_data, fail_if_no_speedup=fail_if_no_speedup,
    )
    result = optimize_many(models, out_dir, options, jobs=jobs, ray_address=ray_address, cpus_per_job=cpus_per_job, save_plans=save_plans)
    if not _quiet():
        _print_fleet(result)
    counts = result.counts()
    how = f"{result.workers} worker process(es)" if result.mode == "local" else f"up to {result.workers} Ray task(s) in flight"
    out.print(f"{counts['ok']} of {counts['total']} model(s) ok ({how}, {result.seconds:.1f} s); summary: {result.summary}")
    if result.failed:
        names = ", ".join(m.input for m in result.failed[:5]) + (", ..." if len(result.failed) > 5 else "")
        err.print(f"error: {len(result.failed)} of {counts['total']} model(s) failed ({names}); see {result.summary}", markup=False)
        raise typer.Exit(1)


def _print_fleet(result) -> None:  # type: ignore[no-untyped-def]
    from rich.text import Text

    table = Table(title=f"Models ({result.mode})")
    for col in ("model", "status", "kept", "rolled back", "speedup [95% CI]", "MACs", "seconds", "output / error"):
        table.add_column(col, overflow="fold", justify="right" if col in ("kept", "rolled back", "seconds") else "left")
    for m in result.models:
        speedup = "-" if m.speedup is None else f"{m.speedup:.3f}x [{m.speedup_ci[0]:.3f}, {m.speedup_ci[1]:.3f}]"
        macs = "-" if m.macs_before is None else f"{_fmt_int(m.macs_before)}->{_fmt_int(m.macs_after or 0)}"
        table.add_row(Text(m.input), m.status, str(m.kept), str(m.rolled_back), speedup, macs, f"{m.seconds:.1f}",
                      Text((m.output if m.ok else m.error) or ""))
    out.print(table)


@app.command(name="apply")
@guarded
def apply_plan_cmd(
    model: Path = typer.Argument(..., help="ONNX model file (never modified)."),
    plan: Path = typer.Option(..., "--plan", help="Plan written by optimize --save-plan."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the rewritten model."),
    force: bool = typer.Option(False, "--force", help="Replay even if the model or calibration data differ from the plan's."),
    feeds: Optional[list[Path]] = FeedsOpt,
    images: Optional[Path] = ImagesOpt,
    image_spec: Optional[str] = ImageSpecOpt,
    seed: int = typer.Option(0, "--seed", help="Seed of the feeds split (calibrated lossy steps only)."),
    max_model_bytes: Optional[int] = typer.Option(None, "--max-model-bytes", min=1, help="Refuse models (file plus external data) larger than this."),
    in_place: bool = typer.Option(False, "--in-place", help="Allow -o to be the input file."),
    external_data: Optional[bool] = typer.Option(None, "--external-data/--no-external-data", help="Store weights in OUTPUT.data (default: only over 2 GiB)."),
    config_file: Optional[Path] = ConfigOpt,
) -> None:
    """Replay a plan's rewrites without measuring: the same model and plan give the same bytes."""
    from rewriter.io import check_output_path, save_model, sha256_file
    from rewriter.model import Model
    from rewriter.plan import Plan, apply_plan

    src = _model_path(model)
    check_output_path(src, output, in_place=in_place)  # neither the model nor its data files
    the_plan = Plan.load(plan)
    feedset = None
    if the_plan.calibration is not None and (feeds or images):
        feedset = _feedset(Model.from_source(src, the_plan.input_shapes or None, max_bytes=max_model_bytes), feeds, 1, seed, images, image_spec)
    result = apply_plan(src, the_plan, force=force, max_model_bytes=max_model_bytes, feeds=feedset)
    save_model(result.model, output, external_data=external_data)
    sha = sha256_file(output)
    if the_plan.output_sha256 and result.sha256_matches and sha != the_plan.output_sha256:
        log.warning("output sha256 differs from the one recorded in the plan (another onnx/protobuf version?)")
    out.print(f"wrote {output}: {len(result.applied)} rewrite(s) replayed, sha256 {sha}")


@app.command()
@guarded
def validate(
    base: Path = typer.Argument(..., help="Reference model."),
    candidate: Path = typer.Argument(..., help="Model to judge against the reference."),
    input_shape: Optional[list[str]] = InputShapeOpt,
    feeds: Optional[list[Path]] = FeedsOpt,
    images: Optional[Path] = ImagesOpt,
    image_spec: Optional[str] = ImageSpecOpt,
    metric: Optional[str] = MetricOpt,
    max_metric_drop: float = MetricDropOpt,
    min_metric: Optional[float] = MetricFloorOpt,
    num_feeds: int = typer.Option(16, "--num-feeds", min=1, help="Random feeds to compare on."),
    seed: int = typer.Option(0, "--seed"),
    max_error: Optional[str] = typer.Option(None, "--max-error", help="Lossy budget (default: exact gate at --rtol/--atol)."),
    rtol: float = typer.Option(1e-4, "--rtol"),
    atol: float = typer.Option(1e-5, "--atol"),
    latency: bool = typer.Option(True, "--latency/--no-latency"),
    threads: int = ThreadsOpt,
    provider: str = ProviderOpt,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON."),
    config_file: Optional[Path] = ConfigOpt,
) -> None:
    """Numerics per output and the latency ratio with its 95% CI; exit 1 if out of budget or slower."""
    from rewriter.report import write_json
    from rewriter.validation.compare import validate_models
    from rewriter.validation.feeds import FeedSet
    from rewriter.validation.judge import TaskMetric, ValidationConfig, load_metric
    from rewriter.validation.numerics import Budget
    from rewriter.validation.runtime import RuntimeOptions

    from rewriter.model import Model

    shapes = _shapes(input_shape)
    base_model = Model.from_source(_model_path(base), shapes)
    feedset: FeedSet = _feedset(base_model, feeds, num_feeds, seed, images, image_spec)
    if feeds or images:  # validate compares on every given sample
        feedset = FeedSet(feedset.validation + feedset.calibration, [], feedset.source)
    config = ValidationConfig(
        budget=Budget.parse(max_error, rtol=rtol, atol=atol), runtime=RuntimeOptions(provider=provider, threads=threads), latency=latency,
        metric=None if metric is None else TaskMetric(load_metric(metric), max_metric_drop, metric, min_metric),
    )
    rep = validate_models(base_model, _model_path(candidate), input_shapes=shapes, feeds=feedset, config=config, exact=max_error is None)
    if json_path is not None:
        write_json(rep.to_dict(), json_path)
    if not _quiet():
        table = Table(title=f"Numerics vs {base.name} ({len(feedset.validation)} feeds; budget {rep.budget})")
        for col in ("output", "max abs", "mean abs", "max rel", "cosine", "SNR dB", "top-1", "top-5"):
            table.add_column(col, justify="left" if col == "output" else "right")
        for name, s in rep.numerics.items():
            table.add_row(name, f"{s.max_abs:.3g}", f"{s.mean_abs:.3g}", f"{s.max_rel:.3g}", f"{s.cosine:.6f}", f"{s.snr_db:.1f}",
                          "-" if s.top1 is None else f"{s.top1:.3f}", "-" if s.top5 is None else f"{s.top5:.3f}")
        out.print(table)
        if rep.metric_base is not None:
            out.print(f"metric {metric}: base {rep.metric_base:.6g}, candidate {rep.metric_candidate:.6g}")
        if rep.latency is not None:
            lat = rep.latency
            out.print(f"latency: base {lat.base_median_s * 1e3:.3f} ms, candidate {lat.candidate_median_s * 1e3:.3f} ms, speedup {lat.ci} over {lat.ci.pairs} interleaved pairs")
    for f in rep.failures:
        err.print(f"fail: {f}", markup=False)
    if rep.slower:
        err.print(f"fail: candidate is slower (speedup {rep.latency.ci})", markup=False)  # type: ignore[union-attr]
    out.print("PASS" if rep.passed else "FAIL")
    if not rep.passed:
        raise typer.Exit(1)


@app.command()
@guarded
def sweep(
    model: Path = typer.Argument(..., help="ONNX model file (never modified)."),
    passes: str = typer.Option("bottleneck", "--passes", help="Comma-separated passes to sweep (lossy ones are measured per step)."),
    input_shape: Optional[list[str]] = InputShapeOpt,
    feeds: Optional[list[Path]] = FeedsOpt,
    images: Optional[Path] = ImagesOpt,
    image_spec: Optional[str] = ImageSpecOpt,
    metric: Optional[str] = MetricOpt,
    max_metric_drop: float = MetricDropOpt,
    min_metric: Optional[float] = MetricFloorOpt,
    num_feeds: int = typer.Option(8, "--num-feeds", min=1, help="Random feeds (without --feeds/--images)."),
    seed: int = typer.Option(0, "--seed"),
    max_error: str = typer.Option("cosine>=0.99", "--max-error", help="The loosest budget the search may reach."),
    threads: int = ThreadsOpt,
    provider: str = ProviderOpt,
    time_budget: Optional[float] = typer.Option(None, "--time-budget", min=0, help="Seconds of validation the search may spend."),
    screen: bool = ScreenOpt,
    max_pairs: int = typer.Option(40, "--max-pairs", min=4, help="Most interleaved timing pairs per comparison."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the points as JSON."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write the speedup-vs-error curve as a self-contained HTML page."),
    config_file: Optional[Path] = ConfigOpt,
) -> None:
    """The speedup-vs-error Pareto curve of a lossy search, measured end to end at every kept step."""
    from rewriter.config import build_passes, load_config
    from rewriter.html_report import write_html
    from rewriter.model import Model
    from rewriter.report import ParetoPoint, check_output_paths, write_json
    from rewriter.sweep import sweep as run_sweep
    from rewriter.validation.judge import TaskMetric, ValidationConfig, load_metric
    from rewriter.validation.latency import TimingOptions
    from rewriter.validation.numerics import Budget
    from rewriter.validation.runtime import RuntimeOptions

    src = _model_path(model)
    check_output_paths(None, json_path, html)
    pass_options = load_config(config_file).pass_options if config_file is not None else {}
    selected = build_passes(passes, pass_options)
    runtime = RuntimeOptions(provider=provider, threads=threads)
    runtime.providers()
    config = ValidationConfig(
        budget=Budget.parse(max_error), runtime=runtime, timing=TimingOptions(max_pairs=max_pairs, min_pairs=min(10, max_pairs)),
        metric=None if metric is None else TaskMetric(load_metric(metric), max_metric_drop, metric, min_metric),
    )
    source = Model.from_source(src, _shapes(input_shape))
    feedset = _feedset(source, feeds, num_feeds, seed, images, image_spec)
    result = run_sweep(source, selected, feeds=feedset, config=config, time_budget_s=time_budget, screen=screen)
    if json_path is not None:
        write_json({"model": str(model), **result.to_dict()}, json_path)
    if html is not None:
        points = [ParetoPoint(p.speedup, p.error, f"step {p.step}") for p in result.points]
        report = {"tool": "onnx-rewriter", "input": {"path": str(model)}, "decisions": [], "passes": [], "totals": {},
                  "budget": result.search.budget, "pareto": [p.to_dict() for p in points]}
        write_html(html, report)
    table = Table(title=f"Sweep of {model.name} (budget reached: {result.search.budget})")
    for col in ("step", "rewrite", "speedup [95% CI]", "1 - cosine", "max abs", "metric", "front"):
        table.add_column(col, overflow="fold")
    for p in result.points:
        table.add_row(str(p.step), p.label, f"{p.speedup:.3f}x [{p.ci_low:.3f}, {p.ci_high:.3f}]", f"{p.error:.2e}",
                      f"{p.max_abs:.3g}", "-" if p.metric is None else f"{p.metric:.4g}", "*" if p.step in result.front else "")
    out.print(table)


@app.command()
@guarded
def bench(
    model: Path = typer.Argument(..., help="ONNX model file."),
    input_shape: Optional[list[str]] = InputShapeOpt,
    runs: int = typer.Option(50, "--runs", min=2, help="Timed runs."),
    threads: int = ThreadsOpt,
    provider: str = ProviderOpt,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON."),
    config_file: Optional[Path] = ConfigOpt,
) -> None:
    """Latency median and spread, and each op type's share of the time (onnxruntime profiler)."""
    from rewriter.report import write_json
    from rewriter.validation.profile import bench_model
    from rewriter.validation.runtime import RuntimeOptions

    res = bench_model(_model_path(model), input_shapes=_shapes(input_shape), runs=runs, options=RuntimeOptions(provider=provider, threads=threads))
    if json_path is not None:
        write_json({"model": str(model), "provider": provider, "threads": threads, "latency": res.latency.to_dict(),
                    "op_share": res.op_share, "op_time_ms_per_run": res.op_time_ms}, json_path)
    lat = res.latency
    out.print(f"{model}: median {lat.median_s * 1e3:.3f} ms (p5 {lat.p05_s * 1e3:.3f}, p95 {lat.p95_s * 1e3:.3f}) over {lat.runs} runs, {threads} thread(s), {provider}")
    if _quiet():
        return
    table = Table(title="Time per op type")
    for col in ("op", "ms/run", "share"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for op, share in res.op_share.items():
        table.add_row(op, f"{res.op_time_ms[op]:.3f}", f"{share:.1%}")
    out.print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
