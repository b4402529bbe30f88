"""Option groups (after Polygraphy's argument groups): each group declares its flags once, shows them
under its own ``--help`` panel, and builds one object from their values.

A command takes a group as one keyword-only parameter, typed with the object the group builds, and
:func:`compose` puts the group's flags in the parameter's place::

    @app.command()
    @guarded
    @compose(feeds=FEEDS, budget=BUDGET.only("max_error", "metric"))
    def check(model: Path = typer.Argument(...), *, feeds: FeedOptions, budget: BudgetOptions) -> None:
        config = validation_config(budget, MeasureOptions())

A command that needs a flag with another default or help, or only some of a group's flags, says so with
:meth:`Group.only` and :meth:`Group.but`; a flag left out gets the object's default.

The groups (and their ``--help`` panels): :data:`MODEL` ("Inputs and shapes": input shapes, size limit),
:data:`FEEDS` ("Data": feeds, calibration and held-out split), :data:`BUDGET` (error budget and task metric),
:data:`TIMING` (latency measurement), :data:`SEARCH` (passes, time budget, speedup target) and :data:`OUTPUT`
(where results are written). A command's own options name one of these panels too (``rich_help_panel``), so
``--help`` lists every option under what it is about.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Optional, TypeVar

import typer

from rewriter.options import BudgetOptions, FeedOptions, MeasureOptions, SearchOptions

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Flag:
    """One command-line option: its parameter name (the built object's field), type, default and flags."""

    name: str
    annotation: Any
    default: Any
    decls: tuple[str, ...]
    help: Optional[str] = None
    min: Optional[float] = None

    def parameter(self, panel: str) -> inspect.Parameter:
        extra = {} if self.min is None else {"min": self.min}
        option = typer.Option(self.default, *self.decls, help=self.help, rich_help_panel=panel, **extra)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=self.annotation)


@dataclass(frozen=True)
class Group(Generic[T]):
    """Flags under one help panel and the function that builds the group's object from their values."""

    panel: str
    flags: tuple[Flag, ...]
    build: Callable[..., T] = field(repr=False)

    def only(self, *names: str) -> Group[T]:
        """The group with only these flags (the others take the object's defaults)."""
        unknown = set(names) - {f.name for f in self.flags}
        if unknown:
            raise ValueError(f"group {self.panel!r} has no flag(s) {sorted(unknown)}")
        return replace(self, flags=tuple(f for f in self.flags if f.name in names))

    def but(self, **changes: Mapping[str, Any]) -> Group[T]:
        """The group with some flags changed, e.g. ``but(seed={"help": None})``."""
        unknown = set(changes) - {f.name for f in self.flags}
        if unknown:
            raise ValueError(f"group {self.panel!r} has no flag(s) {sorted(unknown)}")
        return replace(self, flags=tuple(replace(f, **changes.get(f.name, {})) for f in self.flags))

    def parameters(self) -> list[inspect.Parameter]:
        return [f.parameter(self.panel) for f in self.flags]

    def take(self, values: dict[str, Any]) -> T:
        """Remove this group's values from a command's keyword arguments and build the object."""
        return self.build(**{f.name: values.pop(f.name) for f in self.flags})


def compose(**groups: Group[Any]) -> Callable[[F], F]:
    """Replace each keyword parameter named here by the flags of its group; the command receives the
    group's object in that parameter."""

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        missing = set(groups) - set(sig.parameters)
        if missing:
            raise TypeError(f"{fn.__name__} has no parameter(s) {sorted(missing)} for its groups")
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
            for p in sig.parameters.values()
            if p.name not in groups
        ]
        params = sorted(own + [p for g in groups.values() for p in g.parameters()], key=_panel_rank)
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise TypeError(f"{fn.__name__}: a flag is declared twice: {sorted(n for n in names if names.count(n) > 1)}")

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            for name, group in groups.items():
                kwargs[name] = group.take(kwargs)
            return fn(**kwargs)

        wrapper.__signature__ = sig.replace(parameters=params, return_annotation=hints.get("return", sig.empty))  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper  # type: ignore[return-value]

    return decorate


#: The order of the --help panels after typer's "Arguments" and "Options" (--config, --help): the groups'
#: panels in the order a user thinks of them, a command's panels of its own just before "Output".
PANEL_ORDER = ("Inputs and shapes", "Data", "Budget", "Latency", "Search", "Output")


def _panel_rank(p: inspect.Parameter) -> float:
    """Where a parameter's panel comes in ``--help`` (a stable sort keeps the order within a panel)."""
    panel = getattr(p.default, "rich_help_panel", None)
    if isinstance(p.default, typer.models.ArgumentInfo) or panel is None:
        return -1
    return PANEL_ORDER.index(panel) if panel in PANEL_ORDER else PANEL_ORDER.index("Output") - 0.5


# -- the objects the CLI-only groups build -----------------------------------------------------------
@dataclass(frozen=True)
class ModelArgs:
    """How a model file is read: ``--input-shape`` texts (parsed when used) and the size limit."""

    input_shape: tuple[str, ...] = ()
    max_model_bytes: Optional[int] = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        from rewriter.shapes import parse_input_shapes

        return parse_input_shapes(list(self.input_shape))

    def load(self, path: Path) -> Any:
        """The :class:`~rewriter.model.Model` of a model file (checked to be a file first)."""
        from rewriter.cli.app import model_path
        from rewriter.model import Model

        return Model.from_source(model_path(path), self.shapes(), max_bytes=self.max_model_bytes)


@dataclass(frozen=True)
class OutputArgs:
    """Where a command writes: the model (``-o``), its report, plan and HTML page, and how."""

    output: Optional[Path] = None
    report: Optional[Path] = None
    in_place: bool = False
    external_data: Optional[bool] = None
    save_plan: Optional[Path] = None
    html: Optional[Path] = None


def _model_args(input_shape: Optional[list[str]] = None, max_model_bytes: Optional[int] = None) -> ModelArgs:
    return ModelArgs(tuple(input_shape or ()), max_model_bytes)


def _feed_options(**values: Any) -> FeedOptions:
    feeds, images = values.pop("feeds", None), values.pop("images", None)
    return FeedOptions(tuple(str(f) for f in feeds or ()), None if images is None else str(images), **values)


def _measure_options(**values: Any) -> MeasureOptions:
    return MeasureOptions(**{**values, "profiles": tuple(values.get("profiles") or ())} if "profiles" in values else values)


# -- the groups --------------------------------------------------------------------------------------
MODEL: Group[ModelArgs] = Group("Inputs and shapes", (
    Flag("input_shape", Optional[list[str]], None, ("--input-shape",), "Resolve an input's dims: NAME:1x3x224x224 (repeatable)."),
    Flag("max_model_bytes", Optional[int], None, ("--max-model-bytes",), "Refuse models (file plus external data) larger than this.", min=1),
), _model_args)

FEEDS: Group[FeedOptions] = Group("Data", (
    Flag("feeds", Optional[list[Path]], None, ("--feeds",), ".npy/.npz file of inputs (repeatable); default: seeded random feeds."),
    Flag("images", Optional[Path], None, ("--images",), "Folder of images to use as feeds (needs --image-spec)."),
    Flag("image_spec", Optional[str], None, ("--image-spec",),
         "HxW[,NCHW|NHWC][,RGB|BGR][,mean=a/b/c][,std=a/b/c][,scale=s][,resize=stretch|letterbox|crop|pad][,fill=v|r/g/b]"),
    Flag("data_loader_script", Optional[str], None, ("--data-loader-script",),
         "FILE.py[:FUNCTION] (default load_data) yielding dicts of input name -> array: feeds with your own preprocessing."),
    Flag("num_feeds", int, 8, ("--num-feeds",), "Random feeds to judge numerics on.", min=1),
    Flag("seed", int, 0, ("--seed",), "Seed of random feeds."),
    Flag("holdout_fraction", float, 0.25, ("--holdout-fraction",),
         "Share of --feeds/--images/--data-loader-script data held out as a test split the search never sees; the result is "
         "confirmed on it and backed off until it holds (0: hold none out; random feeds have none).", min=0),
), _feed_options)

BUDGET: Group[BudgetOptions] = Group("Budget", (
    Flag("max_error", Optional[str], None, ("--max-error",), "Budget of lossy passes, e.g. cosine>=0.999,top1-drop<=0.01."),
    Flag("rtol", float, 1e-4, ("--rtol",), "Exact gate: relative tolerance."),
    Flag("atol", float, 1e-5, ("--atol",), "Exact gate: absolute tolerance."),
    Flag("metric", Optional[str], None, ("--metric",), "Task metric module:function(session) -> float, higher is better."),
    Flag("max_metric_drop", float, 0.01, ("--max-metric-drop",), "Largest allowed drop of --metric."),
    Flag("min_metric", Optional[float], None, ("--min-metric",), "Floor --metric must stay at or above."),
    Flag("metric_ray_address", Optional[str], None, ("--metric-ray-address",),
         "Run a sharded --metric's map over this Ray cluster (auto, ray://HOST:10001); needs the 'ray' extra of onnx-bottleneck."),
    Flag("precision", str, "fp32", ("--precision",),
         "fp32, or int8: after the passes, a guarded int8 search (QDQ, per-channel) within --max-error against the input, "
         "kept only if shown faster at every profile; needs --images/--feeds/--data-loader-script."),
), BudgetOptions)

TIMING: Group[MeasureOptions] = Group("Latency", (
    Flag("latency", bool, True, ("--latency/--no-latency",), "Gate rewrites on measured latency."),
    Flag("subgraph", bool, True, ("--subgraph/--whole-model",), "Time each rewrite on its region (fast) or the whole model."),
    Flag("threads", int, 1, ("--threads",), "Intra-op threads of the timed sessions.", min=1),
    Flag("batch", int, 1, ("--batch",), "Batch of the timed and numerics feeds (the model's first input dim must allow it).", min=1),
    Flag("profiles", Optional[list[str]], None, ("--profile",),
         "Deployment profile threads=T,batch=B (repeatable; the first is primary): a rewrite is kept only if it pays on every one."),
    Flag("provider", str, "cpu", ("--provider",), "Execution provider for timing: cpu, cuda, tensorrt."),
    Flag("min_speedup", float, 1.0, ("--min-speedup",), "Lossy rewrites are kept only if the speedup CI lies above this."),
    Flag("exact_min_speedup", float, 0.99, ("--exact-min-speedup",), "Exact rewrites are rolled back if the speedup CI lies wholly below this."),
    Flag("max_pairs", int, 40, ("--max-pairs",), "Most interleaved timing pairs per comparison.", min=4),
    Flag("exact_feeds", int, 2, ("--exact-feeds",),
         "Validation feeds a run of exact passes proves its result on (0: all; an exact rewrite's error is rounding, the same on any input).", min=0),
), _measure_options)

SEARCH: Group[SearchOptions] = Group("Search", (
    Flag("passes", Optional[str], None, ("--passes",), "Comma-separated pass names (default: all exact passes)."),
    Flag("time_budget", Optional[float], None, ("--time-budget",),
         "Seconds the optimization may take (search and closing measurements; candidates left are not tried).", min=0),
    Flag("target_speedup", Optional[float], None, ("--target-speedup",),
         "Lossy passes stop once the whole model is measured this much faster than the input (95% CI lower bound), leaving "
         "the rest of the error budget unspent; with --fail-if-no-speedup, the gate requires it."),
    Flag("screen", bool, True, ("--screen/--no-screen",),
         "Lossy passes: measure each family's mildest rewrite alone first and try candidates by MACs saved per predicted "
         "error (off: the pass's own order)."),
    Flag("fail_if_no_speedup", bool, False, ("--fail-if-no-speedup",),
         "Gate: exit 1, writing nothing, unless the end-to-end speedup CI lies above 1."),
    Flag("holdout_fail", bool, False, ("--holdout-fail",),
         "Gate: exit 1, writing nothing, when the result breaks the budget on the held-out test split (default: back off lossy rewrites until it holds)."),
), SearchOptions)

OUTPUT: Group[OutputArgs] = Group("Output", (
    Flag("output", Path, ..., ("--output", "-o"), "Where to write the optimized model."),
    Flag("report", Optional[Path], None, ("--report",), "Write the JSON report here."),
    Flag("in_place", bool, False, ("--in-place",), "Allow -o to be the input file."),
    Flag("external_data", Optional[bool], None, ("--external-data/--no-external-data",),
         "Store weights in OUTPUT.data (default: only over 2 GiB)."),
    Flag("save_plan", Optional[Path], None, ("--save-plan",), "Write the kept rewrites as a plan for `apply`."),
    Flag("html", Optional[Path], None, ("--html",), "Write a self-contained HTML report (profiles each layer before and after)."),
), OutputArgs)
