"""Property: every exact pass, applied unguarded, keeps a random small conv graph's outputs equal.

Hypothesis draws graphs of 2-7 layers: convs (kernel 1/3/5, stride 1/2, padding 0 or "same", groups,
bias or not), 1x1 expansions into KxK convs and back, BatchNormalization, ReLU, per-channel Mul/Add,
parallel branches (KxK + 1x1 [+ identity]) joined by Add or Concat, and sometimes a classifier head
(GlobalAveragePool, 1x1 conv, Flatten, one or two Gemms). All built-in exact passes then run in registry order straight
through ``apply_pass`` -- no validation, which would hide a wrong rewrite by rolling it back -- and the
result must match the original at rtol 1e-4 / atol 1e-5 under onnxruntime with optimizations disabled.
Weights are He-scaled so activations stay O(1) and float32 rounding stays far below the tolerance.

``make test`` runs a few hundred examples; ``make fuzz`` runs the ``fuzz`` profile (>= 10,000).
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from rewriter.pipeline import apply_pass
from rewriter.registry import builtin_passes
from tests.helpers import assert_same_outputs


class _Net:
    def __init__(self, seed: int, channels: int, size: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.x, self.c, self.h, self.w = "X", channels, size, size
        self.in_channels, self.in_size = channels, size
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, pad: int, group: int, bias: bool) -> str:
        w = self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(1.0 / (cin // group * k * k))
        inputs = [x, self.const("W", w)]
        if bias:
            inputs.append(self.const("B", self.rng.standard_normal(cout) * 0.1))
        y = self.name("conv")
        self.nodes.append(helper.make_node("Conv", inputs, [y], name=y, kernel_shape=[k, k], strides=[stride, stride],
                                           pads=[pad] * 4, group=group))
        return y


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_graphs(draw: st.DrawFn) -> onnx.ModelProto:
    net = _Net(draw(st.integers(0, 2**31 - 1)), draw(st.integers(1, 8)), draw(st.integers(3, 9)))
    for _ in range(draw(st.integers(2, 7))):
        kind = draw(st.sampled_from(["conv", "conv1x1", "bn", "relu", "affine", "branches", "concat", "expand_kxk", "kxk_project"]))
        if kind in ("expand_kxk", "kxk_project"):
            # Pairs the fusions pay on: a 1x1 expansion into a KxK, or a KxK expansion into a 1x1 projection.
            k = draw(st.sampled_from([3, 5]))
            pad = draw(st.sampled_from([0, k // 2])) if min(net.h, net.w) >= k else k // 2
            stride = draw(st.sampled_from([1, 2]))
            wide, narrow = net.c * draw(st.integers(2, 4)), draw(st.integers(1, max(1, net.c)))
            if kind == "expand_kxk":
                a = net.conv(net.x, net.c, wide, 1, 1, 0, 1, draw(st.booleans()))
                y = net.conv(a, wide, narrow, k, stride, pad, 1, draw(st.booleans()))
            else:
                a = net.conv(net.x, net.c, wide, k, stride, pad, 1, draw(st.booleans()))
                y = net.conv(a, wide, narrow, 1, 1, 0, 1, draw(st.booleans()))
            net.h = (net.h + 2 * pad - k) // stride + 1
            net.w = (net.w + 2 * pad - k) // stride + 1
            net.x, net.c = y, narrow
            continue
        if kind in ("conv", "conv1x1"):
            k = 1 if kind == "conv1x1" else draw(st.sampled_from([1, 3, 5]))
            stride = draw(st.sampled_from([1, 1, 2])) if min(net.h, net.w) >= 3 else 1
            pad = draw(st.sampled_from([0, k // 2])) if k > 1 else 0
            if net.h + 2 * pad < k or net.w + 2 * pad < k:
                pad = k // 2
            cout_groups = draw(st.sampled_from(_divisors(net.c)))
            cout = cout_groups * draw(st.integers(1, max(1, 16 // cout_groups)))
            y = net.conv(net.x, net.c, cout, k, stride, pad, cout_groups, draw(st.booleans()))
            net.h = (net.h + 2 * pad - k) // stride + 1
            net.w = (net.w + 2 * pad - k) // stride + 1
            net.x, net.c = y, cout
        elif kind == "bn":
            c = net.c
            ins = [net.x] + [net.const(p, v) for p, v in (
                ("g", 1 + 0.2 * net.rng.standard_normal(c)), ("b", 0.1 * net.rng.standard_normal(c)),
                ("m", 0.1 * net.rng.standard_normal(c)), ("v", net.rng.uniform(0.5, 1.5, c)))]
            y = net.name("bn")
            net.nodes.append(helper.make_node("BatchNormalization", ins, [y], name=y, epsilon=1e-5))
            net.x = y
        elif kind == "relu":
            y = net.name("relu")
            net.nodes.append(helper.make_node("Relu", [net.x], [y], name=y))
            net.x = y
        elif kind == "affine":
            op = draw(st.sampled_from(["Mul", "Add"]))
            shape = draw(st.sampled_from([(net.c, 1, 1), (1, net.c, 1, 1), (1,)]))
            base = 1.0 if op == "Mul" else 0.0
            k = net.const("k", base + 0.2 * net.rng.standard_normal(shape))
            y = net.name(op.lower())
            net.nodes.append(helper.make_node(op, [net.x, k] if draw(st.booleans()) else [k, net.x], [y], name=y))
            net.x = y
        elif kind == "branches":  # RepVGG / ACNet style: KxK + 1x1 (+ identity), same input, summed
            k = draw(st.sampled_from([3, 5]))
            if min(net.h, net.w) < 1:
                continue
            group = draw(st.sampled_from(_divisors(net.c)))
            a = net.conv(net.x, net.c, net.c, k, 1, k // 2, group, draw(st.booleans()))
            b = net.conv(net.x, net.c, net.c, 1, 1, 0, group, draw(st.booleans()))
            y = net.name("add")
            net.nodes.append(helper.make_node("Add", [a, b], [y], name=y))
            if draw(st.booleans()):
                z = net.name("add")
                net.nodes.append(helper.make_node("Add", [y, net.x], [z], name=z))
                y = z
            net.x = y
        else:  # sibling convs concatenated along channels
            k = draw(st.sampled_from([1, 3]))
            outs = [net.conv(net.x, net.c, draw(st.integers(1, 8)), k, 1, k // 2, 1, draw(st.booleans())) for _ in range(2)]
            widths = [next(t for t in net.inits if t.name == n.input[1]).dims[0] for n in net.nodes[-2:]]
            y = net.name("cat")
            net.nodes.append(helper.make_node("Concat", outs, [y], name=y, axis=1))
            net.x, net.c = y, int(sum(widths))
    out_shape = [1, net.c, net.h, net.w]
    if draw(st.booleans()):  # a classifier head: GAP -> [1x1 conv] -> Flatten -> Gemm [-> Gemm]
        y = net.name("gap")
        net.nodes.append(helper.make_node("GlobalAveragePool", [net.x], [y], name=y))
        net.x = y
        if draw(st.booleans()):
            width = draw(st.integers(1, 16))
            net.x, net.c = net.conv(net.x, net.c, width, 1, 1, 0, 1, draw(st.booleans())), width
        y = net.name("flat")
        net.nodes.append(helper.make_node("Flatten", [net.x], [y], name=y, axis=1))
        net.x = y
        for _ in range(draw(st.integers(1, 2))):
            width = draw(st.integers(1, 16))
            w = net.const("fc", net.rng.standard_normal((width, net.c)) / np.sqrt(net.c))
            ins = [net.x, w] + ([net.const("fcb", 0.1 * net.rng.standard_normal(width))] if draw(st.booleans()) else [])
            y = net.name("gemm")
            net.nodes.append(helper.make_node("Gemm", ins, [y], name=y, transB=1))
            net.x, net.c = y, width
        out_shape = [1, net.c]
    graph = helper.make_graph(
        net.nodes, "random_net",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, net.in_channels, net.in_size, net.in_size])],
        [helper.make_tensor_value_info(net.x, TensorProto.FLOAT, out_shape)],
        net.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", draw(st.sampled_from([13, 17])))])
    model.ir_version = 8
    return model


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(conv_graphs())
def test_exact_passes_preserve_outputs(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    current = model
    for cls in builtin_passes():
        if cls.exact:
            current = apply_pass(current, cls()).model
    onnx.checker.check_model(current, full_check=True)
    assert_same_outputs(model, current)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(conv_graphs())
def test_the_guarded_pipeline_with_rounds_applied_on_one_fork_preserves_outputs(model: onnx.ModelProto) -> None:
    """The same graphs through :func:`optimize` (exact passes, numerics only): rounds are applied to one fork and
    committed once, kept as a group when proven together -- the output stays valid and exact."""
    from rewriter.pipeline import optimize
    from rewriter.validation.judge import ValidationConfig

    result = optimize(model, config=ValidationConfig(latency=False))
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)
    assert all(d.exact for d in result.decisions)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(conv_graphs(), st.sampled_from([0.9, 1.0, 1.2]))
def test_a_run_proven_once_on_its_result_preserves_outputs(model: onnx.ModelProto, ratio: float) -> None:
    """The same graphs through the default :func:`optimize` -- latency measured, so a run of exact passes is proven
    once on its result -- with a clock where every timing says ``ratio`` (0.9: the result is slower, so the run is
    searched again round by round): the output stays valid and exact, and says how its latency was proven."""
    from rewriter.model import Model
    from rewriter.pipeline import optimize
    from rewriter.validation.judge import Judge, ValidationConfig
    from rewriter.validation.latency import LatencyComparison
    from rewriter.validation.stats import RatioCI

    def comparison() -> LatencyComparison:
        return LatencyComparison(1e-3, 1e-3 / ratio, RatioCI(ratio, 0.99 * ratio, 1.01 * ratio, 20), 1)

    class Clock(Judge):
        def model_latency(self, base, candidate, profile=None):  # type: ignore[no-untyped-def]
            return comparison()

        def region_latency(self, accepted, trial, candidate, profile=None):  # type: ignore[no-untyped-def]
            return comparison()

        def same_deployed(self, base, candidate):  # type: ignore[no-untyped-def]
            return False

    source = Model.from_source(model)
    result = optimize(source, judge=Clock(source, None, ValidationConfig()), config=ValidationConfig())
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)
    if result.kept:
        assert result.exact_latency is not None
        assert (result.exact_latency == "result") == (ratio >= 1.0)
