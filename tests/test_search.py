"""The search: rounds, screening order, the speedup target, whole-model checks, exact rounds proven together."""

from __future__ import annotations

import numpy as np
import pytest

from passes.fold_batchnorm import FoldBatchNorm
from rewriter.contract import Candidate
from rewriter.deadline import Deadline
from rewriter.model import Model
from rewriter.outcome import Outcome
from rewriter.pipeline import optimize
from rewriter.validation.judge import ValidationConfig
from tests.helpers import assert_same_outputs, ops, parse
from tests.search_fixtures import CHAIN3, THREE_BN, ClockedJudge, CorruptingFold, Perturb, count_numerics


def test_lossy_candidates_are_screened_and_tried_by_measured_error() -> None:
    from rewriter.validation.numerics import Budget

    loose = ValidationConfig(budget=Budget.parse("cosine>=0.5"), latency=False)
    model = parse(CHAIN3)
    screened = optimize(model, [Perturb()], config=loose)
    order = [d.candidate.description for d in screened.decisions]
    assert order == ["perturb C x1", "perturb B x1", "perturb A x1"]  # mildest variant of the least harmful conv first
    for d in screened.decisions:
        assert d.kept and d.screening is not None and d.screening.screened == d.candidate.description
        assert d.screening.predicted == d.screening.measured > 0
    errors = {d.candidate.description: d.screening.measured for d in screened.decisions}  # type: ignore[union-attr]
    assert errors["perturb C x1"] < errors["perturb B x1"] < errors["perturb A x1"]
    # Without screening: the pass's own order, each family's most aggressive variant first.
    plain = optimize(model, [Perturb()], config=loose, screen=False)
    assert [d.candidate.description for d in plain.decisions] == ["perturb A x2", "perturb B x2", "perturb C x2"]
    assert all(d.screening is None for d in plain.decisions)


def test_an_open_whole_model_call_is_settled_with_more_pooled_pairs() -> None:
    from types import SimpleNamespace

    from rewriter.rounds import CONFIRMATIONS, settled as _settled
    from rewriter.validation.latency import LatencyComparison
    from rewriter.validation.stats import bootstrap_speedup

    rng = np.random.default_rng(0)

    def comparison(noise: float) -> LatencyComparison:  # the candidate 10% faster, under timer noise
        a = tuple(float(v) for v in 1.0 * np.exp(noise * rng.standard_normal(12)))
        b = tuple(float(v) for v in 0.9 * np.exp(noise * rng.standard_normal(12)))
        return LatencyComparison(float(np.median(a)), float(np.median(b)), bootstrap_speedup(a, b), 1, (a, b))

    queue = [comparison(0.4)] + [comparison(0.02) for _ in range(CONFIRMATIONS)]
    while not (queue[0].ci.speedup > 1.0 and queue[0].ci.low <= 1.0):  # an open call: faster, not shown
        queue[0] = comparison(0.4)
    calls = []
    judge = SimpleNamespace(config=ValidationConfig(), deadline=Deadline(), model_latency=lambda base, cand, profile=None: calls.append(1) or queue[len(calls) - 1])
    model = Model.from_source(parse(CHAIN3))
    settled = _settled(judge, model, model, 1.0, exact=False)  # type: ignore[arg-type]
    assert len(calls) >= 2 and settled.ci.pairs == 12 * len(calls) and settled.ci.faster(1.0)
    # A clear first measurement is taken as it is.
    calls.clear()
    queue[0] = comparison(0.02)
    assert _settled(judge, model, model, 1.0, exact=False).ci.pairs == 12 and len(calls) == 1  # type: ignore[arg-type]
    # With the whole time budget spent, an open call is not confirmed further.
    calls.clear()
    queue[:] = [comparison(0.4)] + [comparison(0.02) for _ in range(CONFIRMATIONS)]
    while not (queue[0].ci.speedup > 1.0 and queue[0].ci.low <= 1.0):
        queue[0] = comparison(0.4)
    judge.deadline = Deadline(0.0, start=0.0)
    assert _settled(judge, model, model, 1.0, exact=False).ci.pairs == 12 and len(calls) == 1  # type: ignore[arg-type]


@pytest.mark.parametrize("target, kept, reached, model_timings", [
    (1.2, 2, True, 2),  # measured after the 1st kept (1.11x) and when 1.25x is predicted (2nd): reached
    (2.0, 3, False, 2),  # after the 1st, then only at the pass's end (1.43x predicted never reaches 2x)
])
def test_target_speedup_stops_the_lossy_search_once_measured(target: float, kept: int, reached: bool, model_timings: int) -> None:
    from rewriter.gate import gate_failures
    from rewriter.report import build_report
    from rewriter.validation.numerics import Budget

    config = ValidationConfig(budget=Budget.parse("cosine>=0.5"))
    model = Model.from_source(parse(CHAIN3))
    judge = ClockedJudge.make(model, config)
    result = optimize(model, [Perturb()], config=config, judge=judge, target_speedup=target)
    assert len(result.kept) == kept and result.target_reached is reached
    assert type(judge).calls == model_timings  # the pass's closing check and the final one reuse the last
    assert result.final_latency is not None and result.final_latency.ci.speedup == pytest.approx(10 / (10 - kept))
    untried = [d for d in result.decisions if d.outcome is Outcome.NOT_TRIED_TARGET]
    assert untried == result.not_tried and all(d.reason.startswith("not tried: target speedup") for d in untried)
    assert {d.candidate.family for d in untried} == ({"A"} if reached else set())  # C and B kept, A's variants left
    report = build_report(result, input_path=None, input_sha256=None, output_path=None, output_sha256=None, provider="cpu", threads=1)
    assert report["target_speedup"] == {"speedup": target, "reached": reached}
    gate = gate_failures(result, config, require_speedup=True)
    assert gate == ([] if reached else [f"target speedup {target:g}x not shown: {result.final_latency.ci} (the 95% CI must lie at or above it)"])


def test_target_speedup_reached_skips_later_lossy_passes_and_needs_latency() -> None:
    from rewriter.validation.numerics import Budget

    config = ValidationConfig(budget=Budget.parse("cosine>=0.5"))
    model = Model.from_source(parse(CHAIN3))
    result = optimize(model, [Perturb(), Perturb()], config=config, judge=ClockedJudge.make(model, config), target_speedup=1.05)
    assert len(result.kept) == 1 and result.target_reached
    assert [s.reason for s in result.passes[1].skips] == ["not run: target speedup 1.05x already reached"]
    with pytest.raises(ValueError, match="above 1"):
        optimize(model, [Perturb()], config=config, target_speedup=1.0)
    with pytest.raises(ValueError, match="latency"):
        optimize(model, [Perturb()], config=ValidationConfig(latency=False), target_speedup=1.5)



def test_an_exact_round_is_proven_with_one_numerics_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_numerics(monkeypatch)
    model = parse(THREE_BN, seed=1)  # seed 0 draws a graph where one exact fold alone rounds just past allclose
    result = optimize(model, ["fold_batchnorm"], config=ValidationConfig(latency=False))
    assert len(result.kept) == 3 and ops(result.model).get("BatchNormalization", 0) == 0
    assert all(d.reason == "numerics proven with its round (latency not measured)" for d in result.decisions)
    assert all(s.allclose_ratio <= 1.0 for d in result.decisions for s in d.verdict.numerics.values())  # type: ignore[union-attr]
    assert len(calls) == 2  # the round's proof and the closing end-to-end numerics
    assert_same_outputs(model, result.model)


def test_a_round_that_fails_together_is_proven_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_numerics(monkeypatch)
    model = parse(THREE_BN, seed=1)  # seed 0 draws a graph where one exact fold alone rounds just past allclose
    result = optimize(model, [CorruptingFold()], config=ValidationConfig(latency=False))
    verdicts = {d.candidate.nodes: (d.kept, d.reason) for d in result.decisions}
    assert len(result.decisions) == 3 and len(result.kept) == 2
    (bad,) = [d for d in result.decisions if not d.kept]
    assert "Conv_3" in bad.candidate.nodes and bad.outcome is Outcome.NUMERICS and bad.reason.startswith("numerics:")
    assert all(reason == "numerics within budget (latency not measured)" for kept, reason in verdicts.values() if kept)
    assert len(calls) == 1 + 3 + 1  # the failed round, each alone, the closing numerics
    assert_same_outputs(model, result.model)  # the two good folds are exact


def test_round_proof_covers_the_candidates_it_applied_and_only_exact_rounds() -> None:
    from rewriter.rounds import prove_round as _prove_round
    from rewriter.validation.judge import Judge

    model = Model.from_source(parse(THREE_BN, seed=1))
    judge = Judge(model, None, ValidationConfig(latency=False))
    todo = [c for c in FoldBatchNorm().find(model) if isinstance(c, Candidate)]
    proof = _prove_round(FoldBatchNorm(), model, todo, judge)
    assert proof is not None and proof.order == tuple(c.key for c in todo)
    assert all(s.allclose_ratio <= 1.0 for s in proof.numerics.values())
    a, b, c = proof.order
    assert proof.covers([], a) and proof.covers([a], b) and proof.covers([a, b], c)
    assert not proof.covers([], b) and not proof.covers([b], c) and not proof.covers([a, b, c], "more")  # the path left the proof
    assert _prove_round(FoldBatchNorm(), model, todo[:1], judge) is None  # nothing to share
    again = _prove_round(FoldBatchNorm(), model, todo + todo, judge)  # consumed ones are skipped, not applied twice
    assert again is not None and again.order == proof.order
    assert _prove_round(Perturb(), model, todo, judge) is None  # lossy passes are judged one by one
    assert _prove_round(CorruptingFold(), model, todo, judge) is None  # fails together
    assert _prove_round(FoldBatchNorm(), model, todo, judge, deadline=Deadline(0.0)) is None  # no time left: each alone
    assert _prove_round(FoldBatchNorm(), model, todo, judge, deadline=Deadline(600.0)) is not None
