"""The guarded pipeline: good rewrites are kept, broken ones rolled back, errors never fatal."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from passes.fuse_1x1_chain import Fuse1x1Chain
from rewriter.contract import Skip
from rewriter.model import Model
from rewriter.outcome import Outcome
from rewriter.pipeline import apply_pass, optimize
from rewriter.validation.judge import ValidationConfig
from tests.helpers import assert_same_outputs, ops
from tests.search_fixtures import FAST, CorruptingChain, RaisingPass


def test_good_rewrite_is_kept_with_figures(sample_model: onnx.ModelProto) -> None:
    result = optimize(sample_model, ["fuse_1x1_chain"], config=FAST)
    assert len(result.kept) == 1
    d = result.kept[0]
    assert d.candidate.pass_name == "fuse_1x1_chain"
    assert d.verdict is not None and d.verdict.latency is not None
    # A run of exact passes is proven once, on its result: the decision carries the end-to-end figures.
    assert d.verdict.latency_scope == "result" and d.verdict.latency is result.final_latency
    assert "proven with the whole result (end-to-end speedup" in d.reason and result.exact_latency == "result"
    assert all(s.allclose_ratio <= 1.0 for s in d.verdict.numerics.values())
    assert ops(result.model)["Conv"] == ops(sample_model)["Conv"] - 1
    assert result.after.total_macs < result.before.total_macs
    assert result.final_latency is not None
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(sample_model, result.model)


def test_broken_rewrite_is_rolled_back(sample_model: onnx.ModelProto) -> None:
    result = optimize(sample_model, [CorruptingChain()], config=FAST)
    assert result.decisions and not result.kept
    assert all(d.outcome is Outcome.NUMERICS and d.reason.startswith("numerics:") for d in result.decisions)
    assert result.model.SerializeToString() == Model.from_source(sample_model).proto.SerializeToString()


def test_exception_in_pass_is_recorded_and_run_continues(sample_model: onnx.ModelProto) -> None:
    result = optimize(sample_model, [RaisingPass(), Fuse1x1Chain()], config=FAST)
    raised = [d for d in result.decisions if d.candidate.pass_name == "raising"]
    assert len(raised) == 1 and raised[0].outcome is Outcome.RAISED and "deliberate failure" in raised[0].reason
    assert any(d.kept and d.candidate.pass_name == "fuse_1x1_chain" for d in result.decisions)
    assert result.passes[0].skips == [Skip("raising", (sample_model.graph.node[0].name,), "a reason")]


def test_time_budget_stops_judging(sample_model: onnx.ModelProto) -> None:
    from rewriter.report import build_report

    result = optimize(sample_model, ["fuse_1x1_chain"], config=FAST, time_budget_s=0.0)
    assert not result.kept and not result.rolled_back
    # The candidate the pass found is recorded, as not tried -- not as rolled back.
    assert len(result.decisions) == 1 and len(result.not_tried) == 1
    (d,) = result.decisions
    assert d.outcome is Outcome.NOT_TRIED_TIME and d.verdict is None and d.reason == "not tried: validation time budget exhausted"
    assert (result.passes[0].kept, result.passes[0].rolled_back, result.passes[0].not_tried) == (0, 0, 1)
    report = build_report(result, input_path=None, input_sha256=None, output_path=None, output_sha256=None, provider="cpu", threads=1)
    assert [(r["decision"], r["outcome"]) for r in report["decisions"]] == [("not_tried", "not_tried_time")]
    assert (report["totals"]["rolled_back"], report["totals"]["not_tried"]) == (0, 1)
    assert result.model.SerializeToString() == Model.from_source(sample_model).proto.SerializeToString()


def test_time_budget_lets_a_generous_budget_judge_everything(sample_model: onnx.ModelProto) -> None:
    result = optimize(sample_model, ["fuse_1x1_chain"], config=FAST, time_budget_s=600.0)
    assert len(result.kept) == 1 and not result.not_tried


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
