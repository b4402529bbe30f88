"""A small CNN trained in-project, in pure numpy, on scikit-learn's 8x8 handwritten digits.

This is the *trained* model that lossy rewrites (low-rank factorizations) are judged on: seeded random
weights have flat spectra and hide accuracy problems, a trained net does not.

Data (``load_split``): ``sklearn.datasets.load_digits`` (1,797 images, values 0..16), each image upscaled
8x8 -> 32x32 bilinearly (half-pixel centres, edge-clamped, as ONNX ``Resize`` with ``half_pixel``), then
divided by 16 into [0, 1]. A permutation drawn from ``numpy.random.default_rng(SPLIT_SEED)`` splits it:
the first ``N_TEST`` (30%) indices are the held-out test set, the rest train. ``load_test_split`` rebuilds
the held-out arrays the same way, so no data file is committed.

Network, input ``[N, 1, 32, 32]`` -> logits ``[N, 10]`` (every conv 3x3, pad 1, followed by ReLU)::

    conv1   1 ->  32  stride 1  32x32
    conv2  32 ->  64  stride 2  16x16
    conv3  64 ->  64  stride 1  16x16
    conv4  64 -> 128  stride 2   8x8
    conv5 128 -> 128  stride 1   8x8
    GlobalAveragePool -> Flatten -> Gemm(128 -> 10)

Training (``train``): convolutions as im2col + one matrix product (forward and backward), softmax
cross-entropy, Adam with a cosine learning-rate decay, minibatches, random +-2 pixel shifts as
augmentation; every random draw comes from ``numpy.random.default_rng(seed)``.

Determinism: everything is float32 and seeded, and ``train`` runs with the BLAS limited to one thread
(threadpoolctl), because a multi-threaded GEMM may split its sums differently from run to run. With the
same numpy/OpenBLAS build and CPU, two runs of ``python -m models.digits OUT_DIR`` write byte-identical
ONNX files. Another BLAS or CPU kernel may round differently, so the committed
``models/digits/digits_cnn.onnx`` is the reference model (seed 0, 12 epochs, about 80 s of CPU time on
one BLAS thread; top-1 99.4% train, 98.1% held-out).

Run ``python -m models.digits OUT_DIR``: trains, writes ``OUT_DIR/digits_cnn.onnx`` and
``OUT_DIR/digits_test.npz`` (``input`` [n, 1, 32, 32] float32, ``labels`` [n] int64) and logs accuracy.
Needs the ``digits`` extra (scikit-learn, threadpoolctl).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

#: Seed of the train/test permutation.
SPLIT_SEED = 20240607
#: Images in the held-out split (30% of 1,797, rounded).
N_TEST = 539
IMAGE_HW = 32
N_CLASSES = 10
#: (name, in channels, out channels, stride) of the 3x3 convs, in order; each is followed by ReLU.
CONVS: tuple[tuple[str, int, int, int], ...] = (
    ("conv1", 1, 32, 1),
    ("conv2", 32, 64, 2),
    ("conv3", 64, 64, 1),
    ("conv4", 64, 128, 2),
    ("conv5", 128, 128, 1),
)
KERNEL = 3
PAD = 1

Params = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------- data


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` linear-interpolation weights: half-pixel centres, source clamped to the edge."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def upscale(images: np.ndarray, size: int = IMAGE_HW) -> np.ndarray:
    """Bilinear resize of ``[n, h, w]`` images to ``[n, size, size]`` (separable: ``R @ img @ C.T``)."""
    rows = bilinear_matrix(images.shape[1], size)
    cols = bilinear_matrix(images.shape[2], size)
    return np.einsum("ij,njk,lk->nil", rows, images.astype(np.float64), cols)


def split_indices(n: int, seed: int = SPLIT_SEED, n_test: int = N_TEST) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: a seeded permutation, test first; each part sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All images as ``[1797, 1, 32, 32]`` float32 in [0, 1] and labels as int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (upscale(data.images) / 16.0).astype(np.float32)[:, None]
    return x, data.target.astype(np.int64)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``, deterministic from sklearn and ``SPLIT_SEED``."""
    x, y = _digits()
    train_idx, test_idx = split_indices(len(y))
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def load_test_split() -> tuple[np.ndarray, np.ndarray]:
    """The held-out ``(input [539, 1, 32, 32] float32, labels [539] int64)`` the committed model is scored on."""
    _, _, x_test, y_test = load_split()
    return x_test, y_test


# ------------------------------------------------------------------------------------------- layers


def conv_output_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def im2col(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    """``[N, C, H, W]`` -> ``[N * Ho * Wo, C * k * k]``; row ``(n, i, j)`` holds the patch under output ``(i, j)``."""
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, k, stride, pad), conv_output_size(w, k, stride, pad)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride][:, :, :ho, :wo]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * k * k)


def col2im(dcols: np.ndarray, x_shape: tuple[int, ...], k: int, stride: int, pad: int) -> np.ndarray:
    """Adjoint of :func:`im2col`: scatter-add the patch gradients back onto ``[N, C, H, W]``."""
    n, c, h, w = x_shape
    ho, wo = conv_output_size(h, k, stride, pad), conv_output_size(w, k, stride, pad)
    d = dcols.reshape(n, ho, wo, c, k, k).transpose(0, 3, 4, 5, 1, 2)
    dxp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=dcols.dtype)
    for i in range(k):
        for j in range(k):
            dxp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += d[:, :, i, j]
    return dxp[:, :, pad:pad + h, pad:pad + w]


def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1,
                   pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``y = conv(x, w) + b`` (ONNX Conv, group 1, square kernel); also returns the im2col matrix for backward."""
    n, _, h, wd = x.shape
    cout, _, k, _ = w.shape
    ho, wo = conv_output_size(h, k, stride, pad), conv_output_size(wd, k, stride, pad)
    cols = im2col(x, k, stride, pad)
    y = cols @ w.reshape(cout, -1).T + b
    return y.reshape(n, ho, wo, cout).transpose(0, 3, 1, 2), cols


def conv2d_backward(dy: np.ndarray, cols: np.ndarray, x_shape: tuple[int, ...], w: np.ndarray, stride: int = 1,
                    pad: int = 0, *, need_dx: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """``(dx, dw, db)`` from ``dy`` [N, Cout, Ho, Wo] and the forward's im2col matrix; ``dx`` is None if not needed."""
    cout, _, k, _ = w.shape
    dy_mat = dy.transpose(0, 2, 3, 1).reshape(-1, cout)
    dw = (dy_mat.T @ cols).reshape(w.shape)
    db = dy_mat.sum(axis=0)
    dx = col2im(dy_mat @ w.reshape(cout, -1), x_shape, k, stride, pad) if need_dx else None
    return dx, dw, db


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of ``softmax(logits)`` against integer labels, and its gradient wrt the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -float(logp[np.arange(n), labels].mean())
    grad = np.exp(logp)
    grad[np.arange(n), labels] -= 1.0
    return loss, grad / n


# ------------------------------------------------------------------------------------------ network


def init_params(seed: int = 0) -> Params:
    """He-normal weights, zero biases; conv weights ``[Cout, Cin, 3, 3]``, ``fc.W`` ``[10, 128]``."""
    rng = np.random.default_rng(seed)
    params: Params = {}
    for name, cin, cout, _ in CONVS:
        fan_in = cin * KERNEL * KERNEL
        w = rng.standard_normal((cout, cin, KERNEL, KERNEL)) * np.sqrt(2.0 / fan_in)
        params[f"{name}.W"] = w.astype(np.float32)
        params[f"{name}.B"] = np.zeros(cout, np.float32)
    features = CONVS[-1][2]
    params["fc.W"] = (rng.standard_normal((N_CLASSES, features)) * np.sqrt(1.0 / features)).astype(np.float32)
    params["fc.B"] = np.zeros(N_CLASSES, np.float32)
    return params


def forward(params: Params, x: np.ndarray, *, keep: bool = False) -> tuple[np.ndarray, list]:
    """Logits ``[N, 10]``; with ``keep`` also the per-layer caches that :func:`backward` needs."""
    caches: list = []
    h = x
    for name, _, _, stride in CONVS:
        y, cols = conv2d_forward(h, params[f"{name}.W"], params[f"{name}.B"], stride, PAD)
        if keep:
            caches.append((cols, h.shape, y > 0))
        h = np.maximum(y, 0.0)
    feat = h.mean(axis=(2, 3))
    logits = feat @ params["fc.W"].T + params["fc.B"]
    if keep:
        caches.append((feat, h.shape))
    return logits, caches


def backward(params: Params, caches: list, dlogits: np.ndarray) -> Params:
    """Gradients of every parameter, given the loss gradient wrt the logits."""
    feat, (n, c, h, w) = caches[-1]
    grads: Params = {"fc.W": dlogits.T @ feat, "fc.B": dlogits.sum(axis=0)}
    dh = np.broadcast_to((dlogits @ params["fc.W"])[:, :, None, None] / np.float32(h * w), (n, c, h, w))
    for idx in range(len(CONVS) - 1, -1, -1):
        name, _, _, stride = CONVS[idx]
        cols, x_shape, active = caches[idx]
        dy = dh * active
        dx, grads[f"{name}.W"], grads[f"{name}.B"] = conv2d_backward(
            dy, cols, x_shape, params[f"{name}.W"], stride, PAD, need_dx=idx > 0)
        dh = dx
    return grads


def predict(params: Params, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits for ``x``, computed ``batch`` images at a time."""
    return np.concatenate([forward(params, x[i:i + batch])[0] for i in range(0, len(x), batch)])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(axis=1) == labels).mean())


def random_shift(x: np.ndarray, rng: np.random.Generator, max_shift: int = 2) -> np.ndarray:
    """Shift each image by up to ``max_shift`` pixels along each axis, filling with zeros."""
    n, _, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    out = np.empty_like(x)
    for i in range(n):
        out[i] = xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def train(seed: int = 0, epochs: int = 12, batch_size: int = 32, lr: float = 3e-3) -> Params:
    """Train the network on the training split with Adam; return the parameters (float32).

    Single-threaded BLAS for bit-for-bit repeatable runs (see the module docstring).
    """
    from threadpoolctl import threadpool_limits

    x_train, y_train, x_test, y_test = load_split()
    rng = np.random.default_rng(seed)
    params = init_params(seed)
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    steps_per_epoch = -(-len(y_train) // batch_size)
    total, step = epochs * steps_per_epoch, 0
    with threadpool_limits(limits=1):
        for epoch in range(epochs):
            start = time.perf_counter()
            order = rng.permutation(len(y_train))
            losses = []
            for b in range(steps_per_epoch):
                idx = order[b * batch_size:(b + 1) * batch_size]
                xb = random_shift(x_train[idx], rng)
                logits, caches = forward(params, xb, keep=True)
                loss, dlogits = softmax_cross_entropy(logits, y_train[idx])
                losses.append(loss)
                grads = backward(params, caches, dlogits.astype(np.float32))
                step += 1
                rate = lr * 0.5 * (1.0 + np.cos(np.pi * (step - 1) / total))
                corr1, corr2 = 1.0 - beta1**step, 1.0 - beta2**step
                for k, g in grads.items():
                    m[k] = beta1 * m[k] + (1.0 - beta1) * g
                    v[k] = beta2 * v[k] + (1.0 - beta2) * g * g
                    params[k] -= np.float32(rate / corr1) * m[k] / (np.sqrt(v[k] / np.float32(corr2)) + np.float32(eps))
            log.info("epoch %d/%d  loss %.4f  test top-1 %.4f  (%.1f s)", epoch + 1, epochs, float(np.mean(losses)),
                     accuracy(predict(params, x_test), y_test), time.perf_counter() - start)
    return {k: np.ascontiguousarray(p, dtype=np.float32) for k, p in params.items()}


# ------------------------------------------------------------------------------------------- export


def export_onnx(params: Params, opset: int = 17) -> onnx.ModelProto:
    """The network as ONNX: input ``input`` [N, 1, 32, 32], output ``logits`` [N, 10], weights inline."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "input"
    for name, _, _, stride in CONVS:
        inits += [numpy_helper.from_array(params[f"{name}.W"], f"{name}.W"),
                  numpy_helper.from_array(params[f"{name}.B"], f"{name}.B")]
        nodes.append(helper.make_node("Conv", [x, f"{name}.W", f"{name}.B"], [f"{name}.out"], name=name,
                                      kernel_shape=[KERNEL, KERNEL], strides=[stride, stride], pads=[PAD] * 4))
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"], name=f"{name}_relu"))
        x = f"{name}.relu"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap.out"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap.out"], ["flatten.out"], name="flatten", axis=1))
    inits += [numpy_helper.from_array(params["fc.W"], "fc.W"), numpy_helper.from_array(params["fc.B"], "fc.B")]
    nodes.append(helper.make_node("Gemm", ["flatten.out", "fc.W", "fc.B"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, IMAGE_HW, IMAGE_HW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="onnx-bottleneck-models")
    model.ir_version = 8
    model.doc_string = "8x8 sklearn digits upscaled to 32x32 in [0, 1]; trained by models/digits.py"
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="folder for digits_cnn.onnx and digits_test.npz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from rewriter.io import save_model

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    params = train(args.seed)
    log.info("trained in %.1f s", time.perf_counter() - start)
    x_train, y_train, x_test, y_test = load_split()
    log.info("train top-1 %.4f  test top-1 %.4f (%d held-out images)", accuracy(predict(params, x_train), y_train),
             accuracy(predict(params, x_test), y_test), len(y_test))
    path = save_model(export_onnx(params), out / "digits_cnn.onnx")
    np.savez_compressed(out / "digits_test.npz", input=x_test, labels=y_test)
    log.info("wrote %s and %s", path, out / "digits_test.npz")


if __name__ == "__main__":
    main()
