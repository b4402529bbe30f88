"""Screening and ranking: the order a lossy pass's candidates are judged in."""

from __future__ import annotations

import pytest

from rewriter.contract import Candidate, Cost
from rewriter.model import Model
from rewriter.validation.judge import ValidationConfig
from tests.helpers import parse
from tests.search_fixtures import CHAIN3, Perturb


def test_screening_predicts_a_familys_variants_from_its_mildest() -> None:
    from rewriter.screening import screen_candidates as _screen
    from rewriter.validation.judge import Judge

    model = Model.from_source(parse(CHAIN3))
    judge = Judge(model, None, ValidationConfig(latency=False))
    todo = [c for c in Perturb().find(model) if isinstance(c, Candidate)]
    families: dict = {}
    predicted = _screen(Perturb(), model, todo, judge, families, None)
    assert set(families) == {"A", "B", "C"} and len(predicted) == 6
    for c in todo:
        measured, rep = families[c.family]
        assert rep.level == 1 and predicted[c.key].measured == measured
        assert predicted[c.key].predicted == pytest.approx(measured * c.level)  # estimate 2 vs 1: twice the error
    # Already screened families are not measured again; a time limit in the past measures nothing new.
    assert _screen(Perturb(), model, todo, judge, families, 0.0) == predicted


def test_rank_floors_tiny_predicted_errors_at_a_low_quantile_of_the_measured_ones() -> None:
    from rewriter.screening import Screening, rank as _rank

    def cand(name: str, saved: int) -> Candidate:
        return Candidate("p", (name,), name, Cost(1000, 1000 - saved, 0, 0), family=name)

    others = [cand(f"o{i}", 1) for i in range(20)]
    tiny, big = cand("tiny", 100), cand("big", 300)
    screened = {c.key: Screening(0.02 + 0.01 * i, 0.02 + 0.01 * i, c.description) for i, c in enumerate(others)}
    screened[tiny.key] = Screening(1e-4, 1e-4, "tiny")  # measured as (nearly) free: below the floor (0.03)
    screened[big.key] = Screening(0.02, 0.02, "big")
    order = [c.description for c in _rank(others + [tiny, big], screened)]
    assert order[:2] == ["big", "tiny"]  # 300 saved at the floor's error beats 100 saved "for free"
    unscreened = cand("unscreened", 999)
    assert _rank([unscreened, tiny], screened)[-1] is unscreened  # screened candidates come first


def test_screening_queue_rescales_each_kind_of_estimate_by_what_it_measured() -> None:
    from rewriter.screening import by_calibrated_estimate as _by_calibrated_estimate

    def cand(name: str, kind: str, error: float) -> Candidate:
        return Candidate("p", (name,), name, Cost(1000, 900, 0, 0), family=name, error=error, kind=kind)

    optimistic = [cand(f"a{i}", "a", 0.01) for i in range(3)]  # estimated 0.01, measured ~0.1
    honest = [cand(f"b{i}", "b", 0.03) for i in range(3)]  # estimated 0.03, measured ~0.03
    queue = optimistic + honest
    variants = {c.family: [c] for c in queue}
    assert [c.kind for c in _by_calibrated_estimate(queue, variants, {"a": [10.0], "b": [1.0]})] == ["b"] * 3 + ["a"] * 3
    # A kind not measured yet is scaled by the median of all measurements.
    assert [c.kind for c in _by_calibrated_estimate(queue, variants, {"b": [1.0, 5.0, 6.0]})][:3] == ["a"] * 3
