"""The per-layer rows of the optimize report: MACs and (when profiled) latency of each layer before and after.

Per-layer latency comes from onnxruntime's profiler (:mod:`rewriter.validation.profile`): both versions are
profiled over several rounds, interleaved, each round a fresh session; each layer gets the median of its
round medians with their range, and :func:`~rewriter.validation.profile.latency_change` tells a change
from noise (the ranges must be disjoint). The end-to-end figures of the report stay the deploy-level
(``ORT_ENABLE_ALL``) ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rewriter.analysis import Analysis
from rewriter.validation.profile import LayerTime, NodeProfiler, latency_change, ort_node_profiler, profile_layer_times
from rewriter.validation.runtime import RuntimeOptions

#: Rounds of the per-layer profile (each: one fresh session per side), and profiled runs per session. With
#: nine rounds, two sides whose times come from one distribution have disjoint ranges with probability
#: 2 / C(18, 9) = 1 in 24,310 per layer: the noise rule's false alarms are rare even over hundreds of layers.
PROFILE_ROUNDS, PROFILE_RUNS = 9, 3


@dataclass(frozen=True)
class LayerRow:
    """One layer (graph node by name) before and after; ``None`` where the layer does not exist (or, for the
    times, was not profiled). ``touched``: a kept rewrite changed it (new, removed, other MACs, or named by
    a kept decision)."""

    name: str
    op: str
    macs_before: int | None
    macs_after: int | None
    time_before: LayerTime | None = None
    time_after: LayerTime | None = None
    touched: bool = False

    @property
    def ms_before(self) -> float | None:
        return None if self.time_before is None else self.time_before.median

    @property
    def ms_after(self) -> float | None:
        return None if self.time_after is None else self.time_after.median

    @property
    def change(self) -> str | None:
        """``new``, ``removed``, ``unchanged``, ``faster``, ``slower``, or ``None`` when not timed."""
        if self.time_before is None and self.time_after is None:
            return None
        if self.time_before is None:
            return "new"
        if self.time_after is None:
            return "removed"
        return latency_change(self.time_before, self.time_after)


def _order(before: Analysis, after: Analysis) -> list[str]:
    """Names of both versions in graph order; a new node sits just before the next layer (in the rewritten
    graph) that both versions have, after the layers it replaced."""
    in_before = {c.name for c in before.nodes}
    order: dict[str, tuple[float, int]] = {c.name: (i, 0) for i, c in enumerate(before.nodes)}
    nxt, sub = float(len(before.nodes)), 0
    for c in reversed(after.nodes):
        if c.name in in_before:
            nxt, sub = order[c.name][0], 0
        else:
            sub -= 1
            order[c.name] = (nxt - 0.5, sub)
    return sorted(order, key=lambda n: order[n])


def layer_rows(
    before: Analysis,
    after: Analysis,
    times_before: Mapping[str, LayerTime] | None = None,
    times_after: Mapping[str, LayerTime] | None = None,
    touched: Iterable[str] = (),
) -> list[LayerRow]:
    """Layers of both versions matched by node name, in graph order (see :func:`_order`). A profiled layer
    that recorded no kernel gets a zero time; ``touched`` names the nodes kept rewrites changed."""
    b_cost = {c.name: c for c in before.nodes}
    a_cost = {c.name: c for c in after.nodes}
    named = set(touched)
    zero = LayerTime(0.0, 0.0, 0.0, 0)

    def time(side: Mapping[str, LayerTime] | None, exists: bool, name: str) -> LayerTime | None:
        return None if side is None or not exists else side.get(name, zero)

    rows = []
    for name in _order(before, after):
        bc, ac = b_cost.get(name), a_cost.get(name)
        op = (bc or ac).op  # type: ignore[union-attr]
        mb, ma = None if bc is None else bc.macs, None if ac is None else ac.macs
        rows.append(LayerRow(name, op, mb, ma, time(times_before, bc is not None, name), time(times_after, ac is not None, name),
                             touched=name in named or bc is None or ac is None or mb != ma))
    return rows


def touched_nodes(result: Any) -> set[str]:
    """Names of the nodes the kept rewrites of an :class:`~rewriter.pipeline.OptimizeResult` matched."""
    return {n for d in result.in_model for n in d.candidate.nodes}


def profile_layers(
    result: Any,
    options: RuntimeOptions | None = None,
    *,
    rounds: int = PROFILE_ROUNDS,
    runs: int = PROFILE_RUNS,
    profiler: NodeProfiler | None = None,
) -> list[LayerRow]:
    """Layer rows of an :class:`~rewriter.pipeline.OptimizeResult`, with per-layer times before and after
    (``profiler``: onnxruntime's by default; tests hand a deterministic one)."""
    profiler = profiler or ort_node_profiler(result.input_shapes, options, runs=runs)
    before, after = profile_layer_times([result.original, result.model], profiler, rounds=rounds)
    return layer_rows(result.before, result.after, before, after, touched_nodes(result))
