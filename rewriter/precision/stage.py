"""The precision stage of ``optimize --precision int8``: the guarded int8 search on the structure passes' result,
judged against the *original* model, and kept only where it is shown faster than the float result.

After the structure passes (and their held-out confirmation), :func:`run_stage`:

1. **Refuses** what cannot be quantized, with the reason in the report: a model that already holds QDQ or
   integer ops (never quantized twice), feeds without a calibration split, a budget of exact bounds only.
2. **Searches** (:func:`~rewriter.precision.search.search_int8`, leave-one-out ranking) with a
   :class:`~rewriter.precision.check.BudgetCheck` of the run's lossy budget (and task metric) against the
   **original** model: the error of structure + precision together. Calibration feeds calibrate; validation
   feeds choose; the held-out test split only confirms (and decides how many more units stay float).
   The ranking's trials stop at half of what the run's ``--time-budget`` has left (the bisection is not bounded:
   a written model must hold).
3. **Islands** (the search's step 5): each int8 island of at most ``island_max_share`` of the model's MACs, at
   most ``max_islands`` of them, is timed with and without int8 (primary profile); one *shown slower* in int8
   goes back to float.
4. **Latency gate**: the int8 model is timed against the float result at every deployment profile
   (:meth:`Judge.model_latency <rewriter.validation.judge.Judge.model_latency>`); it is kept only when shown
   faster (the 95% CI of ``t_float / t_int8`` wholly above 1) at each, else the float result is kept and the
   report says why. Without latency measurement int8 is never kept (it cannot be shown to pay).

When int8 is kept, :func:`apply_stage` makes it the written model: the final numerics are the int8 model's
against the original (validation feeds), the final latency the int8 model's against the original at each
profile, and the totals its analysis, so the final gate and the report describe what is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import onnx

from rewriter.precision.check import BudgetCheck
from rewriter.precision.int8 import Int8Options, opset, refusal
from rewriter.precision.leave_one_out import unit_macs
from rewriter.precision.search import Int8Result, IslandPays, SearchOptions, search_int8

if TYPE_CHECKING:
    from rewriter.pipeline import OptimizeResult
    from rewriter.validation.feeds import FeedSet
    from rewriter.validation.judge import Judge
    from rewriter.validation.latency import LatencyComparison

log = logging.getLogger(__name__)

#: The precisions ``--precision`` accepts.
PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class PrecisionOptions:
    """The stage's options: the search's (recipe, ranking bounds) and the island timings' caps."""

    search: SearchOptions = field(default_factory=SearchOptions)
    #: Islands of at most this share of the model's MACs are timed (larger ones are assumed to pay).
    island_max_share: float = 0.05
    #: At most this many island timings.
    max_islands: int = 4


@dataclass
class PrecisionResult:
    """What the stage did. ``status``: ``int8`` / ``mixed`` (int8 written), ``float`` (searched, float kept:
    no unit holds, or int8 is not shown faster), ``broken`` (even float fails the budget) or ``skipped``."""

    status: str
    kept: bool
    reason: str
    recipe: dict[str, Any]
    normalizations: tuple[str, ...] = ()
    search: Int8Result | None = None
    latency: list[dict[str, Any]] = field(default_factory=list)
    budget: dict[str, dict[str, Any]] = field(default_factory=dict)
    island_timings: int = 0
    seconds: float = 0.0
    model: onnx.ModelProto | None = field(default=None, repr=False)
    #: The latency gate's comparisons (int8 against the float result), by profile.
    compared: dict[Any, LatencyComparison] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        s = self.search
        return {
            "precision": "int8", "status": self.status, "kept": self.kept, "reason": self.reason, "recipe": self.recipe,
            "normalizations": list(self.normalizations), "counts": s.counts if s else {"int8": 0, "float": 0},
            "nodes": [d.to_dict() for d in s.nodes] if s else [], "trials": len(s.trials) if s else 0,
            "quantizations": s.quantizations if s else 0, "ranking": s.ranking if s else {},
            "rolled_back_islands": [list(i) for i in s.rolled_back_islands] if s else [],
            "island_timings": self.island_timings, "latency": self.latency, "budget": self.budget,
            "seconds": round(self.seconds, 3),
        }


def recipe(options: Int8Options) -> dict[str, Any]:
    """The quantization recipe as reported."""
    return {"format": "QDQ", "weights": "int8 symmetric", "per_channel": options.per_channel,
            "activations": options.activations, "reduce_range": options.reduce_range, "preprocess": options.preprocess,
            "calibration": "MinMax", "tool": "onnxruntime.quantization.quantize_static"}


def recipe_options(recipe: dict[str, Any]) -> Int8Options:
    """The :class:`Int8Options` of a reported (or planned) recipe."""
    return Int8Options(activations=str(recipe.get("activations", "uint8")), per_channel=bool(recipe.get("per_channel", True)),
                       reduce_range=bool(recipe.get("reduce_range", False)), preprocess=bool(recipe.get("preprocess", True)))


def _skipped(why: str, options: PrecisionOptions, start: float) -> PrecisionResult:
    log.info("int8 stage skipped: %s", why)
    return PrecisionResult("skipped", False, why, recipe(options.search.int8), seconds=time.perf_counter() - start)


def _island_hook(judge: Judge, model: onnx.ModelProto, feeds: FeedSet, options: PrecisionOptions) -> tuple[IslandPays | None, list[int]]:
    """``island_pays``: an island of at most ``island_max_share`` of the MACs (at most ``max_islands`` timed) pays
    unless int8 is shown slower with it than without; the count of timings taken is in the list."""
    if not judge.config.latency or options.max_islands <= 0:
        return None, [0]
    feed = (feeds.calibration or feeds.validation)[0]
    macs = unit_macs(model, {k: tuple(v.shape) for k, v in feed.items()})
    total = max(1, sum(macs.values()))
    taken = [0]

    def pays(island: frozenset[str], with_int8: onnx.ModelProto, without: onnx.ModelProto) -> bool:
        share = sum(macs.get(u, 0) for u in island) / total
        if share > options.island_max_share or taken[0] >= options.max_islands:
            return True
        taken[0] += 1
        slower = judge.model_latency(without, with_int8).ci.slower(1.0)
        log.info("int8 island of %d node(s) (%.1f%% of MACs): %s", len(island), 100 * share, "slower" if slower else "pays")
        return not slower

    return pays, taken


def _latency_gate(judge: Judge, float_model: onnx.ModelProto, int8: onnx.ModelProto,
                  compared: dict[Any, LatencyComparison]) -> tuple[list[dict[str, Any]], str | None]:
    """The int8 model against the float result at every profile (each comparison also put in ``compared``), and
    why it does not pay (``None``: it does)."""
    if not judge.config.latency:
        return [], "latency not measured (--no-latency): int8 cannot be shown faster, the float result is kept"
    rows, why = [], None
    for profile in judge.config.deployments:
        cmp = compared[profile] = judge.model_latency(float_model, int8, profile)
        rows.append({**profile.to_dict(), **cmp.to_dict(), "faster": cmp.ci.faster(1.0)})
        if why is None and not cmp.ci.faster(1.0):
            why = f"int8 not shown faster than float at {profile.label}: speedup {cmp.ci}; the float result is kept"
    return rows, why


def _bounded(search: SearchOptions, judge: Judge) -> SearchOptions:
    """The search's options with the ranking's seconds at most half of what the run's deadline has left."""
    deadline = getattr(judge, "deadline", None)
    end = None if deadline is None else deadline.end
    if end is None:
        return search
    half = max(0.0, end - time.perf_counter()) / 2
    seconds = search.leave_one_out.seconds
    return replace(search, leave_one_out=replace(search.leave_one_out, seconds=half if seconds is None else min(seconds, half)))


def _budget(check: BudgetCheck, model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """The budget on each split of ``model`` against the original: failures and spend (fraction used)."""
    out = {}
    for split in ("validation", "test"):
        if split in check.splits:
            spend = check.spend(model, split)
            out[split] = {"feeds": len(check.splits[split]), "holds": not check(model, split),
                          "spend": spend if spend == spend and abs(spend) != float("inf") else None}
    return out


def run_stage(original: onnx.ModelProto, float_model: onnx.ModelProto, feeds: FeedSet, judge: Judge,
              options: PrecisionOptions | None = None) -> PrecisionResult:
    """The stage of the module docstring on ``float_model`` (the structure result), judged against ``original``."""
    options = options or PrecisionOptions()
    start = time.perf_counter()
    why = refusal(original) or refusal(float_model)
    if why is not None:
        return _skipped(why, options, start)
    if not feeds.calibration or feeds.synthetic:
        return _skipped("no calibration data: int8 is calibrated on real feeds (--images, --feeds, --data-loader-script)",
                        options, start)
    budget = judge.config.budget
    check = BudgetCheck(original, {"validation": feeds.validation, "test": feeds.test}, budget, judge.config.metric,
                        judge.config.runtime)
    pays, taken = _island_hook(judge, float_model, feeds, options)
    result = search_int8(float_model, feeds.calibration, check, has_test=check.has_test,
                         options=_bounded(options.search, judge), island_pays=pays, spend=check.spend)
    base = PrecisionResult(result.status, False, "", recipe(options.search.int8), result.normalizations, result,
                           island_timings=taken[0])
    if result.status == "float" and result.rolled_back_islands:
        base.reason = (f"every int8 island was shown slower than float ({len(result.rolled_back_islands)} timed): "
                       "the float result is kept")
    elif result.status in ("float", "broken"):
        base.reason = ("no unit can be int8 within the budget: the float result is kept" if result.status == "float"
                       else "the budget fails even with every unit float: the float result is kept")
    else:
        base.budget = _budget(check, result.model)
        base.latency, slow = _latency_gate(judge, float_model, result.model, base.compared)
        if slow is None:
            base.kept, base.model = True, result.model
            base.reason = f"{result.counts['int8']} of {len(result.nodes)} unit(s) int8, shown faster at every profile"
        else:
            base.status, base.reason = "float", slow
    base.seconds = time.perf_counter() - start
    log.info("int8 stage: %s (%s)", base.status, base.reason)
    return base


def apply_stage(result: OptimizeResult, feeds: FeedSet, judge: Judge, options: PrecisionOptions | None = None,
                progress: Callable[[str], None] | None = None) -> None:
    """Run the stage on ``result.model`` and, when int8 is kept, make it the written model (numerics and latency
    against the original re-measured, so the final gate judges it); ``result.precision`` is set either way."""
    from rewriter.validation.judge import ProfileLatency
    from rewriter.validation.runtime import eval_session

    stage = run_stage(result.original, result.model, feeds, judge, options)
    result.precision = stage
    if not stage.kept or stage.model is None:
        return
    from rewriter.analysis import analyze
    from rewriter.model import Model

    model = stage.model
    result.model = model
    try:  # the totals describe what is written: ops (with the Q/DQ pairs), MACs and parameters of the int8 model
        result.after = analyze(Model(model, result.input_shapes))
    except Exception as exc:  # the float result's totals stay, and the log says why
        log.warning("the int8 model could not be analysed (%s: %s); totals describe the float result", type(exc).__name__, exc)
    result.final_numerics = judge.numerics(model, eval_session(model, judge.config.runtime))  # as deployed
    profiles: Sequence[Any] = judge.config.deployments
    # Without a structure rewrite the float result is the input: the gate already timed this very pair.
    same_pair = not any(d.kept for d in result.decisions)
    final = [ProfileLatency(p, stage.compared[p] if same_pair and p in stage.compared else judge.model_latency(result.original, model, p), "model")
             for p in profiles]
    result.final_latency = final[0].latency
    result.profile_latency = final if len(final) > 1 else []
    result.same_deployed = False
    log.info("int8 written: opset %d, %s", opset(model), stage.reason)
