"""The guarded pipeline: good rewrites are kept, broken ones rolled back, errors never fatal."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from passes.fold_batchnorm import FoldBatchNorm
from passes.fuse_1x1_chain import Chain, Fuse1x1Chain
from rewriter.contract import Candidate, Cost, Pass, Skip
from rewriter.graph import NameFactory, constant, const_value
from rewriter.model import Model
from rewriter.pipeline import apply_pass, optimize
from rewriter.validation.judge import ValidationConfig
from rewriter.validation.latency import TimingOptions
from tests.helpers import assert_same_outputs, ops, parse

FAST = ValidationConfig(timing=TimingOptions(min_pairs=8, max_pairs=20, time_budget_s=0.5))


class CorruptingChain(Fuse1x1Chain):
    """Fuses correctly, then scales the fused weight by 1.1: a numerics bug the judge must catch."""

    name = "corrupting_chain"

    def rewrite(self, model: Model, match: Chain) -> None:
        super().rewrite(model, match)
        conv = model.graph.nodes[-1]  # replace_nodes appends the fused conv
        w = const_value(conv.inputs[1])
        conv.inputs[1] = constant(NameFactory(model.graph), "corrupt_W", (w * 1.1).astype(w.dtype))


class RaisingPass(Pass):
    name = "raising"
    summary = "always raises in apply"
    exact = True

    def find(self, model: Model):  # type: ignore[no-untyped-def]
        node = model.graph.nodes[0]
        yield Candidate(self.name, (node.name,), "boom", Cost(1, 0, 0, 0))
        yield Skip(self.name, (node.name,), "a reason")

    def apply(self, model: Model, candidate: Candidate) -> None:
        raise RuntimeError("deliberate failure")


def test_good_rewrite_is_kept_with_figures(sample_model: onnx.ModelProto) -> None:
    result = optimize(sample_model, ["fuse_1x1_chain"], config=FAST)
    assert len(result.kept) == 1
    d = result.kept[0]
    assert d.candidate.pass_name == "fuse_1x1_chain"
    assert d.verdict is not None and d.verdict.latency is not None
    assert d.verdict.latency_scope == "subgraph"
    assert all(s.allclose_ratio <= 1.0 for s in d.verdict.numerics.values())
    assert ops(result.model)["Conv"] == ops(sample_model)["Conv"] - 1
    assert result.after.total_macs < result.before.total_macs
    assert result.final_latency is not None
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(sample_model, result.model)


def test_broken_rewrite_is_rolled_back(sample_model: onnx.ModelProto) -> None:
    result = optimize(sample_model, [CorruptingChain()], config=FAST)
    assert result.decisions and not result.kept
    assert all("numerics" in d.reason for d in result.decisions)
    assert result.model.SerializeToString() == Model.from_source(sample_model).proto.SerializeToString()


def test_exception_in_pass_is_recorded_and_run_continues(sample_model: onnx.ModelProto) -> None:
    result = optimize(sample_model, [RaisingPass(), Fuse1x1Chain()], config=FAST)
    raised = [d for d in result.decisions if d.candidate.pass_name == "raising"]
    assert len(raised) == 1 and not raised[0].kept and "deliberate failure" in raised[0].reason
    assert any(d.kept and d.candidate.pass_name == "fuse_1x1_chain" for d in result.decisions)
    assert result.passes[0].skips == [Skip("raising", (sample_model.graph.node[0].name,), "a reason")]


def test_time_budget_stops_judging(sample_model: onnx.ModelProto) -> None:
    result = optimize(sample_model, ["fuse_1x1_chain"], config=FAST, time_budget_s=0.0)
    assert not result.kept
    assert all("time budget" in d.reason for d in result.decisions)


def test_numerics_only_mode_measures_no_latency(sample_model: onnx.ModelProto) -> None:
    result = optimize(sample_model, ["fuse_1x1_chain"], config=ValidationConfig(latency=False))
    assert len(result.kept) == 1
    assert result.kept[0].verdict.latency is None  # type: ignore[union-attr]
    assert result.final_latency is None


def test_input_model_is_not_modified(sample_model: onnx.ModelProto) -> None:
    before = sample_model.SerializeToString()
    optimize(sample_model, ["fuse_1x1_chain"], config=ValidationConfig(latency=False))
    assert sample_model.SerializeToString() == before


def test_optimize_is_idempotent_on_its_output(sample_model: onnx.ModelProto) -> None:
    first = optimize(sample_model, config=ValidationConfig(latency=False))
    second = optimize(first.model, config=ValidationConfig(latency=False))
    assert not second.kept
    assert second.model.SerializeToString() == first.model.SerializeToString()


def test_unknown_pass_is_a_usage_error(sample_model: onnx.ModelProto) -> None:
    from rewriter.errors import InputError

    with pytest.raises(InputError, match="unknown pass"):
        optimize(sample_model, ["no_such_pass"])


def test_apply_pass_is_unguarded_and_reports(sample_model: onnx.ModelProto) -> None:
    result = apply_pass(sample_model, "fuse_1x1_chain")
    assert result.modified and len(result.applied) == 1
    # The Inception/ResNet 1x1 convs are followed by ReLU: no other chain; the bottleneck expand is not a chain either.
    assert ops(result.model)["Conv"] == ops(sample_model)["Conv"] - 1
    x = np.random.default_rng(0).standard_normal((1, 3, 112, 112)).astype(np.float32)
    assert_same_outputs(sample_model, result.model, feeds=[{"input": x}])


# -- screening of lossy passes ----------------------------------------------------------------------------
CHAIN3 = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4, 6, 6] X) => (float[1, 3] P)
    <float[4, 4, 1, 1] WA, float[4, 4, 1, 1] WB, float[4, 4, 1, 1] WC, float[4, 3] WF> {
        A = Conv (X, WA)
        B = Conv (A, WB)
        C = Conv (B, WC)
        M = ReduceMean <axes = [2, 3], keepdims = 0> (C)
        L = MatMul (M, WF)
        P = Softmax <axis = 1> (L)
    }
"""


class Perturb(Pass):
    """A fake lossy pass: scales one conv's weight by ``1 + strength * size[conv]``. Its own priority says
    conv A is the best bet; the truth (the perturbation) makes A the worst and C the best."""

    name = "perturb"
    summary = "scale a conv's weights"
    exact = False
    size = {"A": 0.5, "B": 0.1, "C": 0.01}

    def find(self, model: Model):  # type: ignore[no-untyped-def]
        for node in model.graph.nodes:
            label = node.outputs[0].name
            if node.op != "Conv" or label not in self.size or "_p" in node.name:
                continue
            for strength in (1, 2):
                yield Candidate(self.name, (node.name,), f"perturb {label} x{strength}", Cost(100, 50, 1, 1), {"strength": strength},
                                priority={"A": 3.0, "B": 2.0, "C": 1.0}[label] * strength, family=label, level=strength, error=float(strength))

    def apply(self, model: Model, candidate: Candidate) -> None:
        node = model.node(candidate.nodes[0])
        assert node is not None
        w = const_value(node.inputs[1])
        factor = 1 + candidate.options["strength"] * self.size[node.outputs[0].name]
        node.inputs[1] = constant(NameFactory(model.graph), "p_W", (w * factor).astype(w.dtype))
        node.name = node.name + "_p"


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


def test_screening_predicts_a_familys_variants_from_its_mildest() -> None:
    from rewriter.search import screen_candidates as _screen
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
    from rewriter.search import Screening, rank as _rank

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
    from rewriter.search import by_calibrated_estimate as _by_calibrated_estimate

    def cand(name: str, kind: str, error: float) -> Candidate:
        return Candidate("p", (name,), name, Cost(1000, 900, 0, 0), family=name, error=error, kind=kind)

    optimistic = [cand(f"a{i}", "a", 0.01) for i in range(3)]  # estimated 0.01, measured ~0.1
    honest = [cand(f"b{i}", "b", 0.03) for i in range(3)]  # estimated 0.03, measured ~0.03
    queue = optimistic + honest
    variants = {c.family: [c] for c in queue}
    assert [c.kind for c in _by_calibrated_estimate(queue, variants, {"a": [10.0], "b": [1.0]})] == ["b"] * 3 + ["a"] * 3
    # A kind not measured yet is scaled by the median of all measurements.
    assert [c.kind for c in _by_calibrated_estimate(queue, variants, {"b": [1.0, 5.0, 6.0]})][:3] == ["a"] * 3


def test_an_open_whole_model_call_is_settled_with_more_pooled_pairs() -> None:
    from types import SimpleNamespace

    from rewriter.pipeline import CONFIRMATIONS, _settled
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
    judge = SimpleNamespace(config=ValidationConfig(), model_latency=lambda base, cand: calls.append(1) or queue[len(calls) - 1])
    model = Model.from_source(parse(CHAIN3))
    settled = _settled(judge, model, model, 1.0, exact=False)  # type: ignore[arg-type]
    assert len(calls) >= 2 and settled.ci.pairs == 12 * len(calls) and settled.ci.faster(1.0)
    # A clear first measurement is taken as it is.
    calls.clear()
    queue[0] = comparison(0.02)
    assert _settled(judge, model, model, 1.0, exact=False).ci.pairs == 12 and len(calls) == 1  # type: ignore[arg-type]


class ClockedJudge:
    """A :class:`Judge` whose timings are a model, not a clock: the whole model takes 10 ms less 1 ms
    per perturbed conv; each rewrite's region saves 1 ms. Counts whole-model measurements."""

    @staticmethod
    def make(model: Model, config: ValidationConfig):  # type: ignore[no-untyped-def]
        from rewriter.validation.judge import Judge
        from rewriter.validation.latency import LatencyComparison
        from rewriter.validation.stats import RatioCI

        def comparison(base_ms: float, cand_ms: float) -> LatencyComparison:
            ratio = base_ms / cand_ms
            return LatencyComparison(base_ms / 1e3, cand_ms / 1e3, RatioCI(ratio, 0.99 * ratio, 1.01 * ratio, 20), 1)

        def millis(proto: onnx.ModelProto) -> float:
            return 10.0 - sum("_p" in n.name for n in proto.graph.node)

        class Clocked(Judge):
            calls = 0

            def model_latency(self, base, candidate):  # type: ignore[no-untyped-def]
                Clocked.calls += 1
                return comparison(millis(base), millis(candidate))

            def region_latency(self, accepted, trial, candidate):  # type: ignore[no-untyped-def]
                return comparison(2.0, 1.0)

        return Clocked(model, None, config)


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
    untried = [d for d in result.decisions if d.reason.startswith("not tried: target speedup")]
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


# -- exact rounds proven together ---------------------------------------------------------------------------
THREE_BN = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4, 8, 8] X) => (float[1, 4, 8, 8] Y)
    <float[4, 4, 3, 3] W1, float[4] s1, float[4] b1, float[4] m1, float[4] var1,
     float[4, 4, 3, 3] W2, float[4] s2, float[4] b2, float[4] m2, float[4] var2,
     float[4, 4, 3, 3] W3, float[4] s3, float[4] b3, float[4] m3, float[4] var3> {
        C1 = Conv <pads = [1, 1, 1, 1]> (X, W1)
        N1 = BatchNormalization (C1, s1, b1, m1, var1)
        R1 = Relu (N1)
        C2 = Conv <pads = [1, 1, 1, 1]> (R1, W2)
        N2 = BatchNormalization (C2, s2, b2, m2, var2)
        R2 = Relu (N2)
        C3 = Conv <pads = [1, 1, 1, 1]> (R2, W3)
        Y = BatchNormalization (C3, s3, b3, m3, var3)
    }
"""


class CorruptingFold(FoldBatchNorm):
    """fold_batchnorm that folds the middle BN wrongly (the folded conv's weight doubled): one bad rewrite."""

    name = "corrupting_fold"

    def apply(self, model: Model, candidate: Candidate) -> None:
        super().apply(model, candidate)
        if "Conv_3" in candidate.nodes:
            (relu,) = [n for n in model.graph.nodes if n.op == "Relu" and n.outputs[0].name == "R2"]
            conv = relu.inputs[0].inputs[0]  # the folded conv feeding it
            w = const_value(conv.inputs[1])
            conv.inputs[1] = constant(NameFactory(model.graph), "bad_W", (w * 2).astype(w.dtype))


def _count_numerics(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from rewriter.validation.judge import Judge

    calls: list[int] = []
    real = Judge.numerics

    def counted(self, proto, session=None):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(self, proto, session)

    monkeypatch.setattr(Judge, "numerics", counted)
    return calls


def test_an_exact_round_is_proven_with_one_numerics_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_numerics(monkeypatch)
    model = parse(THREE_BN, seed=1)  # seed 0 draws a graph where one exact fold alone rounds just past allclose
    result = optimize(model, ["fold_batchnorm"], config=ValidationConfig(latency=False))
    assert len(result.kept) == 3 and ops(result.model).get("BatchNormalization", 0) == 0
    assert all(d.reason == "numerics proven with its round (latency not measured)" for d in result.decisions)
    assert all(s.allclose_ratio <= 1.0 for d in result.decisions for s in d.verdict.numerics.values())  # type: ignore[union-attr]
    assert len(calls) == 2  # the round's proof and the closing end-to-end numerics
    assert_same_outputs(model, result.model)


def test_a_round_that_fails_together_is_proven_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_numerics(monkeypatch)
    model = parse(THREE_BN, seed=1)  # seed 0 draws a graph where one exact fold alone rounds just past allclose
    result = optimize(model, [CorruptingFold()], config=ValidationConfig(latency=False))
    verdicts = {d.candidate.nodes: (d.kept, d.reason) for d in result.decisions}
    assert len(result.decisions) == 3 and len(result.kept) == 2
    (bad,) = [d for d in result.decisions if not d.kept]
    assert "Conv_3" in bad.candidate.nodes and bad.reason.startswith("numerics:")
    assert all(reason == "numerics within budget (latency not measured)" for kept, reason in verdicts.values() if kept)
    assert len(calls) == 1 + 3 + 1  # the failed round, each alone, the closing numerics
    assert_same_outputs(model, result.model)  # the two good folds are exact


def test_round_proof_covers_the_candidates_it_applied_and_only_exact_rounds() -> None:
    from rewriter.pipeline import _prove_round
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
    assert _prove_round(FoldBatchNorm(), model, todo, judge, deadline=0.0) is None  # no time left: each alone
