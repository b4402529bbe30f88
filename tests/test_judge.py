"""The judge on the sample model: numerics gates, latency A/B (whole model and the touched region), the
task-metric hook and metric loading."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from passes.fuse_1x1_chain import Fuse1x1Chain
from rewriter.contract import Candidate, Cost
from rewriter.errors import InputError
from rewriter.model import Model
from rewriter.outcome import Outcome
from rewriter.validation import Budget, Judge, TaskMetric, TimingOptions, ValidationConfig, load_metric
from rewriter.validation.feeds import FeedSet, input_specs
from rewriter.validation.region import extract_region, region_feed, region_outputs
from rewriter.validation.runtime import reference_session, run_feeds

#: Short A/B runs: enough pairs for a stable median on clearly separated cases, under a second each.
TIMING = TimingOptions(warmup=2, min_pairs=10, max_pairs=30, time_budget_s=2.0)
NO_LATENCY = ValidationConfig(latency=False)
#: A candidate for judge() calls where the rewrite is not a real pass's (latency is then timed end to end).
SOME_CANDIDATE = Candidate("test", ("no_such_node",), "a hand-made rewrite", Cost(0, 0, 0, 0))
#: Claims to lower MACs, so an exact verdict uses the "not shown slower" rule.
CHEAPER_CANDIDATE = Candidate("test", ("no_such_node",), "a hand-made rewrite", Cost(2, 1, 0, 0))


def output_name(model: onnx.ModelProto) -> str:
    return model.graph.output[0].name


def edited_weight(model: onnx.ModelProto, name: str, edit) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    """A copy of ``model`` whose initializer ``name`` is replaced by ``edit(array)``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.name == name:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(t)).astype(np.float32), name))
            return out
    raise KeyError(name)


def conv_weight(model: onnx.ModelProto, node_prefix: str) -> str:
    node = next(n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith(node_prefix))
    return node.input[1]


def with_dead_branch(model: onnx.ModelProto, width: int = 64) -> onnx.ModelProto:
    """The same function with a heavy branch of two 3x3 convs on the full-resolution input, whose mean is
    multiplied by 0 and added to the output: equal outputs, several times the work."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    y = g.output[0].name
    producer = next(n for n in g.node if y in n.output)
    producer.output[list(producer.output).index(y)] = y + ".pre"
    rng = np.random.default_rng(1)
    x, cin = g.input[0].name, g.input[0].type.tensor_type.shape.dim[1].dim_value
    for k in range(2):
        w = numpy_helper.from_array((rng.standard_normal((width, cin, 3, 3)) * 0.1).astype(np.float32), f"dead_{k}.W")
        g.initializer.append(w)
        g.node.append(helper.make_node("Conv", [x, w.name], [f"dead_{k}.out"], name=f"dead_{k}", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        x, cin = f"dead_{k}.out", width
    g.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "dead.zero"))
    g.node.extend([
        helper.make_node("ReduceMean", [x], ["dead.mean"], name="dead_mean", keepdims=0),
        helper.make_node("Mul", ["dead.mean", "dead.zero"], ["dead.nothing"], name="dead_mul"),
        helper.make_node("Add", [y + ".pre", "dead.nothing"], [y], name="dead_add"),
    ])
    onnx.checker.check_model(out, full_check=True)
    return out


@pytest.fixture(scope="module")
def accepted(sample_model: onnx.ModelProto) -> Model:
    return Model.from_source(sample_model)


@pytest.fixture(scope="module")
def judge(accepted: Model) -> Judge:
    feeds = FeedSet.random(input_specs(accepted.proto, accepted.input_shapes), count=4, calibration_count=2)
    return Judge(accepted, feeds, ValidationConfig(timing=TIMING))


@pytest.fixture(scope="module")
def fused(accepted: Model) -> tuple[Candidate, Model]:
    """The sample's lin_expand -> lin_project pair fused by fuse_1x1_chain, committed."""
    p = Fuse1x1Chain()
    (candidate,) = [c for c in p.find(accepted) if isinstance(c, Candidate)]
    trial = accepted.fork()
    p.apply(trial, candidate)
    return candidate, trial.commit()


# -- numerics ------------------------------------------------------------------------------------------


def test_reference_is_computed_once_on_validation_feeds(judge: Judge) -> None:
    ref = judge.reference
    assert ref is judge.reference
    assert len(ref) == len(judge.feeds.validation) == 4
    assert list(ref[0]) == [output_name(judge.original.proto)]
    assert ref[0][output_name(judge.original.proto)].shape == (1, 10)


def test_model_against_itself(judge: Judge, sample_model: onnx.ModelProto) -> None:
    stats = judge.numerics(sample_model)
    assert list(stats) == [output_name(sample_model)]
    for s in stats.values():
        assert s.allclose_ratio == 0 and s.max_abs == 0
        assert s.top1 == 1.0 and s.top5 == 1.0
    assert judge.config.budget.failures(stats, exact=True) == []
    assert judge.config.budget.failures(stats, exact=False) == []


def test_one_conv_weight_scaled_by_one_percent_fails_exact(judge: Judge, sample_model: onnx.ModelProto) -> None:
    scaled = edited_weight(sample_model, conv_weight(sample_model, "res_3x3"), lambda w: w * 1.01)
    stats = judge.numerics(scaled)
    problems = judge.config.budget.failures(stats, exact=True)
    assert len(problems) == 1
    assert repr(output_name(sample_model)) in problems[0]
    assert stats[output_name(sample_model)].allclose_ratio > 10


def test_slightly_perturbed_weight_passes_lossy_but_not_exact(judge: Judge, sample_model: onnx.ModelProto) -> None:
    noise = np.random.default_rng(0)
    perturbed = edited_weight(
        sample_model, conv_weight(sample_model, "lin_expand"), lambda w: w + 0.002 * w.std() * noise.standard_normal(w.shape)
    )
    stats = judge.numerics(perturbed)
    s = stats[output_name(sample_model)]
    assert 0 < s.max_abs < 0.05
    assert Budget().failures(stats, exact=True), "a perturbed weight must not pass the exact gate"
    assert Budget.parse("cosine>=0.99").failures(stats, exact=False) == []
    assert Budget.parse("cosine>=0.99,top1-drop<=0").failures(stats, exact=False) == []


def test_judge_rejects_on_numerics_with_reason(accepted: Model, sample_model: onnx.ModelProto) -> None:
    j = Judge(accepted, config=NO_LATENCY)
    scaled = Model.from_source(edited_weight(sample_model, conv_weight(sample_model, "stem"), lambda w: w * 1.05))
    v = j.judge(accepted, scaled, SOME_CANDIDATE, exact=True)
    assert not v.keep and v.outcome is Outcome.NUMERICS
    assert v.reason.startswith("numerics:") and repr(output_name(sample_model)) in v.reason
    assert v.latency is None
    kept = j.judge(accepted, Model.from_source(sample_model), SOME_CANDIDATE, exact=True)
    assert kept.keep and kept.outcome is Outcome.KEPT and "latency not measured" in kept.reason


def test_judge_needs_validation_feeds(accepted: Model) -> None:
    with pytest.raises(InputError, match="no validation feeds"):
        Judge(accepted, FeedSet([], [], "none"))


# -- latency -------------------------------------------------------------------------------------------


def test_model_latency_against_itself_contains_one(judge: Judge, sample_model: onnx.ModelProto) -> None:
    # Two identical models differ only by noise, so a 95% interval excludes 1.0 about one run in twenty
    # even on a quiet machine (and more often when other processes load it). One retry on fresh timings
    # makes a spurious failure ~1 in 400, while a real bias (e.g. always timing A first) would fail both.
    for attempt in range(2):
        lat = judge.model_latency(sample_model, sample_model)
        assert lat.ci.pairs >= TIMING.min_pairs
        assert lat.base_median_s > 0 and lat.candidate_median_s > 0
        if lat.ci.low <= 1.0 <= lat.ci.high:
            break
    assert lat.ci.low <= 1.0 <= lat.ci.high, f"identical models, speedup {lat.ci} after {attempt + 1} tries"


def test_model_latency_detects_a_much_slower_candidate(judge: Judge, sample_model: onnx.ModelProto) -> None:
    slow = with_dead_branch(sample_model)
    # Same outputs (the heavy branch contributes 0 * mean), so only latency can reject it.
    assert judge.config.budget.failures(judge.numerics(slow), exact=True) == []
    lat = judge.model_latency(sample_model, slow)
    assert lat.ci.slower(), f"a candidate with ~4x the work should be slower, got {lat.ci}"
    assert lat.candidate_median_s > lat.base_median_s


def test_judge_rejects_a_slower_exact_rewrite_timed_end_to_end(accepted: Model, sample_model: onnx.ModelProto) -> None:
    j = Judge(accepted, config=ValidationConfig(timing=TIMING))
    slow = Model.from_source(with_dead_branch(sample_model))
    # The candidate names no node of the model: the region cannot be extracted, so the whole model is timed.
    v = j.judge(accepted, slow, CHEAPER_CANDIDATE, exact=True)
    assert not v.keep and v.outcome is Outcome.LATENCY
    assert v.latency_scope == "model"
    assert v.reason.startswith("slower: model speedup")
    # Lowering neither MACs nor node count: an exact rewrite must show a speedup to be kept.
    speculative = j.judge(accepted, slow, SOME_CANDIDATE, exact=True)
    assert not speculative.keep and speculative.outcome is Outcome.LATENCY
    assert speculative.reason.startswith("lowers neither MACs nor node count")
    lossy = j.judge(accepted, slow, SOME_CANDIDATE, exact=False)
    assert not lossy.keep and lossy.outcome is Outcome.LATENCY and lossy.reason.startswith("no speedup shown")


def test_region_extraction_of_a_fused_pair(accepted: Model, fused: tuple[Candidate, Model]) -> None:
    candidate, trial = fused
    outputs = region_outputs(accepted, candidate.nodes)
    assert outputs == (accepted.node(candidate.nodes[-1]).outputs[0].name,)
    before = extract_region(accepted, outputs, candidate.nodes, accepted)
    after = extract_region(trial, outputs, candidate.nodes, accepted)
    assert before.outputs == after.outputs == outputs
    assert before.nodes == candidate.nodes
    assert [n.op_type for n in after.model.graph.node] == ["Conv"]
    assert before.inputs == after.inputs  # the same boundary: the fused conv reads what lin_expand read
    for region in (before, after):
        onnx.checker.check_model(region.model, full_check=True)
        assert [o.name for o in region.model.graph.output] == list(outputs)
    feed = region_feed((before, after), accepted, seed=0)
    assert set(feed) == set(before.inputs)
    (out_before,) = run_feeds(reference_session(before.model), [feed])
    (out_after,) = run_feeds(reference_session(after.model), [feed])
    for name in outputs:
        assert out_before[name].shape == (1, 64, 56, 56)
        np.testing.assert_allclose(out_after[name], out_before[name], rtol=1e-4, atol=1e-4)


def test_region_latency_shows_the_fusion_speedup(judge: Judge, accepted: Model, fused: tuple[Candidate, Model]) -> None:
    candidate, trial = fused
    # 86.7M MACs become 16.1M: a ~4x speedup measured, far from the interval's edge at 1.
    lat = judge.region_latency(accepted, trial, candidate)
    assert lat.ci.faster(), f"fused region should be faster, got {lat.ci}"
    assert lat.candidate_median_s < lat.base_median_s


def test_judge_keeps_the_fusion_with_subgraph_timing(accepted: Model, fused: tuple[Candidate, Model]) -> None:
    candidate, trial = fused
    j = Judge(accepted, config=ValidationConfig(timing=TIMING))
    v = j.judge(accepted, trial, candidate, exact=True)
    assert v.keep, v.reason
    assert v.latency_scope == "subgraph"
    assert v.reason.startswith("exact, subgraph speedup")
    d = v.to_dict()
    assert d["keep"] is True and d["latency"]["scope"] == "subgraph" and d["latency"]["speedup"] > 1


# -- the task-metric hook ------------------------------------------------------------------------------


class Fidelity:
    """A stand-in task metric: minus the largest logit error against the original model on fixed feeds
    (0 is perfect, higher is better). Records the sessions it is given."""

    def __init__(self, original: onnx.ModelProto, feeds: list[dict]) -> None:
        self.feeds = feeds
        self.expected = run_feeds(reference_session(original), feeds)
        self.sessions: list[object] = []

    def __call__(self, session) -> float:  # type: ignore[no-untyped-def]
        self.sessions.append(session)
        got = run_feeds(session, self.feeds)
        return -max(float(np.max(np.abs(g[k] - e[k]))) for g, e in zip(got, self.expected) for k in e)


@pytest.fixture()
def fidelity(accepted: Model) -> Fidelity:
    return Fidelity(accepted.proto, FeedSet.random(input_specs(accepted.proto, accepted.input_shapes), 2, 1, seed=5).validation)


def lossy_trial(sample_model: onnx.ModelProto) -> Model:
    # Output error ~0.015: passes cosine>=0.99, but the metric notices it.
    return Model.from_source(edited_weight(sample_model, conv_weight(sample_model, "res_3x3"), lambda w: w * 1.01))


def test_metric_drop_rejects_a_lossy_rewrite(accepted: Model, sample_model: onnx.ModelProto, fidelity: Fidelity) -> None:
    config = ValidationConfig(budget=Budget.parse("cosine>=0.99"), latency=False, metric=TaskMetric(fidelity, 1e-3, "fidelity"))
    j = Judge(accepted, config=config)
    v = j.judge(accepted, lossy_trial(sample_model), SOME_CANDIDATE, exact=False)
    assert not v.keep and v.outcome is Outcome.METRIC
    assert v.reason.startswith("fidelity dropped by") and "allowed 0.001" in v.reason
    drop = float(v.reason.split("dropped by ")[1].split()[0])
    assert drop > 1e-3 and drop == pytest.approx((j.metric_baseline or 0.0) - (v.metric or 0.0), rel=1e-3)
    # Called on the original (baseline) and on the trial, each time with an onnxruntime session.
    assert len(fidelity.sessions) == 2
    assert all(isinstance(s, ort.InferenceSession) for s in fidelity.sessions)
    assert abs(j.metric_baseline or 0.0) < 1e-3  # deploy session vs reference: float rounding only


def test_metric_within_allowance_keeps(accepted: Model, sample_model: onnx.ModelProto, fidelity: Fidelity) -> None:
    config = ValidationConfig(budget=Budget.parse("cosine>=0.99"), latency=False, metric=TaskMetric(fidelity, 0.5, "fidelity"))
    v = Judge(accepted, config=config).judge(accepted, lossy_trial(sample_model), SOME_CANDIDATE, exact=False)
    assert v.keep, v.reason
    assert v.metric is not None and -0.5 < v.metric < -1e-3


def test_metric_not_consulted_for_exact_rewrites(accepted: Model, sample_model: onnx.ModelProto, fidelity: Fidelity) -> None:
    config = ValidationConfig(latency=False, metric=TaskMetric(fidelity, 0.0, "fidelity"))
    v = Judge(accepted, config=config).judge(accepted, Model.from_source(sample_model), SOME_CANDIDATE, exact=True)
    assert v.keep and v.metric is None
    assert fidelity.sessions == []


# -- load_metric ---------------------------------------------------------------------------------------


def test_load_metric_from_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_metrics_mod.py").write_text("def accuracy(session):\n    return 0.75\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_metric("my_metrics_mod:accuracy")
    assert fn(None) == 0.75
    sys.modules.pop("my_metrics_mod", None)


def test_load_metric_from_dotted_module() -> None:
    from tests.helpers import ops

    assert load_metric("tests.helpers:ops") is ops


def test_load_metric_from_file(tmp_path: Path) -> None:
    path = tmp_path / "sub dir" / "metric.py"
    path.parent.mkdir()
    path.write_text("import math\n\ndef top1(session):\n    return math.pi\n")
    fn = load_metric(f"{path}:top1")
    assert fn(None) == pytest.approx(3.14159265)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected module:function"),
        (":fn", "expected module:function"),
        ("tests.helpers:", "expected module:function"),
        ("no_such_module_xyz_123:fn", "cannot import"),
        ("tests.helpers:not_there", "not a function"),
        ("tests.helpers:RTOL", "not a function"),
    ],
)
def test_load_metric_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_metric(spec)


def test_load_metric_bad_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot import"):
        load_metric(f"{tmp_path / 'missing.py'}:fn")
    broken = tmp_path / "broken.py"
    broken.write_text("def fn(:\n")
    with pytest.raises(InputError, match="cannot import"):
        load_metric(f"{broken}:fn")
    raising = tmp_path / "raising.py"
    raising.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(InputError, match="boom at import"):
        load_metric(f"{raising}:fn")


def test_quick_error_is_measured_on_the_logits_before_a_softmax() -> None:
    from tests.helpers import parse

    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 6] X) => (float[1, 3] P, float[1, 3] Q)
        <float[6, 3] W> {
            L = MatMul (X, W)
            P = Softmax <axis = 1> (L)
            Q = Relu (L)
        }
    """
    model = Model.from_source(parse(text))
    judge = Judge(model, None, NO_LATENCY)
    assert judge.error_tensors() == ["L", "Q"]  # the Softmax's input; Q as it is
    assert judge.error(model) == 0.0
    w = numpy_helper.to_array(model.proto.graph.initializer[0])
    # Logits scaled by 5: an error of 4x their spread (on both tensors).
    trial = Model.from_source(edited_weight(model.proto, "W", lambda a: a * 5.0))
    assert judge.error(trial) == pytest.approx(4.0, rel=0.3)
    small = Model.from_source(edited_weight(model.proto, "W", lambda a: a * 1.01))
    assert judge.error(small) == pytest.approx(0.01, rel=0.3)
    assert np.array_equal(w, numpy_helper.to_array(model.proto.graph.initializer[0]))  # the original is untouched
