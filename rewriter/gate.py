"""The final gate before an output is written.

A run passes when its end-to-end numerics are within the budget (the exact budget when every kept rewrite
was exact), the optimized model is not shown slower than the input (the whole 95% CI of the speedup
``t_input / t_output`` below ``exact_min_speedup``), the budget holds on the held-out test split (see
:mod:`rewriter.holdout`: after backing off it does, unless ``--holdout-fail`` asked not to back off), and --
when a speedup is required -- the CI lies wholly above 1 (``low > 1``) and, when the run had a target speedup
``s``, at or above it (``low >= s``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rewriter.pipeline import OptimizeResult


def gate_failures(result: OptimizeResult, config: Any, *, require_speedup: bool = False) -> list[str]:
    """The final gate before an output is written: end-to-end numerics against the budget, not slower
    than the input, and (``require_speedup``) a speedup whose 95% CI lies wholly above 1 -- or at or
    above the run's target speedup (primary profile), when it had one. With several deployment profiles,
    the speedup checks hold at each of them."""
    int8 = result.precision is not None and result.precision.kept  # int8 is never exact
    any_lossy = int8 or any(not d.exact for d in result.decisions)
    budget = config.budget.for_model(result.original)  # the exact gate of a float16 model is wider
    gate = list(budget.failures(result.final_numerics, exact=not any_lossy)) if result.final_numerics else []
    held = result.holdout
    if held is not None and held.holds is False:
        failures = held.final.failures if held.final is not None else ()
        gate.append(f"the budget does not hold on the held-out test split ({held.reason}): " + "; ".join(failures))
    lat = result.final_latency
    profiles = [(f" at {p.profile.label}", p.latency) for p in result.profile_latency] or [("", lat)]
    for where, measured in profiles:
        if measured is not None and measured.ci.slower(config.exact_min_speedup):
            gate.append(f"optimized model is slower than the input{where}: speedup {measured.ci}")
    if require_speedup:
        if lat is None:
            why = ("no rewrite was kept" if not result.changed else
                   "onnxruntime runs the same graph for the output as for the input (its optimizer makes these rewrites itself)"
                   if result.same_deployed else "latency was not measured")
            gate.append("no end-to-end speedup: " + why)
            return gate
        for where, measured in profiles:
            if measured is not None and not measured.ci.faster(1.0):
                gate.append(f"no end-to-end speedup shown{where}: {measured.ci} (the 95% CI must lie above 1)")
        if not gate and result.target_reached is False:
            gate.append(f"target speedup {result.target_speedup:g}x not shown: {lat.ci} (the 95% CI must lie at or above it)")
    return gate
