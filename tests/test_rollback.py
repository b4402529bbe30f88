"""Rollback: a faulty pass never gets a wrong model past validation, and never ends the run.

Deliberately faulty passes are handed to ``rewriter.optimize(passes=[...])`` through the public API:

* ``CorruptWeights`` rewrites every Conv/Gemm weight wrongly (four kinds of corruption, from a 1% scale
  to a NaN, each visible at the outputs); on the sample model and on seeded random conv nets, every one
  of its candidates must be rolled back for numerics -- 100%, not most -- and the model that comes out
  must be the input. (A corruption that cannot change any output on the feeds, such as swapping two
  channels that ReLU zeroes, is invisible to any numerics check and is not used.)
* a pass that raises in ``apply`` (after editing its fork), or produces a model onnxruntime refuses, has
  that candidate rolled back and reported while the run goes on and keeps a good rewrite of another pass;
* a pass whose ``find`` raises is reported as a skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import pytest

import rewriter
from models.builder import NetBuilder
from passes.fuse_1x1_chain import Fuse1x1Chain
from rewriter.contract import Candidate, Cost, Pass
from rewriter.graph import NameFactory, const_value, constant
from rewriter.model import Model
from rewriter.outcome import Outcome
from rewriter.validation.feeds import FeedSet, input_specs
from rewriter.validation.judge import ValidationConfig

NUMERICS_ONLY = ValidationConfig(latency=False)


def _corrupt(w: np.ndarray, kind: str) -> np.ndarray:
    w = w.astype(w.dtype, copy=True)
    if kind == "scale":  # 1% too large: far outside rtol 1e-4, yet plausible-looking
        return w * w.dtype.type(1.01)
    if kind == "negate_channel":
        w[0] = -w[0]
        return w
    if kind == "shift":  # every weight off by 1% of their spread
        return w + w.dtype.type(0.01 * float(np.std(w)))
    if kind == "nan":
        w.reshape(-1)[w.size // 2] = np.nan
        return w
    raise ValueError(kind)


KINDS = ["scale", "negate_channel", "shift", "nan"]


class CorruptWeights(Pass):
    """Proposes rewriting every Conv/Gemm with a constant weight -- and writes a corrupted weight."""

    name = "corrupt_weights"
    summary = "deliberately wrong weights"
    exact = True

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def find(self, model: Model) -> Iterator[Candidate]:
        for node in model.graph.nodes:
            w = const_value(node.inputs[1]) if node.op in ("Conv", "Gemm") and len(node.inputs) > 1 else None
            if w is not None and w.shape[0] >= 2:
                yield Candidate(self.name, (node.name,), f"{self.kind} weight of {node.name}", Cost(1000, 1, 0, 0))

    def apply(self, model: Model, candidate: Candidate) -> None:
        node = model.node(candidate.nodes[0])
        assert node is not None
        w = const_value(node.inputs[1])
        assert w is not None
        node.inputs[1] = constant(NameFactory(model.graph), f"{node.name}_W", _corrupt(w, self.kind))


class RaisesAfterEditing(Pass):
    """Edits its fork in place (a weight array, a node's input) and then raises."""

    name = "raises_after_editing"
    summary = "edits, then raises"
    exact = True

    def find(self, model: Model) -> Iterator[Candidate]:
        for node in model.graph.nodes:
            if node.op == "Conv":
                yield Candidate(self.name, (node.name,), f"break {node.name}", Cost(10**9, 0, 0, 0))

    def apply(self, model: Model, candidate: Candidate) -> None:
        node = model.node(candidate.nodes[0])
        assert node is not None
        w = const_value(node.inputs[1])
        assert w is not None
        w[...] = 0.0  # against the contract: constants are never modified in place
        node.inputs.clear()
        raise RuntimeError(f"deliberate failure on {node.name}")


class InvalidModel(Pass):
    """Produces a model onnxruntime cannot load (a Conv weight of the wrong rank)."""

    name = "invalid_model"
    summary = "a model onnxruntime refuses"
    exact = True

    def find(self, model: Model) -> Iterator[Candidate]:
        node = next(n for n in model.graph.nodes if n.op == "Conv")
        yield Candidate(self.name, (node.name,), "bad rank", Cost(10**9, 0, 0, 0))

    def apply(self, model: Model, candidate: Candidate) -> None:
        node = model.node(candidate.nodes[0])
        assert node is not None
        w = const_value(node.inputs[1])
        assert w is not None
        node.inputs[1] = constant(NameFactory(model.graph), "flat_W", w.reshape(-1))


class FindRaises(Pass):
    name = "find_raises"
    summary = "find raises"
    exact = True

    def find(self, model: Model) -> Iterator[Candidate]:
        raise KeyError("deliberate failure in find")
        yield  # pragma: no cover

    def apply(self, model: Model, candidate: Candidate) -> None:  # pragma: no cover
        raise AssertionError


def random_net(seed: int) -> onnx.ModelProto:
    """A small seeded CNN: stem, a few conv(+BN)+ReLU layers with 1x1 and 3x3 kernels, a Gemm head."""
    rng = np.random.default_rng(seed)
    b = NetBuilder(seed)
    c = int(rng.integers(4, 9))
    x = b.conv_relu("input", 3, c, 3, name="stem")
    for i in range(int(rng.integers(2, 5))):
        k = int(rng.choice([1, 3]))
        cout = int(rng.integers(4, 17))
        y = b.conv(x, c, cout, k, name=f"conv{i}")
        if rng.random() < 0.5:
            y = b.batchnorm(y, cout)
        x, c = b.relu(y), cout
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    return b.model("input", [1, 3, 16, 16], b.gemm(x, c, 5), [1, 5], f"net{seed}")


MODELS = ["sample"] + [f"net{seed}" for seed in range(4)]


@pytest.fixture(params=MODELS)
def model(request: pytest.FixtureRequest, sample_model: onnx.ModelProto) -> onnx.ModelProto:
    return sample_model if request.param == "sample" else random_net(int(request.param[3:]))


@pytest.mark.parametrize("kind", KINDS)
def test_corrupted_weights_are_rolled_back_every_time(kind: str, model: onnx.ModelProto) -> None:
    m = Model.from_source(model)
    feeds = FeedSet.random(input_specs(m.proto, m.input_shapes), count=4, calibration_count=1)
    result = rewriter.optimize(m, passes=[CorruptWeights(kind)], config=NUMERICS_ONLY, feeds=feeds)
    expected = sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm"))
    assert len(result.decisions) == expected  # every candidate was tried ...
    assert not result.kept  # ... and every one rolled back
    assert all(d.outcome is Outcome.NUMERICS and d.reason.startswith("numerics") for d in result.decisions), [d.reason for d in result.decisions]
    assert result.passes[0].rolled_back == expected and result.passes[0].kept == 0
    assert result.model == m.proto
    assert not result.final_numerics


def test_raising_pass_is_rolled_back_reported_and_the_run_goes_on(sample_model: onnx.ModelProto) -> None:
    before = sample_model.SerializeToString()
    result = rewriter.optimize(sample_model, passes=[RaisesAfterEditing(), FindRaises(), InvalidModel(), Fuse1x1Chain()],
                               config=NUMERICS_ONLY)
    by_pass: dict[str, list] = {}
    for d in result.decisions:
        by_pass.setdefault(d.candidate.pass_name, []).append(d)
    convs = sum(1 for n in sample_model.graph.node if n.op_type == "Conv")
    raised = by_pass["raises_after_editing"]
    assert len(raised) == convs
    assert all(d.outcome is Outcome.RAISED and d.reason.startswith("rewrite raised RuntimeError: deliberate failure") for d in raised)
    assert [s.reason for s in result.passes[1].skips] == ["find raised KeyError: 'deliberate failure in find'"]
    (invalid,) = by_pass["invalid_model"]
    assert invalid.outcome is Outcome.VALIDATION_FAILED and invalid.reason.startswith("validation failed")
    # The good pass still ran on an intact model (the in-place edits of the raising pass did not leak).
    assert [d.kept for d in by_pass["fuse_1x1_chain"]] == [True]
    assert all(s.max_abs < 1e-3 for s in result.final_numerics.values())
    assert sample_model.SerializeToString() == before
