"""Passes and judges the search tests share: tiny graphs written as ONNX text, fake passes whose truth is
known (a numerics bug, a pass that raises, a lossy pass with a known error), and a judge with a clock model."""

from __future__ import annotations

import onnx

from passes.fold_batchnorm import FoldBatchNorm
from passes.fuse_1x1_chain import Chain, Fuse1x1Chain
from rewriter.contract import Candidate, Cost, Pass, Skip
from rewriter.graph import NameFactory, constant, const_value
from rewriter.model import Model
from rewriter.validation.judge import ValidationConfig
from rewriter.validation.latency import TimingOptions

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

            def model_latency(self, base, candidate, profile=None):  # type: ignore[no-untyped-def]
                Clocked.calls += 1
                return comparison(millis(base), millis(candidate))

            def region_latency(self, accepted, trial, candidate, profile=None):  # type: ignore[no-untyped-def]
                return comparison(2.0, 1.0)

        return Clocked(model, None, config)


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


class ClipInput(Pass):
    """A fake lossy pass tuned to its validation feeds: clips conv A's input to [-2, 2], which moves nothing on
    inputs of small magnitude and much on large ones (data unlike the validation feeds)."""

    name = "clip_input"
    summary = "clip a conv's input"
    exact = False

    def __init__(self, bound: float = 2.0, saves: int = 90) -> None:
        self.bound, self.saves = bound, saves

    def find(self, model: Model):  # type: ignore[no-untyped-def]
        for node in model.graph.nodes:
            if node.op == "Conv" and node.outputs[0].name == "A" and "_c" not in node.name:
                yield Candidate(self.name, (node.name,), "clip A's input", Cost(100, 100 - self.saves, 1, 1), error=0.0)

    def apply(self, model: Model, candidate: Candidate) -> None:
        import numpy as np
        import onnx_graphsurgeon as gs

        node = model.node(candidate.nodes[0])
        assert node is not None
        names = NameFactory(model.graph)
        x = node.inputs[0]
        clipped = gs.Variable(names("clipped"), dtype=x.dtype, shape=x.shape)
        lo, hi = (constant(names, n, np.asarray(v, np.float32)) for n, v in (("lo", -self.bound), ("hi", self.bound)))
        model.graph.nodes.append(gs.Node("Clip", name=names("clip"), inputs=[x, lo, hi], outputs=[clipped]))
        node.inputs[0] = clipped
        node.name = node.name + "_c"


def count_numerics(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    """Count :meth:`Judge.numerics` calls (one entry per call) for the rest of the test."""
    from rewriter.validation.judge import Judge

    calls: list[int] = []
    real = Judge.numerics

    def counted(self, proto, session=None):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(self, proto, session)

    monkeypatch.setattr(Judge, "numerics", counted)
    return calls
