"""An output-budget ranking for the int8 search, per MAC: leave-one-out from full int8, or leave-one-in from float.

For each unit ``u`` (a node onnxruntime's QDQ quantizer quantizes), the model with ``E({u})`` in float --
``u`` and the units producing its activation inputs (:func:`~rewriter.precision.search.exclusion`), which is
what keeping ``u`` float implies, since a tensor stays float only when its producer and every consumer are
float -- is quantized from the one cached calibration (:class:`~rewriter.precision.int8.Quantizer`) and judged
on the **validation** feeds by the budget's worst term (``spend``: the fraction of the budget used,
:func:`rewriter.holdout.budget_spend`; 1 is the edge). With ``s0`` the full-int8 model's spend:

    gain(u)  = s0 - spend(E({u}))
    score(u) = gain(u) / max(1, MACs(E({u})))

Units are ranked by ``score`` (cheap sensitive units go float first). This measures what the budget
judges -- the outputs -- where the local noise proxy (:mod:`rewriter.precision.sensitivity`) reads a node
far downstream of a broken one as near 0.

Leave-one-out is masked where one unit breaks the budget far more than the rest: from a full-int8 model whose
worst term is that unit's, every other unit's gain reads small. ``direction="in"`` (leave-one-in) measures
each unit from a clean base instead -- every unit float but ``u`` --

    damage(u) = spend(all float but u) - spend(all float)
    score(u)  = damage(u) / max(1, cost(u))

(the noise ``u``'s own quantization brings to the outputs -- the classic one-layer-at-a-time sensitivity,
measured on the budget -- per unit of work ``u`` does: its MACs, at least its output's elements,
:func:`unit_costs`) at the same cost, one quantization per unit. On open-nsfw
(docs/int8_nsfw.json) it keeps 24 of 75 units float with 82% of the MACs in int8, where leave-one-out kept 56
float (22% of the MACs int8) and dividing by the MACs of ``E({u})`` instead of ``u``'s kept 29 float (75%).

Graph surgery on the full-int8 model (dropping the Q/DQ pairs of ``u``) would be cheaper but does not give
the graph the exclusion gives (the quantizer drops Relu/Clip into the following QuantizeLinear, and the
producers in ``E({u})`` compute in float, not on dequantized inputs), so each trial is a real exclusion.

Cost is bounded: units are tried in the proxy's order (most sensitive first), at most ``max_units`` of them
and only while ``seconds`` allow; untried units follow the tried units that gained, in the proxy's order, and
tried units that gained nothing come last. Every trial (set, spend) and the seconds are recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

log = logging.getLogger(__name__)

#: ``spend(model, split)``: the budget's worst term as a fraction used (1: at the edge).
Spend = Callable[[onnx.ModelProto, str], float]


@dataclass(frozen=True)
class LeaveOneOutOptions:
    """The ranking's bounds: ``max_units`` trials at most, ``seconds`` of trials at most (``None``: no bound)."""

    max_units: int = 96
    seconds: float | None = 600.0
    #: ``"out"``: leave-one-out from full int8; ``"in"``: leave-one-in from float (module docstring).
    direction: str = "in"


@dataclass
class LeaveOneOut:
    """What the ranking measured: the base spend (full int8 for ``out``, all float for ``in``), each tried unit's
    spend (``E({u})`` float, or ``u`` alone int8), the MACs of that set (or of ``u``), the order, and its cost."""

    full_spend: float
    spends: dict[str, float]
    macs: dict[str, int]
    ranked: list[str]
    untried: list[str]
    seconds: float
    stopped: str = "complete"
    scores: dict[str, float] = field(default_factory=dict)
    direction: str = "out"

    def to_dict(self) -> dict[str, Any]:
        method = "leave-one-in" if self.direction == "in" else "leave-one-out"
        return {"method": method, "base_spend": _finite(self.full_spend), "tried": len(self.spends),
                "untried": len(self.untried), "stopped": self.stopped, "seconds": round(self.seconds, 3),
                "units": [{"node": u, "spend": _finite(self.spends[u]), "cost": self.macs.get(u, 0),
                           "score": _finite(self.scores.get(u, 0.0))} for u in self.ranked if u in self.spends]}


def _finite(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


def unit_macs(model: onnx.ModelProto, feed_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """MACs of each node of ``model`` (Conv, ConvTranspose, Gemm, MatMul; 0 for the rest or unknown shapes)."""
    from rewriter.analysis import analyze
    from rewriter.model import Model

    try:
        return {c.name: int(c.macs) for c in analyze(Model(model, feed_shapes)).nodes}
    except Exception as exc:  # a model the analysis cannot read ranks by gain alone
        log.warning("int8 ranking: MACs unavailable (%s: %s); ranking by gain alone", type(exc).__name__, exc)
        return {}


def unit_costs(model: onnx.ModelProto, feed_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """What each node's precision is worth, for the ranking's denominator: its MACs, and at least its output's
    element count -- an op with no MACs (Add, Mul, pooling) still reads and writes every element, and keeping it
    float costs a dequantize/quantize pair around it; counting it as free sends every such op float first."""
    from math import prod

    from rewriter.analysis import analyze
    from rewriter.model import Model

    try:
        m = Model(model, feed_shapes)
        macs = {c.name: int(c.macs) for c in analyze(m).nodes}
        out = {}
        for node in m.graph.nodes:
            shape = m.static_shape(node.outputs[0]) if node.outputs else None
            out[node.name] = max(macs.get(node.name, 0), int(prod(shape)) if shape else 0)
        return out
    except Exception as exc:  # a model the analysis cannot read ranks by gain alone
        log.warning("int8 ranking: costs unavailable (%s: %s); ranking by gain alone", type(exc).__name__, exc)
        return {}


def rank(units: Sequence[str], proxy_order: Sequence[str], closure: Callable[[str], tuple[str, ...]],
         spend_of: Callable[[tuple[str, ...]], float], macs: Mapping[str, int],
         options: LeaveOneOutOptions | None = None) -> LeaveOneOut:
    """The ranking of the module docstring (``options.direction``). ``closure(u)``: ``E({u})``; ``spend_of(excluded)``:
    the validation spend of the model with ``excluded`` in float; ``proxy_order``: the order units are tried in."""
    options = options or LeaveOneOutOptions()
    start = time.perf_counter()
    into = options.direction == "in"
    everything = tuple(sorted(units))
    full = spend_of(everything if into else ())  # the base: all float (in) or full int8 (out)
    spends: dict[str, float] = {}
    set_macs: dict[str, int] = {}
    stopped = "complete"

    def trial(unit: str) -> tuple[str, ...]:
        return tuple(u for u in everything if u != unit) if into else closure(unit)

    def cost(unit: str) -> int:
        return macs.get(unit, 0) if into else sum(macs.get(u, 0) for u in closure(unit))

    for unit in proxy_order:
        if len(spends) >= options.max_units:
            stopped = "max_units"
            break
        if options.seconds is not None and time.perf_counter() - start > options.seconds:
            stopped = "seconds"
            break
        spends[unit] = spend_of(trial(unit))
        set_macs[unit] = cost(unit)
    for unit in units:
        set_macs.setdefault(unit, cost(unit))
    scores = {u: ((s - full) if into else (full - s)) / max(1, set_macs[u]) for u, s in spends.items()}
    order = {u: i for i, u in enumerate(proxy_order)}
    gained = sorted((u for u in spends if scores[u] > 0), key=lambda u: (-scores[u], order[u]))
    untried = [u for u in proxy_order if u not in spends]
    useless = [u for u in proxy_order if u in spends and scores[u] <= 0]
    ranked = gained + untried + useless
    seconds = time.perf_counter() - start
    log.info("int8 leave-one-%s ranking: base spend %.3g, %d tried (%s), %.1f s; first: %s", options.direction, full,
             len(spends), stopped, seconds, ", ".join(f"{u} ({abs(full - spends[u]):.3g} over {set_macs[u]} MACs)" for u in gained[:5]))
    return LeaveOneOut(full, spends, set_macs, ranked, untried, seconds, stopped, scores, options.direction)
