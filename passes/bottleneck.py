"""bottleneck: replace a dense KxK convolution by cheaper convolutions through a narrow channel dimension.

A conv ``y = W * x + b`` with ``W`` of shape ``[O, C, kh, kw]`` (group 1) is rewritten, at rank ``r``, as

* **output side** -- KxK ``C -> r`` then 1x1 ``r -> O``. With ``U`` ``[O, r]`` the top-``r`` principal
  directions of the conv's outputs and ``mu`` their mean, ``y ~ U U^T (y - mu) + mu``, so
  ``W1 = U^T W``, ``b1 = U^T (b - mu)``, ``W2 = U``, ``b2 = mu``. With stride > 1 the 1x1 runs at the
  reduced resolution.
* **input side** -- 1x1 ``C -> r`` then KxK ``r -> O``. With ``V`` ``[C, r]`` the top-``r`` eigenvectors of
  the inputs' *uncentred* second moment ``E[x x^T]``, ``x ~ V V^T x``, so ``W1 = V^T`` (no bias) and
  ``W2[o, j] = sum_c W[o, c] V[c, j]``, ``b2 = b``. Uncentred, so the KxK conv's zero padding still sees
  zeros: borders stay exact at full rank.
* **Tucker-2** -- 1x1 ``C -> r1``, KxK ``r1 -> r2``, 1x1 ``r2 -> O``: both of the above, the core
  ``U^T (W x_c V)``.
* **spatial** -- ``kh x 1`` ``C -> r`` then ``1 x kw`` ``r -> O`` (Inception-v3's separation):
  ``W[o,c,h,w] ~ sum_r A[r,c,h] B[o,r,w]`` from the SVD of ``W`` unfolded as ``[(c,h), (o,w)]``; rows'
  stride/pads/dilation go to the first conv, columns' to the second.

Data-aware (the default when real calibration data is given): ``U`` comes from PCA of the conv's outputs
in the *original* model -- in the norm the consumer conv sees, ``|Wn e|``, when one reads it -- and ``V``
from the inputs the *already rewritten* model feeds it; then the factor that touches the data is
re-fitted in closed form by ridge least squares (pulled towards the projected weights) so that, given the
rewritten model's inputs, the new layers reproduce the original model's activations (layer by layer, so
errors do not compound). Without calibration data the bases come from the weights alone (SVD of ``W`` unfolded
along the output or input channels) -- a fallback that loses far more accuracy on trained networks.

Ranks come from a grid of fractions of the full rank, rounded up to a hardware-friendly multiple (16 by
default): odd channel counts can make onnxruntime's CPU kernels slower than the original conv. Strides,
pads, dilations and bias are carried over exactly; at full rank every factorization is exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.analysis import node_cost
from rewriter.contract import Candidate, Cost, Pass, RewriteError, Skip
from rewriter.graph import NameFactory, constant, const_value, is_graph_input, replace_nodes
from rewriter.model import Model

log = logging.getLogger(__name__)

MODES = ("output", "input", "tucker", "spatial")
#: Suffix of the nodes this pass creates; they are never factorized again.
MARK = "_bneck"


# -- weight math (pure numpy) -----------------------------------------------------------------------


def round_rank(value: float, multiple: int, full: int) -> int:
    """``value`` rounded up to a multiple of ``multiple`` (at least ``multiple``), capped at ``full``."""
    multiple = max(1, multiple)
    return min(full, max(multiple, int(math.ceil(value / multiple)) * multiple))


def rank_grid(full: int, fractions: tuple[float, ...], multiple: int) -> list[int]:
    """Distinct ranks below ``full`` from fractions of it, rounded to ``multiple``."""
    return sorted({r for f in fractions if (r := round_rank(f * full, multiple, full)) < full})


def gram(x: np.ndarray) -> np.ndarray:
    """``x^T x`` with both operands contiguous (some BLAS builds are several times slower on a transposed view)."""
    return np.ascontiguousarray(x.T) @ x


def top_eigvecs(moment: np.ndarray, rank: int) -> np.ndarray:
    """The ``rank`` leading eigenvectors (columns) of a symmetric matrix, largest eigenvalue first."""
    values, vectors = np.linalg.eigh(moment)
    order = np.argsort(values)[::-1][:rank]
    return vectors[:, order]


def output_basis(y: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(U [O, r], mu [O])``: principal directions and mean of output samples ``y`` ``[n, O]``."""
    mu = y.mean(axis=0)
    centred = y - mu
    return top_eigvecs(gram(centred) / max(1, len(y)), rank), mu


def input_basis(x: np.ndarray, rank: int) -> np.ndarray:
    """``V [C, r]``: leading eigenvectors of the uncentred second moment of input samples ``x`` ``[n, C]``."""
    return top_eigvecs(gram(x) / max(1, len(x)), rank)


def weight_output_basis(w: np.ndarray, rank: int) -> np.ndarray:
    """Weight-only ``U``: left singular vectors of ``W`` unfolded as ``[O, C*kh*kw]``."""
    u, _, _ = np.linalg.svd(w.reshape(w.shape[0], -1).astype(np.float64), full_matrices=False)
    return u[:, :rank]


def weight_input_basis(w: np.ndarray, rank: int) -> np.ndarray:
    """Weight-only ``V``: left singular vectors of ``W`` unfolded along the input channels ``[C, O*kh*kw]``."""
    unfolded = np.moveaxis(w.astype(np.float64), 1, 0).reshape(w.shape[1], -1)
    u, _, _ = np.linalg.svd(unfolded, full_matrices=False)
    return u[:, :rank]


def factor_output(
    w: np.ndarray, b: np.ndarray | None, u: np.ndarray, mu: np.ndarray | None, coords: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Output side: ``W1 = P^T W`` ``[r, C, kh, kw]``, ``b1 = P^T (b - mu)``, ``W2 = U`` ``[O, r]``, ``b2 = mu``.

    ``P`` (``coords``, default ``U``) reads the coordinates of ``y - mu`` in the basis ``U`` (``P^T U = I``);
    an orthonormal ``U`` is its own ``P``.
    """
    o = w.shape[0]
    p = u if coords is None else coords
    bias = np.zeros(o) if b is None else b.astype(np.float64)
    mean = np.zeros(o) if mu is None else mu.astype(np.float64)
    w1 = (p.T @ w.reshape(o, -1).astype(np.float64)).reshape((p.shape[1],) + w.shape[1:])
    return w1, p.T @ (bias - mean), u.astype(np.float64), mean


def metric_basis(cov: np.ndarray, metric: np.ndarray, rank: int, floor: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """``(U, P)``: the rank-``r`` reconstruction ``y ~ mu + U P^T (y - mu)`` best in the norm ``|M e|``,
    ``M = K^(1/2)`` with ``K`` = ``metric`` (e.g. ``Wn^T Wn`` of the consumer conv: errors it cannot see
    are free), ``K`` floored at ``floor * tr(K)/O`` so that no direction is ignored entirely.

    With ``E`` the top eigenvectors of ``M C M``: ``U = M^-1 E``, ``P = M E`` (so ``P^T U = I``).
    """
    root, inv_root = metric_root(metric, floor)
    e = top_eigvecs(root @ cov @ root, rank)
    return inv_root @ e, root @ e


def metric_root(metric: np.ndarray, floor: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """``(K^(1/2), K^(-1/2))`` of a symmetric PSD ``K`` with eigenvalues floored at ``floor * tr(K)/n``."""
    values, vectors = np.linalg.eigh(metric)
    values = np.maximum(values, floor * max(values.sum(), 1e-30) / len(values))
    return (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T


def factor_input(w: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Input side: ``W1 = V^T`` ``[r, C]`` and ``W2 = W x_c V`` ``[O, r, kh, kw]``."""
    w2 = np.einsum("ochw,cr->orhw", w.astype(np.float64), v)
    return v.T.astype(np.float64), w2


def factor_tucker(
    w: np.ndarray, b: np.ndarray | None, v: np.ndarray, u: np.ndarray, mu: np.ndarray | None, coords: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2: ``W1 = V^T``, core ``P^T (W x_c V)`` with bias ``P^T (b - mu)``, ``W3 = U``, ``b3 = mu``."""
    w_first, w_in = factor_input(w, v)
    core, b_core, w_last, b_last = factor_output(w_in, b, u, mu, coords)
    return w_first, core, b_core, w_last, b_last


class RidgeSolver:
    """Closed-form ridge regression ``z ~ p A^T + c`` for one input matrix and any number of targets.

    ``p`` ``[n, d]`` is centred once and ``(P^T P + lam I)^-1`` formed once, so re-fitting to new targets
    costs two matrix products. The ridge is relative, ``lam = ridge * tr(P^T P) / d``, and pulls ``A``
    towards a *prior* ``A0`` when one is given (``|P A^T - Z|^2 + lam |A - A0|^2``): with few samples per
    feature the fit then stays near the projected weights instead of shrinking to zero. The intercept
    ``c`` is never penalized.
    """

    def __init__(self, p: np.ndarray, ridge: float = 1e-4) -> None:
        p32 = np.asarray(p, np.float32)
        self.samples, self.features = p32.shape
        self.p_mean = p32.mean(axis=0, dtype=np.float64)
        self.pc = p32 - self.p_mean.astype(np.float32)
        self.pc_t = np.ascontiguousarray(self.pc.T)
        g = (self.pc_t @ self.pc).astype(np.float64)
        self.lam = ridge * max(np.trace(g) / max(1, g.shape[0]), 1e-12)
        g[np.diag_indices_from(g)] += self.lam
        self.inverse = np.linalg.inv(g)

    def fit(self, z: np.ndarray, prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        z = np.asarray(z, np.float64)
        z_mean = z.mean(axis=0)
        rhs = (self.pc_t @ (z - z_mean).astype(np.float32)).astype(np.float64)
        if prior is not None:
            rhs += self.lam * prior.T
        a = (self.inverse @ rhs).T
        return a, z_mean - a @ self.p_mean

    def predict(self, a: np.ndarray, c: np.ndarray) -> np.ndarray:
        """``p A^T + c`` on the fitted samples."""
        return (self.pc @ a.T.astype(np.float32)).astype(np.float64) + (a @ self.p_mean + c)


@dataclass(frozen=True)
class _Fold:
    train: np.ndarray  # row masks
    test: np.ndarray
    pc: np.ndarray  # centred training rows
    ptest: np.ndarray  # held-out rows, centred by the training mean
    left: np.ndarray  # [n_train, k]: coefficients of a residual R are left^T R
    right: np.ndarray  # [n_test, k]: held-out predictions are right diag(1 / (e + lam)) left^T R
    e: np.ndarray  # [k] eigenvalues of the training Gram (squared singular values)
    scale: float  # sum(e) / d: what a relative ridge is relative to


class HeldOut:
    """Held-out error of ridge fits ``z ~ p A^T + c`` (pulled to a prior ``A0``), whole calibration feeds
    held out at a time, for choosing the ridge.

    ``groups`` gives each row's feed; fold ``f`` holds out the feeds with ``feed % folds == f`` (rows of one
    picture are correlated, so holding out single rows would reward over-fitting). Per fold, with the
    training rows ``P`` centred and ``R = Z - P A0^T`` the residual of the prior, the ridge solution is
    ``A^T = A0^T + (P^T P + lam I)^-1 P^T R``, ``lam = ridge * tr(P^T P) / d`` (relative, as in
    :class:`RidgeSolver`). One eigendecomposition per fold -- of ``P^T P = V E V^T``, or of ``P P^T = U E U^T``
    when there are fewer rows than features -- serves every target and every ridge:
    ``(P^T P + lam I)^-1 P^T = V (E + lam)^-1 (P V)^T = P^T U (E + lam)^-1 U^T``.
    """

    def __init__(self, p: np.ndarray, groups: np.ndarray, folds: int = 2) -> None:
        self.folds: list[_Fold] = []
        k = min(folds, len(np.unique(groups)))
        for f in range(k if k >= 2 else 0):
            test = (groups % k) == f
            if not test.any() or test.all():
                continue
            pt = np.asarray(p[~test], np.float32)
            mean = pt.mean(axis=0, dtype=np.float64).astype(np.float32)
            pc = pt - mean
            ptest = np.asarray(p[test], np.float32) - mean
            n, d = pc.shape
            # float32 throughout: the error only has to rank the ridges of the grid.
            if n >= d:
                e, v = np.linalg.eigh(gram(pc))
                left, right = pc @ v, ptest @ v
            else:
                e, left = np.linalg.eigh(pc @ np.ascontiguousarray(pc.T))
                right = (ptest @ np.ascontiguousarray(pc.T)) @ left
            e = np.maximum(e.astype(np.float64), 0.0)
            self.folds.append(_Fold(~test, test, pc, ptest, left, right, e, max(float(e.sum()) / d, 1e-30)))

    @property
    def usable(self) -> bool:
        return bool(self.folds)

    def errors(self, z: np.ndarray, grid: tuple[float, ...], prior: np.ndarray | None = None) -> dict[float, float]:
        """``{ridge: held-out squared error / held-out variance of z}`` (empty when nothing can be held out)."""
        z = np.asarray(z, np.float64)
        err = np.zeros(len(grid))
        total = 0.0
        for fold in self.folds:
            pc, ptest = fold.pc, fold.ptest
            zt = z[fold.train]
            z_mean = zt.mean(axis=0)
            resid = zt - z_mean
            base = np.broadcast_to(z_mean, (len(ptest), z.shape[1])).copy()
            if prior is not None:
                a0t = np.asarray(prior, np.float32).T
                resid = resid - (pc @ a0t).astype(np.float64)
                base += (ptest @ a0t).astype(np.float64)
            coef = np.ascontiguousarray(fold.left.T) @ resid.astype(np.float32)
            target = z[fold.test]
            total += float(((target - target.mean(axis=0)) ** 2).sum())
            miss = (target - base).astype(np.float32)
            for i, rel in enumerate(grid):
                shrink = (1.0 / (fold.e + rel * fold.scale)).astype(np.float32)
                err[i] += float(np.square(fold.right @ (coef * shrink[:, None]) - miss, dtype=np.float32).sum(dtype=np.float64))
        if total <= 0:
            return {}
        return {rel: float(e / total) for rel, e in zip(grid, err)}

    def best(self, z: np.ndarray, grid: tuple[float, ...], prior: np.ndarray | None = None, default: float = 1e-4) -> tuple[float, float | None]:
        """``(ridge, its relative held-out error)`` with the least held-out error (the larger ridge on a
        tie); ``(default, None)`` when nothing can be held out."""
        scores = self.errors(z, grid, prior) if grid else {}
        if not scores:
            return default, None
        rel = min(scores, key=lambda r: (scores[r], -r))
        return rel, scores[rel]


def ridge_fit(p: np.ndarray, z: np.ndarray, ridge: float = 1e-4, prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(A, c)`` minimising ``|p A^T + c - z|^2 + lam |A - A0|^2``, ``lam = ridge * tr(P^T P)/d`` (closed form).

    ``p`` ``[n, d]`` inputs, ``z`` ``[n, r]`` targets, ``prior`` ``A0`` (default 0); ``A`` is ``[r, d]``, ``c`` ``[r]``.
    """
    return RidgeSolver(p, ridge).fit(z, prior)


def ridge_fit_through_relu(
    p: np.ndarray | RidgeSolver,
    y: np.ndarray,
    basis: np.ndarray | None,
    mu: np.ndarray | None,
    ridge: float = 1e-4,
    iterations: int = 2,
    prior: np.ndarray | None = None,
    coords: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``relu(U (p A^T + c) + mu) ~ relu(y)`` (``U``/``mu`` absent: ``relu(p A^T + c) ~ relu(y)``).

    Where the original output ``y`` and the current prediction are both negative, the ReLU maps both to
    zero, so the target there is released to the prediction itself; the fit is repeated a few times
    (iteratively re-targeted least squares). Without a following ReLU, use :func:`ridge_fit` alone.
    ``p`` may be a ready :class:`RidgeSolver` (shared between ranks of one conv); ``coords`` reads
    coordinates in a non-orthonormal ``U`` (see :func:`factor_output`).
    """
    u = basis
    read = basis if coords is None else coords
    m = np.zeros(y.shape[1]) if mu is None else mu
    solver = p if isinstance(p, RidgeSolver) else RidgeSolver(p, ridge)

    def to_fit(t: np.ndarray) -> np.ndarray:
        return t - m if read is None else (t - m) @ read

    a, c = solver.fit(to_fit(y), prior)
    for _ in range(iterations):
        z = solver.predict(a, c)
        pred = (z if u is None else z @ u.T) + m
        target = np.where((y <= 0) & (pred <= 0), pred, y)
        a, c = solver.fit(to_fit(target), prior)
    if u is None and mu is not None:
        c = c + m
    return a, c


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]


POINTWISE = ConvGeometry((1, 1), (1, 1), (0, 0, 0, 0), (1, 1))
#: One new conv: weight ``[o, i, kh, kw]``, bias or None, geometry.
Layer = tuple[np.ndarray, "np.ndarray | None", ConvGeometry]


def split_geometry(geo: ConvGeometry) -> tuple[ConvGeometry, ConvGeometry]:
    """The ``kh x 1`` and ``1 x kw`` halves of a conv: rows (stride, pads, dilation) first, then columns."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = geo.kernel, geo.strides, geo.pads, geo.dilations
    return (ConvGeometry((kh, 1), (sh, 1), (pt, 0, pb, 0), (dh, 1)),
            ConvGeometry((1, kw), (1, sw), (0, pl, 0, pr), (1, dw)))


def factor_spatial(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Spatial separation (Inception-v3's ``kxk -> kx1, 1xk``): ``W[o,c,h,w] ~ sum_r A[r,c,h] B[o,r,w]``.

    The truncated SVD of ``W`` unfolded as ``[(c, h), (o, w)]``, split evenly (``sqrt(S)`` to each side):
    ``A`` ``[r, C, kh, 1]``, ``B`` ``[O, r, 1, kw]``; exact at ``rank = min(C*kh, O*kw)``.
    """
    o, c, kh, kw = w.shape
    unfolded = w.astype(np.float64).transpose(1, 2, 0, 3).reshape(c * kh, o * kw)
    u, sv, vt = np.linalg.svd(unfolded, full_matrices=False)
    root = np.sqrt(sv[:rank])
    a = (u[:, :rank] * root).T.reshape(rank, c, kh, 1)
    b = (root[:, None] * vt[:rank]).reshape(rank, o, kw).transpose(1, 0, 2)[:, :, None, :]
    return a, b


def tap_products(x: np.ndarray, kernel: tuple[int, int], dilations: tuple[int, int]) -> np.ndarray:
    """``[2kh-1, 2kw-1]`` sums over channels and positions of ``x(p) x(p + d)`` for every tap offset ``d``
    a ``kernel`` with ``dilations`` spans, and the count of products each sum has, stacked: ``[2, ...]``."""
    (kh, kw), (dh, dw) = kernel, dilations
    _, _, h, w = x.shape
    out = np.zeros((2, 2 * kh - 1, 2 * kw - 1))
    for i, di in enumerate(range(-(kh - 1), kh)):
        for j, dj in enumerate(range(-(kw - 1), kw)):
            a, b = di * dh, dj * dw
            if abs(a) >= h or abs(b) >= w:
                continue
            left = x[:, :, max(0, -a):h - max(0, a), max(0, -b):w - max(0, b)]
            right = x[:, :, max(0, a):h - max(0, -a), max(0, b):w - max(0, -b)]
            out[0, i, j] = float(np.vdot(left, right))
            out[1, i, j] = left.size
    return out


def tap_correlation(products: np.ndarray, kernel: tuple[int, int]) -> np.ndarray:
    """``R [kh*kw, kh*kw]``: correlation between the taps of a patch, ``rho(t2 - t1)``, from :func:`tap_products`."""
    kh, kw = kernel
    mean = products[0] / np.maximum(products[1], 1)
    rho = mean / max(mean[kh - 1, kw - 1], 1e-30)
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    return np.array([[rho[i2 - i1 + kh - 1, j2 - j1 + kw - 1] for (i2, j2) in taps] for (i1, j1) in taps])


def spatial_errors(w: np.ndarray, second: np.ndarray | None, ranks: list[int], taps: np.ndarray | None = None) -> dict[int, float]:
    """Relative output error ``sqrt(E|dW p|^2 / E|W p|^2)`` of the spatial separation at each rank, for input
    patches with ``E[x_c(t1) x_d(t2)] = second[c, d] * taps[t1, t2]`` (identities if None: uncorrelated)."""
    o, c, kh, kw = w.shape
    w64 = w.astype(np.float64)
    m = np.eye(c) if second is None else second
    r_taps = np.eye(kh * kw) if taps is None else taps
    u, sv, vt = np.linalg.svd(w64.transpose(1, 2, 0, 3).reshape(c * kh, o * kw), full_matrices=False)

    def energy(d: np.ndarray) -> float:
        flat = d.reshape(o, c, kh * kw)
        return float(np.einsum("oca,cd,odb,ab->", flat, m, flat, r_taps, optimize=True))

    total = max(energy(w64), 1e-30)
    out = {}
    for r in ranks:
        approx = ((u[:, :r] * sv[:r]) @ vt[:r]).reshape(c, kh, o, kw).transpose(2, 0, 1, 3)
        out[r] = float(np.sqrt(max(energy(w64 - approx), 0.0) / total))
    return out


def sample_positions(n: int, h: int, w: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` distinct random output positions (batch, row, col), or all of them when fewer exist."""
    total = n * h * w
    flat = np.arange(total) if total <= count else rng.choice(total, size=count, replace=False)
    return flat // (h * w), (flat // w) % h, flat % w


def extract_patches(x: np.ndarray, geo: ConvGeometry, pos: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """im2col at given output positions: ``[m, C*kh*kw]`` patches of ``x`` ``[N, C, H, W]`` (zero padding)."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = geo.kernel, geo.strides, geo.pads, geo.dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n, i, j = pos
    c = np.arange(x.shape[1])
    rows = (i * sh)[:, None, None, None] + (np.arange(kh) * dh)[None, None, :, None]
    cols = (j * sw)[:, None, None, None] + (np.arange(kw) * dw)[None, None, None, :]
    patches = xp[n[:, None, None, None], c[None, :, None, None], rows, cols]
    return patches.reshape(len(n), -1)


def channels_last(t: np.ndarray, pos: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``[N, C, H, W]`` -> ``[m, C]`` samples (all positions, or the given ones)."""
    if pos is None:
        return np.moveaxis(t, 1, -1).reshape(-1, t.shape[1])
    n, i, j = pos
    return t[n, :, i, j]


def project_taps(p: np.ndarray, channels: int, taps: int, v: np.ndarray) -> np.ndarray:
    """Patches ``[m, C*k]`` (channel-major) with each tap's channels projected by ``v`` ``[C, r]``: ``[m, r*k]``
    (as one matrix product)."""
    m = len(p)
    t = np.ascontiguousarray(p.reshape(m, channels, taps).transpose(0, 2, 1)).reshape(m * taps, channels) @ v
    return np.ascontiguousarray(t.reshape(m, taps, -1).transpose(0, 2, 1)).reshape(m, -1)


def column_responses(p: np.ndarray, shape: tuple[int, int, int], a: np.ndarray) -> np.ndarray:
    """What a ``kh x 1`` conv ``a`` ``[r, C, kh]`` gives at each of the ``kw`` columns of patches ``[m, C*kh*kw]``:
    ``z[m, r, w] = sum_{c,h} a[r,c,h] p[m,c,h,w]``, flattened to ``[m, r*kw]`` (as one matrix product)."""
    c, kh, kw = shape
    m = len(p)
    cols = np.ascontiguousarray(p.reshape(m, c * kh, kw).transpose(0, 2, 1)).reshape(m * kw, c * kh)
    z = cols @ np.ascontiguousarray(a.reshape(len(a), c * kh).T)
    return np.ascontiguousarray(z.reshape(m, kw, -1).transpose(0, 2, 1)).reshape(m, -1)


def consumer_metric(conv: gs.Node) -> np.ndarray | None:
    """``K = sum_n Wn^T Wn`` (over the consumers' output channels and taps) of the convs that read this
    conv's output, directly or through one ReLU; ``None`` when any reader is something else."""
    tensor = conv.outputs[0]
    readers = tensor.outputs
    if len(readers) == 1 and readers[0].op == "Relu":
        tensor = readers[0].outputs[0]
        readers = tensor.outputs
    total = None
    for node in readers:
        w = const_value(node.inputs[1]) if node.op == "Conv" and len(node.inputs) > 1 else None
        if w is None or w.ndim != 4 or int(node.attrs.get("group", 1)) != 1 or node.inputs[0] is not tensor:
            return None
        unfolded = np.moveaxis(w.astype(np.float64), 1, 0).reshape(w.shape[1], -1)
        k = unfolded @ unfolded.T
        total = k if total is None else total + k
    return total


# -- the pass ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BottleneckOptions:
    modes: tuple[str, ...] = ("output", "input", "spatial")
    rank_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    rank_multiple: int = 16
    #: Ranks of the spatial separation, as fractions of min(C, O) (at 1.0 a 3x3 conv keeps 2/3 of its MACs).
    spatial_fractions: tuple[float, ...] = (0.5, 0.75, 1.0)
    min_kernel: int = 3
    #: Also factorize dense 1x1 convs (C -> r -> O), which only pays when r < C*O/(C+O).
    include_pointwise: bool = False
    #: Modes tried on 1x1 convs (of ``modes``). For a 1x1 conv the output and input sides are the same
    #: structure (1x1 C->r, 1x1 r->O) with the kept subspace read on either side; by default only the
    #: output side, chosen in the consumer's norm, is tried (half the candidates to screen and judge).
    pointwise_modes: tuple[str, ...] = ("output",)
    #: Re-fit the data-facing factor by least squares on calibration data.
    refit: bool = True
    #: When the conv feeds a ReLU, fit through it (errors on values the ReLU zeroes anyway are free).
    through_relu: bool = True
    #: Output side / Tucker: choose the subspace in the norm the consumer conv sees (``|Wn e|``, through
    #: a ReLU) instead of plain PCA -- errors in directions the next layer ignores are free.
    consumer_metric: bool = True
    max_samples: int = 8000
    #: Relative ridge of the refits (``lam = ridge * tr(P^T P) / d``) where it cannot be chosen on
    #: held-out calibration feeds (``cv_folds`` 0, or a single feed).
    ridge: float = 1e-4
    #: Ridges tried per refit; the one that best predicts held-out calibration feeds is used. Few samples
    #: per weight (deep layers, small maps) want a strong pull towards the projected weights, many want none.
    ridge_grid: tuple[float, ...] = (1e-4, 1e-2, 0.1, 0.3, 1.0, 3.0)
    #: Folds of whole calibration feeds for choosing the ridge (0: always use ``ridge``).
    cv_folds: int = 2
    #: Rows (spread evenly over the feeds) used for choosing the ridge; the fit itself uses every sample.
    cv_rows: int = 4096
    seed: int = 0
    #: Node names to consider (empty: every eligible conv).
    only: tuple[str, ...] = field(default_factory=tuple)


def _gone(key: str) -> np.ndarray:
    raise RuntimeError(f"bottleneck: calibration samples {key!r} were evicted before use")


def _proxy(spec_out: np.ndarray, total_out: float, spec_in: np.ndarray, spatial: Callable[[int], float]):  # type: ignore[no-untyped-def]
    def error(mode: str, rank: int) -> float:
        if mode == "spatial":
            return spatial(rank)
        if mode == "input":
            return float(np.sqrt(spec_in[rank:].sum() / max(spec_in.sum(), 1e-12)))
        return float(np.sqrt(spec_out[rank:].sum() / total_out))

    return error


@dataclass(frozen=True)
class _Site:
    conv: gs.Node
    w: np.ndarray
    b: np.ndarray | None
    geo: ConvGeometry


def _geometry(node: gs.Node, w: np.ndarray) -> ConvGeometry | str:
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return "auto_pad SAME_* is not handled; export with explicit pads"
    kernel = tuple(int(k) for k in node.attrs.get("kernel_shape", w.shape[2:]))
    strides = tuple(int(s) for s in node.attrs.get("strides", [1, 1]))
    pads = tuple(int(p) for p in node.attrs.get("pads", [0, 0, 0, 0]))
    dil = tuple(int(d) for d in node.attrs.get("dilations", [1, 1]))
    if len(kernel) != 2 or len(strides) != 2 or len(pads) != 4 or len(dil) != 2:
        return "only 2-D convolutions are handled"
    return ConvGeometry(kernel, strides, (pads[0], pads[1], pads[2], pads[3]), dil)  # type: ignore[arg-type]


class Bottleneck(Pass):
    """Insert 1x1 low-rank reductions into expensive dense convs (lossy; see the module docstring)."""

    name = "bottleneck"
    summary = "Factorize dense KxK convs through a narrow 1x1 bottleneck (output/input side, Tucker-2); lossy."
    exact = False
    data_aware = True

    def __init__(self, **options: object) -> None:
        known = BottleneckOptions.__dataclass_fields__
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"bottleneck: unknown option(s) {unknown}; known: {sorted(known)}")
        for key in ("modes", "pointwise_modes", "rank_fractions", "spatial_fractions", "only", "ridge_grid"):
            if key in options and not isinstance(options[key], tuple):
                options[key] = tuple(options[key])  # type: ignore[arg-type]
        self.options = BottleneckOptions(**options)  # type: ignore[arg-type]
        bad = [m for m in self.options.modes + self.options.pointwise_modes if m not in MODES]
        if bad:
            raise TypeError(f"bottleneck: unknown mode(s) {bad}; known: {MODES}")
        self._warned = False

    # -- match / check ------------------------------------------------------------------------------
    def _site(self, model: Model, node: gs.Node) -> _Site | str | None:
        if node.op != "Conv" or len(node.inputs) < 2 or len(node.outputs) != 1:
            return None
        if self.options.only and node.name not in self.options.only:
            return None
        if MARK in node.name:
            return None  # made by this pass
        w = const_value(node.inputs[1])
        if w is None or is_graph_input(model.graph, node.inputs[1]):
            return "weight is not a constant initializer"
        if w.ndim != 4:
            return "only 2-D convolutions are handled"
        pointwise = w.shape[2] == 1 and w.shape[3] == 1
        if int(node.attrs.get("group", 1)) != 1:
            return None if pointwise else "grouped conv: no dense channel dimension to reduce"
        if pointwise and not self.options.include_pointwise:
            return None
        if not pointwise and max(w.shape[2:]) < self.options.min_kernel:
            return None
        if w.dtype.kind != "f":
            return "weights are not floating point"
        b = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = const_value(node.inputs[2])
            if b is None:
                return "bias is not constant"
        geo = _geometry(node, w)
        if isinstance(geo, str):
            return geo
        if model.static_shape(node.outputs[0]) is None or model.static_shape(node.inputs[0]) is None:
            return "input or output shape unknown"
        return _Site(node, w, b, geo)

    def _macs(self, model: Model, site: _Site, mode: str, rank: int) -> int:
        out = model.static_shape(site.conv.outputs[0])
        inp = model.static_shape(site.conv.inputs[0])
        assert out is not None and inp is not None
        o, c, kh, kw = site.w.shape
        n, _, ho, wo = out
        hi, wi = inp[2], inp[3]
        if mode == "output":
            return n * ho * wo * (rank * c * kh * kw + o * rank)
        if mode == "input":
            return n * hi * wi * c * rank + n * ho * wo * o * rank * kh * kw
        if mode == "spatial":  # kh x 1 at (Ho, Wi), then 1 x kw at (Ho, Wo)
            return n * ho * wi * c * kh * rank + n * ho * wo * rank * kw * o
        r1, r2 = rank
        return n * hi * wi * c * r1 + n * ho * wo * (r2 * r1 * kh * kw + o * r2)  # type: ignore[misc]

    def find(self, model: Model) -> Iterator[Candidate | Skip]:
        """Variants of every dense conv; and, for convs this pass factorized before, the variants that would
        lower MACs further, as replacements of that factorization (see :meth:`refresh`)."""
        sites: list[_Site] = []
        for node in list(model.graph.nodes):
            site = self._site(model, node)
            if isinstance(site, str):
                yield Skip(self.name, (node.name,), site)
            elif site is not None:
                sites.append(site)
        redone = {n.name.split(MARK)[0] for n in model.graph.nodes if MARK in n.name}
        again = [found[0] for name in sorted(redone) if (found := self._original(model, name)) is not None]
        proxies = self._error_proxies(model, sites + again)
        for site in sites:
            found = False
            for cand in self._variants(model, site, proxies[site.conv.name]):
                found = True
                yield cand
            if not found:
                yield Skip(self.name, (site.conv.name,), "no rank in the grid lowers MACs")
        for site in again:
            for cand in self._variants(model, site, proxies[site.conv.name]):
                fresh = self.refresh(model, cand)
                if fresh is not None:
                    yield fresh

    def _variants(self, model: Model, site: _Site, errors: Callable[[str, int], float]) -> Iterator[Candidate]:
        """Every mode and rank of the grid that lowers the conv's MACs, as candidates."""
        opts = self.options
        node = site.conv
        before = node_cost(model, node)
        o, c = site.w.shape[:2]
        kh, kw = site.geo.kernel
        pointwise = kh == 1 and kw == 1
        for mode in opts.modes:
            if pointwise and mode not in opts.pointwise_modes:
                continue
            if mode == "spatial":
                if kh == 1 or kw == 1:
                    continue
                full = min(c * kh, o * kw)
                grid = [r for r in {round_rank(f * min(c, o), opts.rank_multiple, full) for f in opts.spatial_fractions} if r < full]
            else:
                full = {"output": o, "input": c, "tucker": min(o, c)}[mode]
                grid = rank_grid(full, opts.rank_fractions, opts.rank_multiple)
            for rank in sorted(grid):
                knob = (rank, rank) if mode == "tucker" else rank
                macs = self._macs(model, site, mode, knob)  # type: ignore[arg-type]
                if macs >= before.macs:
                    continue
                params = self._params(site, mode, knob)  # type: ignore[arg-type]
                err = errors(mode, rank)
                yield Candidate(
                    self.name,
                    (node.name,),
                    (f"spatial separation of {node.name} ({c}->{o}, {kh}x{kw} -> {kh}x1, 1x{kw})" if mode == "spatial" else
                     f"{mode}-side bottleneck of {node.name} ({c}->{o}, {kh}x{kw})") + f" at rank {rank} (est. rel. error {err:.3g})",
                    Cost(before.macs, macs, before.params, params),
                    {"mode": mode, "rank": rank},
                    # MACs saved per unit of squared error: squared errors of independent layers add up.
                    priority=(before.macs - macs) / max(err, 1e-3) ** 2,
                    family=f"{node.name}:{mode}",
                    level=-rank,
                    error=err,
                    kind=mode,
                )

    def _params(self, site: _Site, mode: str, rank: int | tuple[int, int]) -> int:
        o, c, kh, kw = site.w.shape
        if mode == "output":
            return rank * c * kh * kw + rank + o * rank + o  # type: ignore[operator]
        if mode == "input":
            return c * rank + o * rank * kh * kw + o  # type: ignore[operator]
        if mode == "spatial":
            return rank * c * kh + o * rank * kw + o  # type: ignore[operator]
        r1, r2 = rank  # type: ignore[misc]
        return c * r1 + r2 * r1 * kh * kw + r2 + o * r2 + o

    # -- estimates -----------------------------------------------------------------------------------
    def _error_proxies(self, model: Model, sites: list[_Site]):  # type: ignore[no-untyped-def]
        """Per conv, a function (mode, rank) -> estimated relative error of its output (before any refit).

        Data-aware: the residual energy of the output's principal components (output side, Tucker) or of
        the input's uncentred second moment (input side), from channel moments gathered in one run.
        Weight-only: the residual energy of ``W``'s singular values unfolded along outputs or inputs.
        """
        out = {}
        cal = self.calibration

        def spectrum(matrix: np.ndarray) -> np.ndarray:
            return np.sort(np.linalg.eigvalsh(matrix.astype(np.float32)).astype(np.float64))[::-1]

        if cal is not None and sites:
            # Estimates only rank candidates (screening measures them): a sparser grid of positions will do.
            ys = cal.moments(cal.original, [s.conv.outputs[0].name for s in sites], flops_per_feed=1e7)
            xs = cal.moments(model, [s.conv.inputs[0].name for s in sites], flops_per_feed=1e7)
            taps = self._tap_correlations(model, sites) if "spatial" in self.options.modes else {}
        for site in sites:
            if cal is None:
                o, c = site.w.shape[:2]
                w = site.w.astype(np.float64)
                spec_out = np.linalg.svd(w.reshape(o, -1), compute_uv=False) ** 2
                spec_in = np.linalg.svd(np.moveaxis(w, 1, 0).reshape(c, -1), compute_uv=False) ** 2
                total_out = spec_out.sum()
            else:
                yname, xname = site.conv.outputs[0].name, site.conv.inputs[0].name
                mean, second = ys[yname]
                metric = consumer_metric(site.conv) if self.options.consumer_metric else None
                if metric is None:  # convs reading one tensor share its spectra (cached per version)
                    spec_out = cal.memo(cal.original, f"{self.name}:spectrum:{yname}", lambda: spectrum(second - np.outer(mean, mean)))
                    total_out = float(np.trace(second))
                else:  # in the consumer's norm, like the basis the rewrite will use
                    root = metric_root(metric)[0]
                    spec_out = cal.memo(model, f"{self.name}:spectrum:{site.conv.name}", lambda: spectrum(root @ (second - np.outer(mean, mean)) @ root))
                    total_out = float(np.trace(root @ second @ root))
                spec_in = cal.memo(model, f"{self.name}:spectrum:{xname}", lambda: spectrum(xs[xname][1]))
            second_in = None if cal is None else xs[site.conv.inputs[0].name][1]
            out[site.conv.name] = _proxy(np.clip(spec_out, 0, None), max(total_out, 1e-12), np.clip(spec_in, 0, None),
                                         self._spatial_proxy(site, second_in, None if cal is None else taps.get(site.conv.name)))
        return out

    def _tap_correlations(self, model: Model, sites: list[_Site]) -> dict[str, np.ndarray]:
        """Per KxK conv, the correlation between its patch taps on calibration data (one run per version)."""
        cal = self.calibration
        wanted = [s for s in sites if min(s.geo.kernel) > 1]

        def compute() -> dict[str, np.ndarray]:
            def per_feed(_: int, tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
                return [tap_products(tensors[s.conv.inputs[0].name].astype(np.float32), s.geo.kernel, s.geo.dilations) for s in wanted]

            feeds = cal.map(model, [s.conv.inputs[0].name for s in wanted], per_feed) if wanted else []
            return {s.conv.name: tap_correlation(sum(f[i] for f in feeds), s.geo.kernel) for i, s in enumerate(wanted)}

        key = ",".join(f"{s.conv.name}/{s.geo.kernel}/{s.geo.dilations}" for s in wanted)
        return cal.memo(model, f"{self.name}:taps:{key}", compute)

    def _spatial_proxy(self, site: _Site, second: np.ndarray | None, taps: np.ndarray | None = None) -> Callable[[int], float]:
        """rank -> estimated relative error of the spatial separation (one SVD, on first use)."""
        cache: dict[int, float] = {}

        def error(rank: int) -> float:
            if rank not in cache:
                o, c = site.w.shape[:2]
                ranks = sorted({round_rank(f * min(c, o), self.options.rank_multiple, 10**9) for f in self.options.spatial_fractions} | {rank})
                cache.update(spatial_errors(site.w, second, ranks, taps))
            return cache[rank]

        return error

    # -- apply ---------------------------------------------------------------------------------------
    def _group(self, model: Model, conv_name: str) -> list[gs.Node] | None:
        """The convs this pass put in place of ``conv_name``, input to output, while they still form the chain
        it made (each read only by the next)."""
        prefix = f"{conv_name}{MARK}"
        nodes = [n for n in model.graph.nodes if n.name.startswith(prefix) and n.op == "Conv" and n.inputs and n.outputs]
        produced = {n.outputs[0].name: n for n in nodes}
        heads = [n for n in nodes if n.inputs[0].name not in produced]
        if len(heads) != 1:
            return None
        chain = heads
        while len(chain) < len(nodes):
            readers = [r for r in chain[-1].outputs[0].outputs if r in nodes]
            if len(readers) != 1 or len(chain[-1].outputs[0].outputs) != 1:
                return None
            chain.append(readers[0])
        return chain

    def _original(self, model: Model, conv_name: str) -> tuple[_Site, list[gs.Node]] | None:
        """The original conv ``conv_name`` (from ``model.root``) and the chain that replaced it in ``model``."""
        root = model.root
        node = root.node(conv_name) if root is not model else None
        site = self._site(root, node) if node is not None else None
        group = self._group(model, conv_name)
        if not isinstance(site, _Site) or not group:
            return None
        if group[0].inputs[0].name != site.conv.inputs[0].name or group[-1].outputs[0].name != site.conv.outputs[0].name:
            return None
        return site, group

    def refresh(self, model: Model, candidate: Candidate) -> Candidate | None:
        """A variant of a conv this pass already factorized, as a replacement of that factorization (from the
        original weights) -- offered only where it lowers MACs further."""
        if len(candidate.nodes) != 1 or MARK in candidate.nodes[0]:
            return None
        found = self._original(model, candidate.nodes[0])
        if found is None:
            return None
        site, group = found
        mode, rank = str(candidate.options["mode"]), int(candidate.options["rank"])
        knob = (rank, rank) if mode == "tucker" else rank
        costs = [node_cost(model, n) for n in group]
        before = sum(c.macs for c in costs)
        macs = self._macs(model, site, mode, knob)  # type: ignore[arg-type]
        if macs >= before:
            return None
        return replace(candidate, nodes=tuple(n.name for n in group),
                       description=f"{candidate.description}, in place of its earlier factorization",
                       cost=Cost(before, macs, sum(c.params for c in costs), self._params(site, mode, knob)))  # type: ignore[arg-type]

    def apply(self, model: Model, candidate: Candidate) -> None:
        mode, rank = str(candidate.options["mode"]), int(candidate.options["rank"])
        if MARK in candidate.nodes[0]:  # re-factorizing a conv factorized before (see refresh)
            found = self._original(model, candidate.nodes[0].split(MARK)[0])
            if found is None or tuple(n.name for n in found[1]) != candidate.nodes:
                raise RewriteError(f"bottleneck: the factorization {candidate.nodes} is no longer in the graph")
            site, old = found
        else:
            node = model.node(candidate.nodes[0])
            found_site = self._site(model, node) if node is not None else None
            if not isinstance(found_site, _Site):
                raise RewriteError(f"bottleneck: {candidate.nodes[0]} is no longer a dense conv to factorize")
            site, old = found_site, [found_site.conv]
        if self.calibration is None and not self._warned:
            log.warning("bottleneck: no calibration data; using weight-only SVD, which loses much more accuracy on trained networks")
            self._warned = True
        cal = self.calibration
        if cal is None:
            layers = self._factorize(model, site, mode, rank)
        else:  # the same fit whenever the conv's inputs are computed the same way (e.g. screened, then judged)
            key = f"{self.name}:layers:{site.conv.name}:{mode}:{rank}:{hash(self.options)}:{cal.lineage(model, site.conv.inputs[0].name)}"
            layers = cal.lasting(key, lambda: self._factorize(model, site, mode, rank))
        self._rewrite(model, site, layers, old)

    def _samples(self, model: Model, site: _Site) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(patches [m, C*kh*kw], y [m, O], feed [m])``: the conv's input patches in ``model`` and its
        output in the *original* model, at the same ``max_samples`` output positions spread evenly over
        every calibration feed (seeded), and the feed each row came from. Cached per model version;
        whole activations are never kept."""
        return self._sample_many(model, [site])[0]

    def _sample_many(self, model: Model, sites: list[_Site]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`_samples` of several convs, those not cached yet gathered in one run of each model."""
        cal = self.calibration
        per_feed = max(1, math.ceil(self.options.max_samples / len(cal.feeds)))
        seed = self.options.seed
        tag = f"{self.name}:{per_feed}:{seed}:"

        def positions(site: _Site, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            shape = model.static_shape(site.conv.outputs[0])
            assert shape is not None
            return sample_positions(shape[0], shape[2], shape[3], per_feed, np.random.default_rng((seed, k)))

        def gather(version: Model, todo: list[_Site], tensor: Callable[[_Site], str], key: Callable[[_Site], str],
                   take: Callable[[_Site, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]], np.ndarray],
                   inputs: bool) -> list[np.ndarray]:
            # Inputs: this version's (until it changes), and -- by the lineage of the tensor -- for later
            # versions that compute it the same way (rewrites downstream of it leave it as it was).
            lasting = {key(s): f"{key(s)}:{cal.lineage(version, tensor(s))}" for s in todo} if inputs else {}
            for s in todo:
                if inputs and not cal.cached(version, key(s)) and cal.has_lasting(lasting[key(s)]):
                    found = cal.lasting(lasting[key(s)], lambda: _gone(key(s)))
                    cal.memo(version, key(s), lambda found=found: found, while_current=True)
            missing = [s for s in {key(s): s for s in todo}.values() if not cal.cached(version, key(s))]
            if missing:
                per_feed_rows = cal.map(version, [tensor(s) for s in missing],
                                        lambda k, t: [take(s, t[tensor(s)], positions(s, k)).astype(np.float32) for s in missing])
                for i, s in enumerate(missing):
                    rows = np.concatenate([feed[i] for feed in per_feed_rows])
                    cal.memo(version, key(s), lambda rows=rows: rows, while_current=inputs)
                    if inputs:
                        cal.lasting(lasting[key(s)], lambda rows=rows: rows)
            return [cal.memo(version, key(s), lambda: _gone(key(s))) for s in todo]

        # Targets: the original's outputs (kept for the whole run); inputs: this version's.
        ys = gather(cal.original, sites, lambda s: s.conv.outputs[0].name, lambda s: tag + "y:" + s.conv.outputs[0].name,
                    lambda s, t, pos: channels_last(t, pos), False)
        xs = gather(model, sites, lambda s: s.conv.inputs[0].name, lambda s: tag + "x:" + s.conv.name,
                    lambda s, t, pos: extract_patches(t, s.geo, pos), True)
        return [(x, y, np.repeat(np.arange(len(cal.feeds)), len(positions(s, 0)[0]))) for s, x, y in zip(sites, xs, ys)]

    def prefetch(self, model: Model, candidates: list[Candidate]) -> None:
        """Calibration samples of every conv the candidates touch, in one run of ``model`` (and of the original)."""
        if self.calibration is None or not self.options.refit:
            return
        sites = {}
        for c in candidates:
            node = model.node(c.nodes[0])
            site = self._site(model, node) if node is not None else None
            if isinstance(site, _Site):
                sites[site.conv.name] = site
        if sites:
            self._sample_many(model, list(sites.values()))

    def _solver(self, design: np.ndarray, groups: np.ndarray, target: np.ndarray, prior: np.ndarray) -> tuple[RidgeSolver, float]:
        """A ridge solver for ``design``, with the ridge that best predicts held-out calibration feeds for
        ``target`` (see :class:`HeldOut`), or the fixed ``ridge`` option when none can be held out."""
        opts = self.options
        ridge = opts.ridge
        if opts.cv_folds >= 2 and opts.ridge_grid:
            rows = slice(None) if len(design) <= opts.cv_rows else np.linspace(0, len(design) - 1, opts.cv_rows).astype(np.int64)
            ridge, err = HeldOut(design[rows], groups[rows], opts.cv_folds).best(target[rows], opts.ridge_grid, prior, default=opts.ridge)
            log.debug("bottleneck: ridge %g (held-out relative error %s)", ridge, err)
        return RidgeSolver(design, ridge), ridge

    def _output_basis(self, model: Model, site: _Site, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(U, mu, P)`` from the covariance of the conv's output in the original model (all calibration
        feeds): plain PCA (``P`` None), or with ``consumer_metric`` PCA in the norm the consumer conv sees."""
        cal = self.calibration
        yname = site.conv.outputs[0].name
        metric = consumer_metric(site.conv) if self.options.consumer_metric else None
        mean, second = cal.moments(cal.original, [yname])[yname]
        if metric is not None:
            u, coords = metric_basis(second - np.outer(mean, mean), metric, rank)
            return u, mean, coords

        def eig() -> np.ndarray:
            values, vectors = np.linalg.eigh(second - np.outer(mean, mean))
            return vectors[:, np.argsort(values)[::-1]]

        return cal.memo(cal.original, f"{self.name}:eig:{yname}", eig)[:, :rank], mean, None

    def _input_basis(self, model: Model, site: _Site, rank: int) -> np.ndarray:
        """``V``: leading eigenvectors of the uncentred second moment of the conv's input in ``model`` (from
        the patches' centre taps when refitting: the samples are at hand; else from the channel moments)."""
        cal = self.calibration
        xname = site.conv.inputs[0].name

        def eig() -> np.ndarray:
            if self.options.refit:
                o, c, kh, kw = site.w.shape
                p = self._samples(model, site)[0]
                centre = np.ascontiguousarray(p.reshape(len(p), c, kh * kw)[:, :, (kh // 2) * kw + kw // 2])
                second = gram(centre).astype(np.float64) / max(1, len(centre))
            else:
                second = cal.moments(model, [xname])[xname][1]
            values, vectors = np.linalg.eigh(second)
            return vectors[:, np.argsort(values)[::-1]]

        return cal.memo(model, f"{self.name}:eig:{xname}", eig)[:, :rank]

    def _factorize(self, model: Model, site: _Site, mode: str, rank: int) -> list[Layer]:
        """The new layers as (weight [o, i, kh, kw], bias, geometry), first to last.

        Data-aware refits start from the projected weights and are pulled back to them by the ridge
        (a prior), so a conv with few calibration samples per weight stays close to plain PCA.
        """
        w, b, opts, geo = site.w, site.b, self.options, site.geo
        o, c, kh, kw = w.shape
        data = self.calibration is not None
        users = site.conv.outputs[0].outputs
        relu = opts.through_relu and len(users) == 1 and users[0].op == "Relu"
        if not data:
            return self._weight_only(site, mode, rank)
        if mode == "spatial":
            return self._spatial(model, site, rank, relu)
        v = self._input_basis(model, site, rank) if mode in ("input", "tucker") else None
        u, mu, coords = self._output_basis(model, site, rank) if mode in ("output", "tucker") else (None, None, None)
        if mode == "output":
            w1, b1, w2, b2 = factor_output(w, b, u, mu, coords)
            prior = w1.reshape(rank, -1)
        elif mode == "input":
            w1, w2 = factor_input(w, v)
            b2 = None if b is None else b.astype(np.float64)
            prior = w2.reshape(o, -1)
        else:
            w1, core, b_core, w3, b3 = factor_tucker(w, b, v, u, mu, coords)
            prior = core.reshape(rank, -1)
        if opts.refit:
            p, y_s, groups = self._samples(model, site)
            basis, mean = (None, None) if mode == "input" else (u, mu)
            read = basis if coords is None else coords
            target = y_s if read is None else (y_s - mean) @ read
            # The KxK factor reads the patches (output side) or the reduced channels, projected tap by tap.
            design = p if mode == "output" else project_taps(p, c, kh * kw, v.astype(np.float32))
            solver, ridge = self._solver(design, groups, target, prior)
            if relu:
                a, bias = ridge_fit_through_relu(solver, y_s, basis, mean, ridge, prior=prior, coords=read)
            else:
                a, bias = solver.fit(target, prior)
            if mode == "output":
                w1, b1 = a.reshape((rank, c, kh, kw)), bias
            elif mode == "input":
                w2, b2 = a.reshape((o, rank, kh, kw)), bias
            else:
                core, b_core = a.reshape((rank, rank, kh, kw)), bias
        if mode == "output":
            return [(w1, b1, geo), (w2.reshape(o, rank, 1, 1), b2, POINTWISE)]
        if mode == "input":
            return [(w1.reshape(rank, c, 1, 1), None, POINTWISE), (w2, b2, geo)]
        return [(w1.reshape(rank, c, 1, 1), None, POINTWISE), (core, b_core, geo), (w3.reshape(o, rank, 1, 1), b3, POINTWISE)]

    def _spatial(self, model: Model, site: _Site, rank: int, relu: bool) -> list[Layer]:
        """Spatial separation: ``A`` (``kh x 1``) from the SVD of the weights; ``B`` (``1 x kw``) and the bias
        re-fitted so that, from the rewritten model's inputs, the pair reproduces the original output."""
        w, b, opts = site.w, site.b, self.options
        o, c, kh, kw = w.shape
        a, bw = factor_spatial(w, rank)
        rows, cols = split_geometry(site.geo)
        bias = None if b is None else b.astype(np.float64)
        if opts.refit:
            p, y_s, groups = self._samples(model, site)
            # The 1 x kw factor reads A's responses at the kw taps of each output position: A applied to
            # the columns of the full kh x kw input patch (zero where the patch is padding, as A has no bias).
            z = column_responses(p, (c, kh, kw), a[..., 0].astype(np.float32))
            prior = bw.reshape(o, -1)
            solver, ridge = self._solver(z, groups, y_s, prior)
            fit, bias = ridge_fit_through_relu(solver, y_s, None, None, ridge, prior=prior) if relu else solver.fit(y_s, prior)
            bw = fit.reshape(o, rank, 1, kw)
        return [(a, None, rows), (bw, bias, cols)]

    def _weight_only(self, site: _Site, mode: str, rank: int) -> list[Layer]:
        """The fallback without calibration data: bases from the SVD of the weights alone."""
        w, b, geo = site.w, site.b, site.geo
        o, c = w.shape[:2]
        if mode == "spatial":
            a, bw = factor_spatial(w, rank)
            rows, cols = split_geometry(geo)
            return [(a, None, rows), (bw, None if b is None else b.astype(np.float64), cols)]
        if mode == "output":
            w1, b1, w2, b2 = factor_output(w, b, weight_output_basis(w, rank), None)
            return [(w1, b1, geo), (w2.reshape(o, rank, 1, 1), b2, POINTWISE)]
        v = weight_input_basis(w, rank)
        if mode == "input":
            w1, w2 = factor_input(w, v)
            return [(w1.reshape(rank, c, 1, 1), None, POINTWISE), (w2, None if b is None else b.astype(np.float64), geo)]
        w1, core, b_core, w3, b3 = factor_tucker(w, b, v, weight_output_basis(w, rank), None)
        return [(w1.reshape(rank, c, 1, 1), None, POINTWISE), (core, b_core, geo), (w3.reshape(o, rank, 1, 1), b3, POINTWISE)]

    def _rewrite(self, model: Model, site: _Site, layers: list[Layer], old: list[gs.Node] | None = None) -> None:
        """``layers`` in place of ``old`` (the conv by default, or the chain that replaced it before), named after the conv."""
        names = NameFactory(model.graph)
        conv = site.conv
        old = old or [conv]
        dtype = site.w.dtype
        new_nodes = []
        current = old[0].inputs[0]
        outputs = list(old[-1].outputs)
        for i, (w, b, g) in enumerate(layers):
            last = i == len(layers) - 1
            inputs = [current, constant(names, f"{conv.name}{MARK}{i}_W", w.astype(dtype))]
            if b is not None:
                inputs.append(constant(names, f"{conv.name}{MARK}{i}_B", np.asarray(b).astype(dtype)))
            attrs = {"kernel_shape": list(g.kernel), "strides": list(g.strides), "pads": list(g.pads),
                     "dilations": list(g.dilations), "group": 1}
            out = outputs if last else [gs.Variable(names(f"{conv.name}{MARK}{i}_out"), dtype=dtype)]
            new_nodes.append(gs.Node("Conv", name=names(f"{conv.name}{MARK}{i}"), attrs=attrs, inputs=inputs, outputs=out))
            current = out[0]
        replace_nodes(model.graph, old, new_nodes)
