"""The trained digits CNN: the committed model checks, runs and is accurate; the numpy training math is right.

The default tests never retrain: they score the committed ``models/digits/digits_cnn.onnx`` on the held-out
split rebuilt from scikit-learn. Retraining is the ``slow`` test.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.digits import (
    CONVS,
    N_TEST,
    accuracy,
    backward,
    bilinear_matrix,
    conv2d_backward,
    conv2d_forward,
    export_onnx,
    forward,
    init_params,
    softmax_cross_entropy,
    split_indices,
    upscale,
)
from rewriter.analysis import analyze
from rewriter.model import Model
from tests.helpers import ops, run_reference

MODEL_PATH = Path(__file__).resolve().parents[1] / "models" / "digits" / "digits_cnn.onnx"
N_DIGITS = 1797


@pytest.fixture(scope="module")
def committed() -> onnx.ModelProto:
    return onnx.load(MODEL_PATH)


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    pytest.importorskip("sklearn")
    from models.digits import load_test_split

    return load_test_split()


def ort_logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run_reference(model, [{"input": x}])[0][0]


def params_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ------------------------------------------------------------------------------- the committed model


def test_committed_model_checks_and_runs(committed: onnx.ModelProto) -> None:
    onnx.checker.check_model(committed, full_check=True)
    assert ops(committed) == {"Conv": 5, "Relu": 5, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    assert all(not t.HasField("data_location") or t.data_location == onnx.TensorProto.DEFAULT
               for t in committed.graph.initializer)  # weights inline
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    out = ort_logits(committed, x)
    assert out.shape == (3, 10) and np.all(np.isfinite(out))


def test_committed_model_is_accurate_on_the_held_out_split(committed: onnx.ModelProto,
                                                            test_split: tuple[np.ndarray, np.ndarray]) -> None:
    x, labels = test_split
    assert x.shape == (N_TEST, 1, 32, 32) and x.dtype == np.float32 and labels.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    logits = ort_logits(committed, x)
    assert accuracy(logits, labels) >= 0.97
    # The numpy forward of the same weights agrees with onnxruntime.
    ours = forward(params_of(committed), x)[0]
    assert np.abs(ours - logits).max() < 1e-4
    assert accuracy(ours, labels) == accuracy(logits, labels)


def test_macs_match_a_hand_count(committed: onnx.ModelProto) -> None:
    costs = {c.name: c.macs for c in analyze(Model.from_source(MODEL_PATH)).nodes}
    # Per image, Conv MACs = H_out * W_out * C_out * C_in * 9:
    #   conv1 32*32* 32*  1*9 =   294,912
    #   conv2 16*16* 64* 32*9 = 4,718,592
    #   conv3 16*16* 64* 64*9 = 9,437,184
    #   conv4  8* 8*128* 64*9 = 4,718,592
    #   conv5  8* 8*128*128*9 = 9,437,184
    #   fc    128*10          =     1,280
    #   total                  28,607,744
    assert costs["conv3"] == 16 * 16 * 64 * 64 * 9 == 9_437_184
    assert costs["fc"] == 1_280
    assert sum(costs.values()) == 28_607_744


def test_split_is_pinned() -> None:
    train, test = split_indices(N_DIGITS)
    assert len(test) == N_TEST and len(train) == N_DIGITS - N_TEST
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(N_DIGITS))
    # The committed model was scored on exactly these images; a change of numpy's permutation would show here.
    assert test[:8].tolist() == [3, 7, 9, 10, 11, 15, 17, 20]
    digest = hashlib.sha256(test.astype("<i8").tobytes()).hexdigest()
    assert digest == "e4e7766d212bbb047e222a15b284d7fb1cfcc15b9508378e7a13ba802e8a94ba"


# ------------------------------------------------------------------------------------- numpy layers


def naive_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    n, _, h, wd = x.shape
    cout, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    y = np.zeros((n, cout, ho, wo))
    for i_n in range(n):
        for o in range(cout):
            for i in range(ho):
                for j in range(wo):
                    patch = xp[i_n, :, i * stride:i * stride + k, j * stride:j * stride + k]
                    y[i_n, o, i, j] = (patch * w[o]).sum() + b[o]
    return y


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("k", [1, 3])
def test_im2col_conv_matches_naive_loops(stride: int, pad: int, k: int) -> None:
    rng = np.random.default_rng(stride * 10 + pad + k)
    x, w, b = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, k, k)), rng.standard_normal(4)
    y, _ = conv2d_forward(x, w, b, stride, pad)
    np.testing.assert_allclose(y, naive_conv(x, w, b, stride, pad), rtol=1e-12, atol=1e-12)


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Central differences of the scalar function ``f`` at every element of ``x`` (``x`` is restored)."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        plus = f()
        x[idx] = old - eps
        minus = f()
        x[idx] = old
        g[idx] = (plus - minus) / (2 * eps)
    return g


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_backward_matches_finite_differences(stride: int) -> None:
    rng = np.random.default_rng(stride)
    x, w, b = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
    y, cols = conv2d_forward(x, w, b, stride, 1)
    r = rng.standard_normal(y.shape)  # loss = sum(r * conv(x)), so dL/dy = r

    def loss() -> float:
        return float((r * conv2d_forward(x, w, b, stride, 1)[0]).sum())

    dx, dw, db = conv2d_backward(r, cols, x.shape, w, stride, 1)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-6, atol=1e-7)


def test_network_backward_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    params = {k: v.astype(np.float64) for k, v in init_params(0).items()}
    for name, *_ in CONVS:
        params[f"{name}.B"] = 0.1 * rng.standard_normal(params[f"{name}.B"].shape)
    x, labels = rng.random((2, 1, 32, 32)), np.array([3, 7])
    logits, caches = forward(params, x, keep=True)
    grads = backward(params, caches, softmax_cross_entropy(logits, labels)[1])
    for key in ("conv1.W", "conv2.B", "conv5.W", "fc.W", "fc.B"):
        idx = tuple(int(rng.integers(0, s)) for s in params[key].shape)
        value, eps = params[key][idx], 1e-6
        params[key][idx] = value + eps
        plus = softmax_cross_entropy(forward(params, x)[0], labels)[0]
        params[key][idx] = value - eps
        minus = softmax_cross_entropy(forward(params, x)[0], labels)[0]
        params[key][idx] = value
        assert grads[key][idx] == pytest.approx((plus - minus) / (2 * eps), rel=1e-5, abs=1e-9)


def test_bilinear_matrix_rows_sum_to_one_and_keep_constants() -> None:
    m = bilinear_matrix(8, 32)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    assert m.shape == (32, 8) and m.min() >= 0.0
    np.testing.assert_allclose(upscale(np.full((1, 8, 8), 5.0)), 5.0)
    ramp = upscale(np.tile(np.arange(8.0), (1, 8, 1)))[0, 0]  # a ramp stays a (clamped) ramp
    np.testing.assert_allclose(ramp[2:-2], (np.arange(32.0) + 0.5)[2:-2] / 4 - 0.5)


def test_export_matches_numpy_forward() -> None:
    params = init_params(1)
    model = export_onnx(params)
    assert model.graph.input[0].name == "input" and model.graph.output[0].name == "logits"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert model.opset_import[0].version == 17
    x = np.random.default_rng(2).random((4, 1, 32, 32), dtype=np.float32)
    assert np.abs(ort_logits(model, x) - forward(params, x)[0]).max() < 1e-4
    assert export_onnx(params).SerializeToString() == model.SerializeToString()


# --------------------------------------------------------------------------------------- retraining


@pytest.mark.slow
def test_training_reaches_97_percent() -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("threadpoolctl")
    from models.digits import load_split, predict, train

    params = train(seed=0)
    _, _, x_test, y_test = load_split()
    assert accuracy(predict(params, x_test), y_test) >= 0.97
    model = export_onnx(params)
    assert accuracy(ort_logits(model, x_test), y_test) >= 0.97
