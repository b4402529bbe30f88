"""The order a pass's candidates are judged in: the pass's own, or -- for lossy passes -- screened.

Lossy rewrites spend one shared error budget, so their order decides how far a search gets. *Screening*
applies the mildest variant of each family (one conv in one mode, say) alone and measures its error
quickly on the validation feeds (:meth:`~rewriter.validation.judge.Judge.error`: outputs -- logits where
a Softmax ends the model -- relative to how much they vary); the family's other variants are predicted by
scaling that measurement with the pass's own estimates. Candidates are then judged by MACs saved per
predicted squared error, so cheap savings come first and the budget is not spent early on aggressive
rewrites of sensitive layers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from rewriter.contract import Candidate, Pass
from rewriter.decision import Screening
from rewriter.model import Model
from rewriter.trial import apply_candidate
from rewriter.validation.judge import Judge

log = logging.getLogger(__name__)


#: Share of ``optimize``'s time budget that screening may use; families left unscreened are tried after the
#: screened ones, in the pass's own order.
SCREEN_SHARE = 0.5
#: Screening re-orders the families still to measure after every this many measurements.
RESCREEN_EVERY = 6
#: Predicted errors below this count as this much when ordering by MACs saved per squared error (a
#: rewrite measured as nearly free is not infinitely better than one measured as cheap).
ERROR_FLOOR = 1e-3
#: ... and so do those below this quantile of the errors the screening measured: below it measurements are
#: mostly noise, and between rewrites that are nearly free the larger saving should come first (on
#: open-nsfw's measured candidates this ordering reaches 1-2% more MACs saved within the same budget).
FLOOR_QUANTILE = 0.1


def rank(candidates: list[Candidate], screened: Mapping[str, Screening] | None = None) -> list[Candidate]:
    """Trial order: the pass's priority when it gives one, else estimated MACs saved; ties by node names.

    Variants of one rewrite (a ``family``) are tried together, at the position of the family's best
    priority, the most aggressive first: the first one within budget is the one kept. Screened candidates
    (``screened``: by candidate key) come first, each on its own, by MACs saved per predicted squared
    error (errors floored at ``FLOOR_QUANTILE`` of those measured); those not screened follow in the
    order above.
    """
    screened = screened or {}
    measured = sorted({s.measured for s in screened.values()})
    floor = max(ERROR_FLOOR, measured[int(FLOOR_QUANTILE * (len(measured) - 1))] if measured else 0.0)
    first = sorted((c for c in candidates if c.key in screened),
                   key=lambda c: (-c.cost.macs_saved / max(screened[c.key].predicted, floor) ** 2, c.nodes, -c.level))
    rest = [c for c in candidates if c.key not in screened]
    return first + rank_unscreened(rest)


def rank_unscreened(candidates: list[Candidate]) -> list[Candidate]:
    def score(c: Candidate) -> float:
        return c.priority if c.priority is not None else float(c.cost.macs_saved)

    best: dict[str, float] = {}
    for c in candidates:
        if c.family is not None:
            best[c.family] = max(best.get(c.family, float("-inf")), score(c))

    def key(c: Candidate) -> tuple:
        if c.family is None:
            return (-score(c), "", 0.0, c.nodes)
        return (-best[c.family], c.family, -c.level, c.nodes)

    return sorted(candidates, key=key)


def screen_candidates(
    p: Pass,
    model: Model,
    todo: list[Candidate],
    judge: Judge,
    families: dict[str, tuple[float, Candidate] | None],
    stop_at: float | None,
) -> dict[str, Screening]:
    """Measure the mildest variant of every family in ``todo`` not measured yet (alone, on ``model``; until
    ``stop_at``) into ``families``, and predict every screened family's candidates from it: the measured
    error times the candidate's own estimate over the measured variant's (the measurement itself where the
    pass gives no estimate).

    Families are measured in order of promise: at first the pass's own, then -- as measurements come in --
    by MACs saved per squared estimated error with each ``kind`` of estimate rescaled by what was measured
    for its kind so far (estimates of different kinds, e.g. modes of a factorization, are seldom on one
    scale). What a time limit leaves unmeasured is then what looks least promising.
    """
    variants: dict[str, list[Candidate]] = {}
    mildest: dict[str, Candidate] = {}
    for c in todo:
        if c.family is None or c.family in families:
            continue
        variants.setdefault(c.family, []).append(c)
        if c.family not in mildest or c.level < mildest[c.family].level:
            mildest[c.family] = c
    queue = rank_unscreened(list(mildest.values()))
    if queue:
        try:
            p.prefetch(model, queue)
        except Exception as exc:  # a faulty pass must never end the run
            log.warning("%s.prefetch raised: %s", p.name, exc)
    ratios: dict[str, list[float]] = {}
    measured_count = 0
    while queue:
        if stop_at is not None and time.perf_counter() > stop_at:
            break
        rep = queue.pop(0)
        try:
            error = judge.error(apply_candidate(p, model, rep))
            families[rep.family] = (error, rep)  # type: ignore[index]
            if rep.error:
                ratios.setdefault(rep.kind, []).append(error / rep.error)
        except Exception as exc:  # judged (and recorded) like any other when its turn comes
            log.info("%s: screening %s failed: %s", p.name, rep.description, exc)
            families[rep.family] = None  # type: ignore[index]
        measured_count += 1
        if ratios and measured_count % RESCREEN_EVERY == 0:
            queue = by_calibrated_estimate(queue, variants, ratios)
    out: dict[str, Screening] = {}
    for c in todo:
        entry = families.get(c.family) if c.family is not None else None
        if entry is None:
            continue
        measured, rep = entry
        scale = c.error / rep.error if c.error is not None and rep.error else 1.0
        out[c.key] = Screening(measured, measured * scale, rep.description)
    return out


def by_calibrated_estimate(queue: list[Candidate], variants: Mapping[str, list[Candidate]], ratios: Mapping[str, list[float]]) -> list[Candidate]:
    """``queue`` (families' mildest variants) reordered by the best MACs saved per squared estimated error of
    each family's variants, every estimate times the median measured/estimated ratio of its kind (of all
    kinds, for a kind not measured yet)."""
    everything = sorted(r for rs in ratios.values() for r in rs)
    overall = everything[len(everything) // 2]
    factor = {kind: sorted(rs)[len(rs) // 2] for kind, rs in ratios.items()}

    def promise(rep: Candidate) -> float:
        best = 0.0
        for v in variants.get(rep.family or "", [rep]):
            if v.error is None:
                continue
            predicted = max(v.error * factor.get(v.kind, overall), ERROR_FLOOR)
            best = max(best, v.cost.macs_saved / predicted ** 2)
        return best

    return sorted(queue, key=lambda c: (-promise(c), c.nodes))
