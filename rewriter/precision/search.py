"""Guarded int8 search: as many nodes in int8 as the numerics budget allows, proven on validation feeds and
confirmed on held-out feeds the search never saw.

The rule, with ``check(model, split)`` the budget's failures on a split (empty: it holds):

1. **Full int8.** Every node onnxruntime's QDQ quantizer quantizes (a *unit*) is int8. If the budget holds on
   validation, go to 4.
2. **Rank.** With a ``spend`` function (the budget's worst term as a fraction used), units are ranked by
   :mod:`~rewriter.precision.leave_one_out` on validation: by default the budget each unit spends alone in
   int8 (every other unit float), per MAC it runs; or (``direction="out"``) what putting its float closure
   back wins from full int8, per MAC left float. Without ``spend`` (and, in the proxy's order, for units that
   ranking did not try), by :func:`~rewriter.precision.sensitivity.sensitivities` (the noise each adds,
   measured once on the full-int8 model), most sensitive first. Keeping the top ``k`` in float means the
   exclusion set ``E_k``: those ``k`` units and the units producing their activation inputs, since
   onnxruntime quantizes a tensor when its producer *or* a consumer is quantized -- keeping a node float alone
   leaves its input quantized (see :func:`exclusion`).
3. **Bisect on k** (validation): the smallest ``k`` whose ``E_k`` holds, by galloping ``k = 1, 2, 4, ...`` to
   the first that holds, then bisection between it and the last that failed: ``<= 2 ceil(log2 n) + 1``
   trials for ``n`` units, fewer when few units need float (``O(log k)``). ``k = n`` (nothing int8) is the
   last resort; when even it fails, the float model is returned (the budget cannot hold).
   **3b. Refine** (``refine``, on by default): the ranking is a proxy, so ``E_k`` may hold units the budget
   does not need. They are put back in int8 least sensitive first, as many as validation allows (the largest
   ``j`` by galloping and bisection: ``O(log |E_k|)`` more trials).
4. **Held-out confirmation.** The chosen model is checked on the test split. When it fails, the unrefined
   ``E_k`` is tried there (when the refinement changed it); when that fails too, ``k`` grows the
   same way (galloping from ``k + 1``, then bisection), a ``k`` counting only when *both* splits hold: the
   test split decides how many more nodes stay float, never which (the ranking is fixed by the calibration
   feeds). No margin beyond that: the result holds on both splits as measured.
5. **Islands** (only with an ``island_pays`` hook, e.g. a latency judge): each connected group of int8 units
   (connected through tensors, directly or through the Relu/Clip nodes the quantizer fused away) is offered
   to the hook with the model as it is and the model with that island in float; an island that does not pay
   goes to float. The final model is checked on both splits again; if it fails, every rollback is undone.

Every trial (exclusion set, split, failures, purpose) is logged in the result; every unit gets a decision with
its precision and why.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from rewriter.precision.int8 import Int8Options, Prepared, Quantizer, prepare, quantized_nodes
from rewriter.precision.leave_one_out import LeaveOneOut, LeaveOneOutOptions, Spend, rank, unit_costs
from rewriter.precision.sensitivity import sensitivities

if TYPE_CHECKING:
    from rewriter.validation.judge import TaskMetric
    from rewriter.validation.numerics import Budget

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
#: ``check(model, split)``: the budget's failures on ``split`` (``"validation"`` or ``"test"``); empty when it holds.
Check = Callable[[onnx.ModelProto, str], Sequence[str]]
#: ``pays(island, with_island_int8, with_island_float)``: whether the island is worth keeping in int8.
IslandPays = Callable[[frozenset[str], onnx.ModelProto, onnx.ModelProto], bool]


class Precision(str, Enum):
    INT8 = "int8"
    FLOAT = "float"


@dataclass(frozen=True)
class NodeDecision:
    """One unit's final precision and why; ``rank``: 1 for the most sensitive."""

    node: str
    op_type: str
    precision: Precision
    reason: str
    sensitivity: float | None = None
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        s = self.sensitivity
        return {"node": self.node, "op_type": self.op_type, "precision": self.precision.value, "reason": self.reason,
                "sensitivity": None if s is None or not math.isfinite(s) else s, "rank": self.rank}


@dataclass(frozen=True)
class Trial:
    """One quantize + check: the units kept in float, the split, what failed and why it was tried."""

    purpose: str
    split: str
    excluded: tuple[str, ...]
    failures: tuple[str, ...]
    #: The budget's worst term as a fraction used, for a ranking trial (which records no failures).
    spend: float | None = None

    @property
    def holds(self) -> bool:
        return not self.failures if self.spend is None else self.spend <= 1.0

    def to_dict(self) -> dict[str, Any]:
        out = {"purpose": self.purpose, "split": self.split, "excluded": list(self.excluded), "holds": self.holds,
               "failures": list(self.failures)}
        if self.spend is not None:
            out["spend"] = self.spend if math.isfinite(self.spend) else None
        return out


@dataclass
class Int8Result:
    """The searched model and how it was found. ``status``: ``int8`` (every unit int8), ``mixed``, ``float``
    (no unit int8 holds the budget) or ``broken`` (even the float model fails the budget on a split)."""

    model: onnx.ModelProto
    status: str
    normalizations: tuple[str, ...]
    nodes: list[NodeDecision]
    trials: list[Trial]
    seconds: float
    #: How many quantize_static calls the search made (trials share them across splits).
    quantizations: int = 0
    rolled_back_islands: list[tuple[str, ...]] = field(default_factory=list)
    #: How the units were ranked (the leave-one-out ranking's record; empty: the proxy, or no ranking needed).
    ranking: dict[str, Any] = field(default_factory=dict)
    #: The nodes of the prepared model kept float in ``model`` (what a plan replays: :func:`~rewriter.precision.int8.replay`).
    excluded: tuple[str, ...] = ()

    @property
    def counts(self) -> dict[str, int]:
        return {p.value: sum(d.precision is p for d in self.nodes) for p in Precision}

    @property
    def float_nodes(self) -> list[str]:
        return [d.node for d in self.nodes if d.precision is Precision.FLOAT]

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "normalizations": list(self.normalizations), "counts": self.counts,
                "trials": len(self.trials), "quantizations": self.quantizations, "seconds": round(self.seconds, 3),
                "nodes": [d.to_dict() for d in self.nodes], "trial_log": [t.to_dict() for t in self.trials],
                "rolled_back_islands": [list(i) for i in self.rolled_back_islands], "ranking": self.ranking}


def smallest_holding(holds: Callable[[int], bool], start: int, n: int) -> int | None:
    """The smallest ``k`` in ``(start, n]`` found by galloping then bisection, ``holds(start)`` known false;
    ``None`` when ``holds(n)`` is false too. ``holds`` is assumed monotone (not checked)."""
    lo, step, hi = start, 1, None
    while hi is None:
        k = min(start + step, n)
        if holds(k):
            hi = k
        elif k >= n:
            return None
        else:
            lo, step = k, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _activation_producers(model: onnx.ModelProto, units: set[str]) -> dict[str, list[str]]:
    """Per unit, the units producing its activation inputs, through nodes outside ``model``'s units that the
    quantizer drops (Relu/Clip): ``model`` is the prepared float model."""
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name for t in model.graph.initializer}
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.name not in units:
            continue
        found: list[str] = []
        for x in node.input:
            p = producer.get(x) if x not in weights else None
            while p is not None and p.name not in units and p.op_type in ("Relu", "Clip") and p.input:
                p = producer.get(p.input[0])
            if p is not None and p.name in units and p.name not in found:
                found.append(p.name)
        out[node.name] = found
    return out


def exclusion(ranked: Sequence[str], k: int, producers: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """``E_k``: the top ``k`` units of ``ranked`` and the units producing their activation inputs, sorted."""
    chosen = set(ranked[:k])
    for unit in ranked[:k]:
        chosen.update(producers.get(unit, ()))
    return tuple(sorted(chosen))


class _Trials:
    """Quantize + check with memos (one quantization per exclusion set, one check per set and split)."""

    def __init__(self, quantizer: Quantizer, check: Check, spend: Spend | None = None) -> None:
        self.quantizer, self.check, self.spend_fn = quantizer, check, spend
        self.models: dict[tuple[str, ...], onnx.ModelProto] = {}
        self.log: list[Trial] = []
        self._seen: dict[tuple[tuple[str, ...], str], Trial] = {}

    def model(self, excluded: tuple[str, ...]) -> onnx.ModelProto:
        if excluded not in self.models:
            self.models[excluded] = self.quantizer.quantize(excluded)
        return self.models[excluded]

    def holds(self, excluded: tuple[str, ...], split: str, purpose: str) -> bool:
        key = (excluded, split)
        if key not in self._seen:
            trial = Trial(purpose, split, excluded, tuple(self.check(self.model(excluded), split)))
            self._seen[key] = trial
            self.log.append(trial)
            log.info("int8 trial (%s, %s, %d float): %s", purpose, split, len(excluded),
                     "holds" if trial.holds else "; ".join(trial.failures))
        return self._seen[key].holds

    def spend(self, excluded: tuple[str, ...], purpose: str) -> float:
        """The validation spend of the model with ``excluded`` float (a ranking trial, logged)."""
        assert self.spend_fn is not None
        value = float(self.spend_fn(self.model(excluded), "validation"))
        self.log.append(Trial(purpose, "validation", excluded, (), value))
        return value


@dataclass(frozen=True)
class SearchOptions:
    """``sensitivity_feeds``: how many calibration feeds the sensitivity ranking runs on; ``refine``: step 3b."""

    int8: Int8Options = field(default_factory=Int8Options)
    sensitivity_feeds: int = 4
    #: Step 3b: put the least sensitive units of the float set back in int8 while validation holds.
    refine: bool = True
    #: Bounds of the leave-one-out ranking (used when the search has a ``spend`` function).
    leave_one_out: LeaveOneOutOptions = field(default_factory=LeaveOneOutOptions)


class _Ranking:
    """The units ranked (leave-one-out with ``trials.spend_fn``, else the proxy), computed on first use (full
    int8 may hold without it)."""

    def __init__(self, prepared: Prepared, full: onnx.ModelProto, units: Sequence[str], feeds: Sequence[Feed],
                 trials: _Trials | None = None, options: LeaveOneOutOptions | None = None) -> None:
        self.prepared, self.full, self.units, self.feeds = prepared, full, list(units), feeds
        self.producers = _activation_producers(prepared.model, set(units))
        self.trials, self.options = trials, options
        self.loo: LeaveOneOut | None = None
        self._scores: dict[str, float] | None = None
        self._ranked: list[str] = []

    @property
    def scores(self) -> dict[str, float]:
        if self._scores is None:
            proxy = sensitivities(self.prepared.model, self.full, self.units, self.feeds)
            order = {u: i for i, u in enumerate(self.units)}
            self._ranked = sorted(self.units, key=lambda u: (-proxy[u], order[u]))
            self._scores = proxy
            log.info("int8 sensitivity ranking: %s", ", ".join(f"{u}={proxy[u]:.3g}" for u in self._ranked[:10]))
            if self.trials is not None and self.trials.spend_fn is not None:
                self._leave_one_out()
        return self._scores

    def _leave_one_out(self) -> None:
        trials = self.trials
        assert trials is not None
        shapes = {k: tuple(v.shape) for k, v in self.feeds[0].items()} if self.feeds else {}
        self.loo = rank(self.units, self._ranked, lambda u: exclusion([u], 1, self.producers),
                        lambda e: trials.spend(e, f"ranking: {len(e)} float" if e else "ranking: full int8"),
                        unit_costs(self.prepared.model, shapes), self.options)
        self._ranked = list(self.loo.ranked)
        self._scores = {u: self.loo.scores.get(u, 0.0) for u in self.units}

    @property
    def ranked(self) -> list[str]:
        _ = self.scores
        return self._ranked

    def excluded(self, k: int) -> tuple[str, ...]:
        return () if k == 0 else exclusion(self.ranked, k, self.producers)


@dataclass(frozen=True)
class _Found:
    """What steps 1-4 found: ``k`` on validation and after the held-out split (``None``: even ``k = n`` fails),
    the units kept float and those of ``E_k`` the refinement put back in int8."""

    k_val: int | None
    k_test: int | None
    excluded: tuple[str, ...] = ()
    returned: frozenset[str] = frozenset()


def _refine(trials: _Trials, ranking: _Ranking, k: int) -> tuple[tuple[str, ...], frozenset[str]]:
    """Step 3b: ``E_k`` with its ``j`` least sensitive units put back in int8, ``j`` the largest for which
    validation still holds (galloping then bisection on ``j``; ``j = 0`` holds)."""
    full = ranking.excluded(k)
    position = {u: i for i, u in enumerate(ranking.ranked)}
    order = sorted(full, key=lambda u: -position[u])

    def without(j: int) -> tuple[str, ...]:
        return tuple(sorted(set(full) - set(order[:j])))

    first_fail = smallest_holding(lambda j: not trials.holds(without(j), "validation", f"refine: {j} of E_{k} back to int8"),
                                  0, len(order))
    j = len(order) if first_fail is None else first_fail - 1
    return without(j), frozenset(order[:j])


def _bisect(trials: _Trials, ranking: _Ranking, has_test: bool, refine: bool) -> _Found:
    """Steps 1-4 of the module docstring."""
    n = len(ranking.units)
    k_val: int | None = 0
    if not trials.holds((), "validation", "full int8"):
        k_val = smallest_holding(lambda k: trials.holds(ranking.excluded(k), "validation", f"k={k} on validation"), 0, n)
    if k_val is None:
        return _Found(None, None)
    excluded, returned = _refine(trials, ranking, k_val) if k_val and refine else (ranking.excluded(k_val), frozenset())
    if not has_test or trials.holds(excluded, "test", f"k={k_val} held-out confirmation"):
        return _Found(k_val, k_val, excluded, returned)
    if returned and trials.holds(ranking.excluded(k_val), "test", f"k={k_val} without the refinement, held-out"):
        return _Found(k_val, k_val, ranking.excluded(k_val))
    if k_val >= n:
        return _Found(k_val, None)

    def both(k: int) -> bool:
        e = ranking.excluded(k)
        return trials.holds(e, "validation", f"k={k} after held-out failure") and trials.holds(e, "test", f"k={k} held-out")

    k_test = smallest_holding(both, k_val, n)
    return _Found(k_val, k_test, () if k_test is None else ranking.excluded(k_test))


def islands(model: onnx.ModelProto, int8_units: Sequence[str]) -> list[frozenset[str]]:
    """Connected groups of ``int8_units`` in ``model`` (the prepared float model): joined through a tensor,
    directly or through Relu/Clip nodes that are not units; in graph order of their first node."""
    units = set(int8_units)
    parent = {u: u for u in units}

    def root(u: str) -> str:
        while parent[u] != u:
            u = parent[u]
        return u

    for unit, producers in _activation_producers(model, units).items():
        for p in producers:
            parent[root(unit)] = root(p)
    groups: dict[str, set[str]] = {}
    for node in model.graph.node:
        if node.name in units:
            groups.setdefault(root(node.name), set()).add(node.name)
    return [frozenset(g) for g in groups.values()]


def _rollback(trials: _Trials, prepared: Prepared, excluded: tuple[str, ...], units: Sequence[str], pays: IslandPays,
              has_test: bool) -> tuple[tuple[str, ...], list[frozenset[str]]]:
    """Step 5: islands that do not pay go to float; all undone if the result then fails a split."""
    current, rolled = excluded, []
    for island in islands(prepared.model, [u for u in units if u not in set(excluded)]):
        without = tuple(sorted(set(current) | island))
        if not pays(island, trials.model(current), trials.model(without)):
            log.info("int8 island of %d node(s) does not pay: kept float (%s)", len(island), ", ".join(sorted(island)))
            current = without
            rolled.append(island)
    if rolled:
        ok = trials.holds(current, "validation", "after island rollback")
        ok = ok and (not has_test or trials.holds(current, "test", "after island rollback"))
        if not ok:
            log.warning("the model with %d island(s) rolled back fails the budget; keeping them int8", len(rolled))
            return excluded, []
    return current, rolled


def _decisions(prepared: Prepared, ranking: _Ranking, ks: tuple[int, int], rolled: Sequence[frozenset[str]],
               excluded: Sequence[str], returned: frozenset[str]) -> list[NodeDecision]:
    """Each unit's precision and why (see the module docstring), in graph order."""
    k_val, k_test = ks
    ops = {n.name: n.op_type for n in prepared.model.graph.node}
    scores = ranking.scores if k_test else {}  # full int8 held: no ranking was needed, none is computed
    ranked = ranking.ranked if k_test else []
    rank = {u: i + 1 for i, u in enumerate(ranked)}
    n, out_set = len(ranking.units), set(excluded)
    top_val, top_test = set(ranked[:k_val]), set(ranked[:k_test])
    island_of = {u: isl for isl in rolled for u in isl}
    decisions = []
    for unit in ranking.units:
        if unit in returned and unit not in out_set:
            why = (f"int8: in the float set of the top {k_val}, put back in int8 by the refinement "
                   "(the budget holds on validation without it in float)")
        elif unit not in out_set:
            why = "int8 (full int8 holds the budget)" if not k_test else "int8"
        elif unit in top_val:
            why = f"kept float: sensitivity rank {rank[unit]} of {n}, among the {k_val} most sensitive needed for the budget on validation"
        elif unit in top_test:
            why = (f"kept float: sensitivity rank {rank[unit]} of {n}; the held-out split failed with the top {k_val} "
                   f"in float and held with the top {k_test}")
        elif unit in island_of:
            why = f"kept float: its int8 island of {len(island_of[unit])} node(s) did not pay (island hook)"
        else:
            fed = sorted(u for u in top_test if unit in ranking.producers.get(u, ()))
            why = f"kept float: produces the input of {', '.join(fed)} (kept float), so that tensor stays float"
        decisions.append(NodeDecision(unit, ops.get(unit, "?"), Precision.FLOAT if unit in out_set else Precision.INT8,
                                      why, scores.get(unit), rank.get(unit)))
    return decisions


def search_int8(model: onnx.ModelProto, calibration: Sequence[Feed], check: Check, *, has_test: bool = True,
                options: SearchOptions | None = None, island_pays: IslandPays | None = None,
                spend: Spend | None = None) -> Int8Result:
    """The guarded int8 search of the module docstring. ``check`` judges a model on ``"validation"`` and, with
    ``has_test``, ``"test"`` against the original model; ``calibration`` feeds calibrate and rank; ``spend``
    (the budget's worst term as a fraction used) selects the leave-one-out ranking."""
    start = time.perf_counter()
    options = options or SearchOptions()
    prepared = prepare(model, options.int8)
    with Quantizer(prepared, calibration, options.int8) as quantizer:
        trials = _Trials(quantizer, check, spend)
        full = trials.model(())
        units = [u for u in quantized_nodes(full) if u in {n.name for n in prepared.model.graph.node}]
        ranking = _Ranking(prepared, full, units, list(calibration)[: max(1, options.sensitivity_feeds)], trials,
                           options.leave_one_out)
        found = _bisect(trials, ranking, has_test, options.refine)
        k_val, k_test = found.k_val, found.k_test
        if k_val is None or k_test is None:
            split = "validation" if k_val is None else "held-out test split"
            why = f"kept float: the budget fails on the {split} even with every node in float"
            ops = {n.name: n.op_type for n in prepared.model.graph.node}
            nodes = [NodeDecision(u, ops[u], Precision.FLOAT, why) for u in units]
            return Int8Result(model, "broken", prepared.normalizations, nodes, trials.log, time.perf_counter() - start,
                              quantizer.calls)
        excluded = found.excluded
        rolled: list[frozenset[str]] = []
        if island_pays is not None:
            excluded, rolled = _rollback(trials, prepared, excluded, units, island_pays, has_test)
        result_model = trials.model(excluded)
        nodes = _decisions(prepared, ranking, (k_val, k_test), rolled, excluded, found.returned)
        calls = quantizer.calls
    int8_count = sum(d.precision is Precision.INT8 for d in nodes)
    status = "int8" if int8_count == len(nodes) and nodes else ("float" if int8_count == 0 else "mixed")
    result = Int8Result(result_model, status, prepared.normalizations, nodes, trials.log, time.perf_counter() - start, calls,
                        [tuple(sorted(i)) for i in rolled], ranking.loo.to_dict() if ranking.loo else {}, tuple(sorted(excluded)))
    log.info("int8 search: %s, %d int8 / %d float, %d trials, %.1f s", status, int8_count, len(nodes) - int8_count,
             len(trials.log), result.seconds)
    return result


def guarded_int8(model: onnx.ModelProto, calibration: Sequence[Feed], validation: Sequence[Feed], test: Sequence[Feed],
                 budget: Budget, metric: TaskMetric | None = None, *, options: SearchOptions | None = None,
                 island_pays: IslandPays | None = None) -> Int8Result:
    """:func:`search_int8` judged by a :class:`~rewriter.precision.check.BudgetCheck` of ``budget`` (a
    :class:`~rewriter.validation.numerics.Budget`) and the optional task ``metric`` against ``model``."""
    from rewriter.precision.check import BudgetCheck

    check = BudgetCheck(model, {"validation": validation, "test": test}, budget, metric)
    return search_int8(model, calibration, check, has_test=check.has_test, options=options, island_pays=island_pays,
                       spend=check.spend)
