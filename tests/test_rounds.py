"""Exact rounds judged as a group: numerics once, latency once, bisected down to the slower rewrites."""

from __future__ import annotations

import onnx
import pytest

from rewriter.model import Model
from rewriter.outcome import Outcome
from rewriter.pipeline import optimize
from rewriter.validation.deployment import DeploymentProfile
from rewriter.validation.judge import Judge, ValidationConfig
from rewriter.validation.latency import LatencyComparison
from rewriter.validation.stats import RatioCI
from tests.helpers import assert_same_outputs, ops, parse
from tests.search_fixtures import THREE_BN, count_numerics
from rewriter.validation.latency import TimingOptions

FAST_TIMING = TimingOptions(min_pairs=6, max_pairs=10, time_budget_s=0.3)

# Six conv + BN pairs in a row: six folds in one round.
SIX_BN = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 8, 8] X) => (float[N, 4, 8, 8] Y)
    <""" + ", ".join(f"float[4, 4, 3, 3] W{i}, float[4] s{i}, float[4] b{i}, float[4] m{i}, float[4] var{i}" for i in range(6)) + """> {
""" + "\n".join(
    f"        C{i} = Conv <pads = [1, 1, 1, 1]> ({'X' if i == 0 else f'R{i - 1}'}, W{i})\n"
    f"        N{i} = BatchNormalization (C{i}, s{i}, b{i}, m{i}, var{i})\n"
    f"        {'Y' if i == 5 else f'R{i}'} = Relu (N{i})"
    for i in range(6)
) + "\n    }\n"


def six_bn() -> onnx.ModelProto:
    """SIX_BN with conv weights scaled to keep activations near 1 (N(0, 1) weights of fan-in 36 grow them
    6x per layer, and six layers deep a fold's rounding is then past allclose)."""
    from onnx import numpy_helper

    model = parse(SIX_BN, seed=1)
    for i, t in enumerate(model.graph.initializer):
        if t.name.startswith("W"):
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) / 6.0, t.name))
    return model


# Two 1x1 convs on a 1x1 input: conv_as_gemm rewrites that lower neither MACs nor nodes.
SPECULATIVE = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4, 1, 1] X) => (float[1, 4, 1, 1] Y)
    <float[4, 4, 1, 1] Wa, float[4, 4, 1, 1] Wb> {
        A = Conv (X, Wa)
        R = Relu (A)
        Y = Conv (R, Wb)
    }
"""


def _comparison(base_ms: float, cand_ms: float) -> LatencyComparison:
    ratio = base_ms / cand_ms
    return LatencyComparison(base_ms / 1e3, cand_ms / 1e3, RatioCI(ratio, 0.99 * ratio, 1.01 * ratio, 20), 1)


class SlowFoldJudge(Judge):
    """Whole-model time: 12 ms, less 0.5 ms per BN folded -- except folding the BNs in ``slow``, which costs
    4 ms each (at the profiles in ``slow_at``; every profile when empty). Region timings are never asked for."""

    slow: frozenset[str] = frozenset()
    slow_at: frozenset[DeploymentProfile] = frozenset()
    timings: list[int] = []

    def _millis(self, proto: onnx.ModelProto, profile: DeploymentProfile) -> float:
        bns = {i for n in proto.graph.node if n.op_type == "BatchNormalization" for i in n.input[:1]}
        folded = {f"C{i}" for i in range(6)} - bns
        slow = self.slow if not self.slow_at or profile in self.slow_at else frozenset()
        return 12.0 - 0.5 * len(folded) + 4.0 * len(folded & slow)

    def model_latency(self, base, candidate, profile=None):  # type: ignore[no-untyped-def]
        p = self._profile(profile)
        self.timings.append(1)
        return _comparison(self._millis(base, p), self._millis(candidate, p))

    def region_latency(self, accepted, trial, candidate, profile=None):  # type: ignore[no-untyped-def]
        raise AssertionError("a round judged as a group times no region")

    def same_deployed(self, base, candidate):  # type: ignore[no-untyped-def]
        return False  # the clock above is what is under test (onnxruntime would fold these BNs itself)


def _conv_outputs(result) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Each decision's conv, by the tensor it wrote (C0..C5)."""
    names = {n.name: n.output[0] for n in Model.from_source(six_bn()).proto.graph.node}
    return {d.candidate.nodes[0]: names[d.candidate.nodes[0]] for d in result.decisions}


#: Rounds proven and timed as the search goes (a run of exact passes is otherwise proven once, on its result).
PER_ROUND = ValidationConfig(defer_exact=False)


def _run(slow: set[str], config: ValidationConfig | None = None, slow_at: set[DeploymentProfile] | None = None):  # type: ignore[no-untyped-def]
    model = Model.from_source(six_bn())
    config = config or PER_ROUND
    judge = SlowFoldJudge(model, None, config)
    judge.slow, judge.slow_at, judge.timings = frozenset(slow), frozenset(slow_at or ()), []
    return optimize(model, ["fold_batchnorm"], config=config, judge=judge), judge


def test_a_round_that_is_not_slower_is_kept_on_one_timing() -> None:
    result, judge = _run(set())
    assert len(result.kept) == 6 and ops(result.model).get("BatchNormalization", 0) == 0
    assert all(d.verdict.latency_scope == "round" for d in result.decisions)  # type: ignore[union-attr]
    assert all(d.reason.startswith("exact (numerics and latency proven with its round: 6 of 6 rewrites together)") for d in result.decisions)
    assert len(judge.timings) == 1  # the round; the pass's end-to-end check and the final one time the same pair
    assert_same_outputs(six_bn(), result.model)


@pytest.mark.parametrize("slow", [{"C2"}, {"C0", "C5"}, {"C1", "C2", "C3", "C4"}])
def test_bisection_names_and_rolls_back_exactly_the_slower_folds(slow: set[str]) -> None:
    result, judge = _run(slow)
    conv = _conv_outputs(result)
    refused = {conv[d.candidate.nodes[0]] for d in result.decisions if not d.kept}
    assert refused == slow
    assert all(d.outcome is Outcome.LATENCY and "found by bisecting a round of 6" in d.reason for d in result.decisions if not d.kept)
    left = {n.input[0] for n in result.model.graph.node if n.op_type == "BatchNormalization"}
    assert left == slow  # the slower ones are still BNs; every other fold is in the output
    assert_same_outputs(six_bn(), result.model)
    assert len(judge.timings) <= 1 + 2 * 3 * len(slow) + 1  # the round, 2 per level (log2 6 < 3) per slow fold, the close


def test_a_fold_slower_only_at_a_later_profile_is_rolled_back_and_says_where() -> None:
    profiles = (DeploymentProfile(1, 1), DeploymentProfile(2, 4))
    result, _ = _run({"C3"}, ValidationConfig(profiles=profiles, defer_exact=False), slow_at={profiles[1]})
    (bad,) = [d for d in result.decisions if not d.kept]
    assert _conv_outputs(result)[bad.candidate.nodes[0]] == "C3" and "at threads=2,batch=4" in bad.reason
    assert [p.profile for p in bad.verdict.profiles] == list(profiles)  # type: ignore[union-attr]
    kept = [d for d in result.decisions if d.kept]
    assert len(kept) == 5 and all(len(d.verdict.profiles) == 2 for d in kept)  # type: ignore[union-attr]


def test_a_kept_part_that_differs_from_the_proven_round_is_proven_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_numerics(monkeypatch)
    result, _ = _run({"C4"})
    assert len(result.kept) == 5
    assert len(calls) == 1 + 1 + 1  # the round's proof, the kept part's, the closing end-to-end


def test_without_latency_or_for_speculative_rewrites_each_is_judged_alone() -> None:
    result = optimize(parse(THREE_BN, seed=1), ["fold_batchnorm"], config=ValidationConfig(latency=False))
    assert all(d.reason == "numerics proven with its round (latency not measured)" for d in result.decisions)
    from rewriter.rounds import prove_round
    from passes.conv1x1_to_gemm import Conv1x1ToGemm

    model = Model.from_source(parse(SPECULATIVE))
    judge = Judge(model, None, ValidationConfig())
    todo = [c for c in Conv1x1ToGemm().find(model) if hasattr(c, "cost")]
    proof = prove_round(Conv1x1ToGemm(), model, todo, judge)
    assert proof is None or not proof.reducing  # lowers neither MACs nor nodes: each must be shown faster alone


def test_a_speculative_exact_rewrite_is_timed_first_and_a_slower_one_runs_no_numerics() -> None:
    from passes.conv1x1_to_gemm import Conv1x1ToGemm
    from rewriter.contract import Candidate

    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 1, 1] X) => (float[1, 4, 1, 1] Y)
        <float[4, 4, 1, 1] Wa> {
            Y = Conv (X, Wa)
        }
    """
    model = Model.from_source(parse(text))
    numerics: list[int] = []

    class Slow(Judge):
        def region_latency(self, accepted, trial, candidate, profile=None):  # type: ignore[no-untyped-def]
            return _comparison(1.0, 1.2)

        def numerics(self, proto, session=None):  # type: ignore[no-untyped-def]
            numerics.append(1)
            return super().numerics(proto, session)

    judge = Slow(model, None, ValidationConfig())
    (cand,) = [c for c in Conv1x1ToGemm().find(model) if isinstance(c, Candidate)]
    from rewriter.trial import apply_candidate

    verdict = judge.judge(model, apply_candidate(Conv1x1ToGemm(), model, cand), cand, exact=True)
    assert not verdict.keep and verdict.outcome is Outcome.LATENCY and verdict.numerics == {} and not numerics


# -- a run of exact passes proven once, on its result ----------------------------------------------------------


def test_a_run_of_exact_passes_is_proven_with_one_numerics_run_and_one_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_numerics(monkeypatch)
    result, judge = _run(set(), ValidationConfig())
    assert len(result.kept) == 6 and result.exact_latency == "result"
    assert len(calls) == 1 and len(judge.timings) == 1  # the closing comparison, which every run makes anyway
    assert result.numerics_feeds == ValidationConfig().exact_feeds == 2 < len(judge.feeds.validation)
    assert len(judge.reference) == len(judge.feeds.validation)  # (asked for: the rest is computed then)
    for d in result.decisions:
        assert d.verdict.latency is result.final_latency and d.verdict.latency_scope == "result"  # type: ignore[union-attr]
        assert d.verdict.numerics == result.final_numerics  # type: ignore[union-attr]
        assert "numerics and latency proven with the whole result (end-to-end speedup 1.333x" in d.reason
    assert_same_outputs(six_bn(), result.model)


@pytest.mark.parametrize("slow", [{"C2"}, {"C0", "C5"}])
def test_a_slower_result_is_searched_again_round_by_round_and_names_the_slower_folds(slow: set[str]) -> None:
    result, judge = _run(slow, ValidationConfig())
    refused = {_conv_outputs(result)[d.candidate.nodes[0]] for d in result.decisions if not d.kept}
    assert refused == slow and len(result.decisions) == 6  # the first attempt's decisions are replaced, not doubled
    assert result.exact_latency is not None and result.exact_latency.startswith("rounds: the result with every exact rewrite is slower end to end")
    assert all(d.outcome is Outcome.LATENCY and "found by bisecting a round of 6" in d.reason for d in result.decisions if not d.kept)
    assert {n.input[0] for n in result.model.graph.node if n.op_type == "BatchNormalization"} == slow


def test_a_result_slower_only_at_a_later_profile_is_searched_again_and_the_fold_named() -> None:
    profiles = (DeploymentProfile(1, 1), DeploymentProfile(2, 4))
    result, _ = _run({"C3"}, ValidationConfig(profiles=profiles), slow_at={profiles[1]})
    assert "at threads=2,batch=4" in (result.exact_latency or "")
    (bad,) = [d for d in result.decisions if not d.kept]
    assert _conv_outputs(result)[bad.candidate.nodes[0]] == "C3" and "at threads=2,batch=4" in bad.reason


def test_a_corrupting_rewrite_in_a_deferred_run_is_named_and_rolled_back() -> None:
    from tests.search_fixtures import THREE_BN, CorruptingFold

    model = parse(THREE_BN, seed=1)
    result = optimize(model, [CorruptingFold()], config=ValidationConfig(timing=FAST_TIMING))
    (bad,) = [d for d in result.decisions if not d.kept]
    assert "Conv_3" in bad.candidate.nodes and bad.outcome is Outcome.NUMERICS
    assert result.exact_latency is not None and "fails the exact budget" in result.exact_latency
    assert len(result.kept) == 2 and len(result.decisions) == 3
    assert result.numerics_feeds == 8  # searched again: every validation feed, not the result's first two
    assert_same_outputs(model, result.model)


def test_a_rewrite_onnxruntime_cannot_run_in_a_deferred_run_is_named_and_rolled_back(sample_model: onnx.ModelProto) -> None:
    from passes.fuse_1x1_chain import Fuse1x1Chain
    from tests.test_rollback import InvalidModel

    result = optimize(sample_model, [InvalidModel(), Fuse1x1Chain()], config=ValidationConfig(timing=FAST_TIMING))
    (invalid,) = [d for d in result.decisions if d.candidate.pass_name == "invalid_model"]
    assert invalid.outcome is Outcome.VALIDATION_FAILED and "cannot be run" in (result.exact_latency or "")
    assert [d.kept for d in result.decisions if d.candidate.pass_name == "fuse_1x1_chain"] == [True]
    assert_same_outputs(sample_model, result.model)


# -- rewrites that lower neither MACs nor nodes, in a run proven on its result --------------------------------


class GroupClock(Judge):
    """Regions time ``ratio`` faster (every region asked for is recorded); whole models are as fast as before."""

    ratio = 1.0
    regions: list[tuple[str, ...]] = []

    def region_latency(self, accepted, trial, candidate, profile=None):  # type: ignore[no-untyped-def]
        self.regions.append(candidate.nodes)
        return _comparison(1.0, 1.0 / self.ratio)

    def model_latency(self, base, candidate, profile=None):  # type: ignore[no-untyped-def]
        return _comparison(1.0, 1.0)


@pytest.mark.parametrize("ratio", [1.3, 1.0])
def test_a_round_of_speculative_rewrites_is_timed_once_on_the_union_of_its_regions(ratio: float) -> None:
    model = Model.from_source(parse(SPECULATIVE))
    judge = GroupClock(model, None, ValidationConfig())
    judge.ratio, judge.regions = ratio, []
    result = optimize(model, ["conv1x1_to_gemm"], config=ValidationConfig(), judge=judge)
    first = result.decisions[:2]  # the round of two conv_as_gemm rewrites
    assert len(first) == 2 and len(judge.regions[0]) == 2  # one timing for both: the union of the two convs
    if ratio > 1:
        assert all(d.kept and "shown faster with its round of 2" in d.reason for d in first)
        assert all("numerics proven with the whole result" in d.reason for d in first)  # credited after the closing
    else:
        assert all(d.outcome is Outcome.LATENCY and "no speedup shown with its round of 2" in d.reason for d in first)
    assert_same_outputs(parse(SPECULATIVE), result.model)
