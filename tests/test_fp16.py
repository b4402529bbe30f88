"""float16 models (onnxruntime's ``convert_float_to_float16(model, keep_io_types=True)``): weight math in
float64 stored back as float16, the float16 exact gate (rtol = max(rtol, 8 eps16), atol = max(atol, 8 eps16
rms)), and exact and lossy rewrites of tiny converted models through ``optimize``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from passes.bottleneck import Bottleneck
from passes.common import stored_as
from passes.fold_batchnorm import fold_conv
from passes.fuse_1x1_chain import compose_pointwise
from rewriter.analysis import weights_dtype
from rewriter.model import Model
from rewriter.outcome import Outcome
from rewriter.pipeline import optimize
from rewriter.validation.calibration import Calibration
from rewriter.validation.judge import Judge, ValidationConfig
from rewriter.validation.numerics import EXACT_ATOL, EXACT_RTOL, FP16_EPS, Budget, compare_outputs
from tests.bottleneck_support import conv_model
from tests.helpers import feeds_for, parse, run_reference
from tests.search_fixtures import CorruptingChain

#: The float16 exact gate's relative tolerance: 8 float16 epsilons.
TOL16 = 8 * FP16_EPS
NUMERICS_ONLY = ValidationConfig(latency=False)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as onnxruntime's float16 converter makes it (inputs and outputs stay float32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


#: A 3x3 conv, its BatchNormalization, a ReLU, then two 1x1 convs in a row.
CONV_BN_CHAIN = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 8, 12, 12] X) => (float[1, 8, 12, 12] Y)
    <float[16, 8, 3, 3] W, float[16] B, float[16] gamma, float[16] beta, float[16] mean, float[16] var,
     float[24, 16, 1, 1] P1, float[24] C1, float[8, 24, 1, 1] P2, float[8] C2> {
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W, B)
        n = BatchNormalization <epsilon = 1e-5> (c, gamma, beta, mean, var)
        r = Relu (n)
        p = Conv (r, P1, C1)
        Y = Conv (p, P2, C2)
    }
"""


def float_initializers(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}


# -- pure functions ------------------------------------------------------------------------------------


def test_stored_as_rounds_once_to_the_weights_dtype_and_refuses_an_overflow() -> None:
    values = np.array([1.0 + 2.0**-12, -3.14159, 65504.0, np.inf], dtype=np.float64)
    out = stored_as(values, np.float16)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, values.astype(np.float16))  # round to nearest, infinities kept
    assert stored_as(values[:3], np.float32).dtype == np.float32
    with pytest.raises(ValueError, match="does not fit in float16"):
        stored_as(np.array([1.0, 70000.0]), np.float16)


def test_fold_math_on_float16_weights_is_done_in_float64() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float16)
    b = rng.standard_normal(4).astype(np.float16)
    s, t = rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    w2, b2 = fold_conv(w, b, s, t)
    assert w2.dtype == np.float64 and b2 is not None and b2.dtype == np.float64
    np.testing.assert_array_equal(w2, w.astype(np.float64) * s[:, None, None, None])  # no float16 product
    p1, p2 = rng.standard_normal((6, 4)).astype(np.float16), rng.standard_normal((5, 6)).astype(np.float16)
    fused, _ = compose_pointwise(p1, None, p2, None)
    np.testing.assert_allclose(fused, p2.astype(np.float64) @ p1.astype(np.float64), rtol=1e-12)


def test_weights_dtype_counts_the_elements_of_initializers_and_constants() -> None:
    model = parse(CONV_BN_CHAIN)
    assert weights_dtype(model) == "float32"
    half = to_fp16(model)
    assert weights_dtype(half) == "float16"
    bare = parse('<ir_version: 8, opset_import: ["" : 17]> g (float[2] X) => (float[2] Y) { Y = Relu (X) }')
    assert weights_dtype(bare) is None
    constant = parse('<ir_version: 8, opset_import: ["" : 17]> g (float16[3] X) => (float16[3] Y) '
                     '{ k = Constant <value = float16[3] {1, 2, 3}> () Y = Mul (X, k) }')
    assert weights_dtype(constant) == "float16"


def test_the_float32_gate_is_unchanged() -> None:
    budget = Budget()
    assert budget.for_model(parse(CONV_BN_CHAIN)) is budget  # the very object: nothing changes for float32
    assert budget.exact_tolerances([np.full(4, 100.0)]) == (EXACT_RTOL, EXACT_ATOL)
    assert budget.describe(exact=True) == "allclose(rtol=0.0001, atol=1e-05)"
    one_ulp = [{"y": np.float32([1.0, 0.5])}], [{"y": np.float32([1.0 + 2.0**-10, 0.5])}]
    assert budget.compare(*one_ulp)["y"].allclose_ratio > 1  # one float16 step fails the float32 gate


def test_float16_gate_tolerances() -> None:
    budget = Budget().for_model(to_fp16(parse(CONV_BN_CHAIN)))
    assert budget.weights == "float16" and budget.for_model(to_fp16(parse(CONV_BN_CHAIN))) == budget
    ref = [np.array([3.0, -4.0]), np.array([0.0, np.nan])]  # rms over the finite values: 5 / sqrt(3)
    rtol, atol = budget.exact_tolerances(ref)
    assert rtol == TOL16 == 2.0**-7
    assert atol == pytest.approx(TOL16 * 5 / np.sqrt(3))
    assert Budget(rtol=0.05, atol=1.0, weights="float16").exact_tolerances(ref) == (0.05, 1.0)  # looser user tolerances win
    assert budget.describe(exact=True) == "allclose(rtol=0.0078125, atol=max(1e-05, 0.0078125*rms(output))) (float16 weights: 8 x eps16)"
    assert budget.describe(exact=False) == Budget().describe(exact=False)


def test_float16_gate_passes_a_few_float16_steps_and_fails_a_real_error() -> None:
    budget = Budget(weights="float16")
    rng = np.random.default_rng(0)
    r = rng.standard_normal(1000).astype(np.float16).astype(np.float32)
    steps = (r.astype(np.float16) + np.float16(4) * np.spacing(r.astype(np.float16))).astype(np.float32)  # 4 ulps
    near_zero = r.copy()
    near_zero[np.argmin(np.abs(r))] += 4 * FP16_EPS  # 4 eps of the output's scale on its smallest element
    assert budget.compare([{"y": r}], [{"y": steps}])["y"].allclose_ratio <= 1
    assert budget.compare([{"y": r}], [{"y": near_zero}])["y"].allclose_ratio <= 1
    assert budget.failures(budget.compare([{"y": r}], [{"y": r * 1.02}]), exact=True)  # 2%: a wrong rewrite
    assert compare_outputs([{"y": r}], [{"y": steps}])["y"].allclose_ratio > 1  # the float32 gate refuses it


# -- through optimize -----------------------------------------------------------------------------------


def test_exact_rewrites_of_a_float16_model_are_kept_under_the_float16_gate() -> None:
    half = to_fp16(parse(CONV_BN_CHAIN))
    result = optimize(half, ["fold_batchnorm", "fuse_1x1_chain"], config=NUMERICS_ONLY)
    assert [d.candidate.pass_name for d in result.kept] == ["fold_batchnorm", "fuse_1x1_chain"]
    assert result.budget.startswith("allclose(rtol=0.0078125") and "float16" in result.budget
    ops = [n.op_type for n in result.model.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 2
    new = float_initializers(result.model)
    assert new and set(new.values()) == {onnx.TensorProto.FLOAT16}  # written back as float16
    assert [o.type.tensor_type.elem_type for o in result.model.graph.output] == [onnx.TensorProto.FLOAT]
    onnx.checker.check_model(result.model, full_check=True)
    # The rewrites moved the outputs by float16 rounding: within the float16 gate, beyond the float32 one.
    feeds = feeds_for(half)
    ref = [{"Y": r[0]} for r in run_reference(half, feeds)]
    got = [{"Y": g[0]} for g in run_reference(result.model, feeds)]
    assert 0 < Budget(weights="float16").compare(ref, got)["Y"].allclose_ratio <= 1 < compare_outputs(ref, got)["Y"].allclose_ratio


def as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer made by a ``Constant`` node instead (as Paddle exports weights)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in out.graph.initializer]
    del out.graph.initializer[:]
    rest = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes + rest)
    return out


def test_float16_constant_node_weights_are_rewritten_as_float16() -> None:
    half = as_constant_nodes(to_fp16(parse(CONV_BN_CHAIN)))
    assert weights_dtype(half) == "float16" and not half.graph.initializer
    result = optimize(half, ["fold_batchnorm", "fuse_1x1_chain"], config=NUMERICS_ONLY)
    assert [d.candidate.pass_name for d in result.kept] == ["fold_batchnorm", "fuse_1x1_chain"]
    new = float_initializers(result.model)
    assert new and set(new.values()) == {onnx.TensorProto.FLOAT16}


def test_a_wrong_rewrite_of_a_float16_model_is_still_rolled_back() -> None:
    half = to_fp16(parse(CONV_BN_CHAIN))
    result = optimize(half, [CorruptingChain()], config=NUMERICS_ONLY)
    assert result.decisions and not result.kept
    assert all(d.outcome is Outcome.NUMERICS and "float16 weights" in d.reason for d in result.decisions)


def test_the_judge_of_a_float16_model_uses_the_float16_gate() -> None:
    half = Model.from_source(to_fp16(parse(CONV_BN_CHAIN)))
    config = ValidationConfig(latency=False)
    judge = Judge(half, config=config)
    assert judge.config.budget.weights == "float16" and config.budget.weights == "float32"
    plain = Model.from_source(parse(CONV_BN_CHAIN))
    assert Judge(plain, config=config).config is config  # float32: the config as given


def test_bottleneck_fits_a_float16_model_in_float64_and_writes_float16_weights() -> None:
    rng = np.random.default_rng(0)
    feeds = [{"X": rng.standard_normal((1, 32, 12, 10)).astype(np.float32)} for _ in range(3)]
    layers = {}
    for label, proto in (("float32", conv_model()), ("float16", to_fp16(conv_model()))):
        model = Model.from_source(proto)
        bneck = Bottleneck(modes=("output",))
        bneck.use_calibration(Calibration(model, feeds))
        site = bneck._site(model, next(n for n in model.graph.nodes if n.op == "Conv"))
        assert site is not None and not isinstance(site, str)
        layers[label] = bneck.fitter.layers(model, site, "output", 16)
        assert all(np.asarray(w).dtype == np.float64 for w, _, _ in layers[label])  # fitted in float64, not float16
        trial = model.fork()
        bneck._rewrite(trial, site, layers[label])
        written = float_initializers(trial.commit().proto)
        assert set(written.values()) == {onnx.TensorProto.FLOAT16 if label == "float16" else onnx.TensorProto.FLOAT}
    for (w32, _, _), (w16, _, _) in zip(layers["float32"], layers["float16"]):
        # The float16 model's activations differ by float16 rounding: the fits agree to about that.
        assert np.linalg.norm(w16 - w32) <= 0.05 * np.linalg.norm(w32)
