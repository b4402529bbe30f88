"""Low-rank weight math of the bottleneck pass (pure numpy, no graph, no data service).

For a conv ``y = W * x + b``, ``W`` ``[O, C, kh, kw]``, at rank ``r``:

* output side: ``y ~ U P^T (y - mu) + mu`` (``P^T U = I``; ``P = U`` for an orthonormal ``U``), so
  ``W1 = P^T W``, ``b1 = P^T (b - mu)``, ``W2 = U``, ``b2 = mu``;
* input side: ``x ~ V V^T x`` (``V`` the leading eigenvectors of the uncentred ``E[x x^T]``), so
  ``W1 = V^T``, ``W2 = W x_c V``, ``b2 = b`` -- uncentred, so zero padding stays exact at full rank;
* Tucker-2: both, the core ``P^T (W x_c V)``;
* spatial: ``W[o,c,h,w] ~ sum_r A[r,c,h] B[o,r,w]``, the truncated SVD of ``W`` unfolded as ``[(c,h), (o,w)]``.

Error estimates: the relative error of a truncation is ``sqrt(residual energy / total energy)`` of the
spectrum it cuts (singular values of ``W`` squared, or eigenvalues of the data's moments); for the spatial
split, ``sqrt(E|dW p|^2 / E|W p|^2)`` over patches ``p`` with ``E[x_c(t1) x_d(t2)] = M[c,d] R[t1,t2]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: ``(mode, rank) -> estimated relative error`` of a conv's output.
ErrorProxy = Callable[[str, int], float]


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel, strides, pads (top, left, bottom, right) and dilations of a 2-D conv."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]


POINTWISE = ConvGeometry((1, 1), (1, 1), (0, 0, 0, 0), (1, 1))
#: One new conv: weight ``[o, i, kh, kw]``, bias or None, geometry.
Layer = tuple[np.ndarray, "np.ndarray | None", ConvGeometry]


# -- ranks -----------------------------------------------------------------------------------------


def round_rank(value: float, multiple: int, full: int) -> int:
    """``value`` rounded up to a multiple of ``multiple`` (at least ``multiple``), capped at ``full``."""
    multiple = max(1, multiple)
    return min(full, max(multiple, int(math.ceil(value / multiple)) * multiple))


def rank_grid(full: int, fractions: tuple[float, ...], multiple: int) -> list[int]:
    """Distinct ranks below ``full`` from fractions of it, rounded to ``multiple``."""
    return sorted({r for f in fractions if (r := round_rank(f * full, multiple, full)) < full})


# -- bases -----------------------------------------------------------------------------------------


def gram(x: np.ndarray) -> np.ndarray:
    """``x^T x``. numpy hands a product of an array with its own transpose to BLAS ``syrk``: half the work of a
    general product, exactly symmetric, and no transposed copy (8,000 x 4,608 float32: 1.2 s against 2.5 s for a
    contiguous copy times the array, which also held another copy of ``x``)."""
    return x.T @ x


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


# -- factors (output / input side, Tucker-2) -------------------------------------------------------


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


# -- spatial separation ----------------------------------------------------------------------------


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


# -- error estimates from spectra ------------------------------------------------------------------


def spectrum(matrix: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric matrix, largest first (float32 solve: estimates only rank candidates)."""
    return np.sort(np.linalg.eigvalsh(matrix.astype(np.float32)).astype(np.float64))[::-1]


def weight_spectra(w: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """``(s_out, total_out, s_in)``: squared singular values of ``W`` unfolded along the outputs ``[O, C*kh*kw]``,
    their sum, and those of ``W`` unfolded along the inputs ``[C, O*kh*kw]`` (the weight-only spectra)."""
    o, c = w.shape[:2]
    w64 = w.astype(np.float64)
    spec_out = np.linalg.svd(w64.reshape(o, -1), compute_uv=False) ** 2
    spec_in = np.linalg.svd(np.moveaxis(w64, 1, 0).reshape(c, -1), compute_uv=False) ** 2
    return spec_out, spec_out.sum(), spec_in


def spectral_proxy(spec_out: np.ndarray, total_out: float, spec_in: np.ndarray, spatial: Callable[[int], float]) -> ErrorProxy:
    """``(mode, rank) -> error``: ``sqrt(sum_{i >= r} s_out[i] / total_out)`` on the output side and Tucker,
    ``sqrt(sum_{i >= r} s_in[i] / sum s_in)`` on the input side, ``spatial(rank)`` for the spatial split."""

    def error(mode: str, rank: int) -> float:
        if mode == "spatial":
            return spatial(rank)
        if mode == "input":
            return float(np.sqrt(spec_in[rank:].sum() / max(spec_in.sum(), 1e-12)))
        return float(np.sqrt(spec_out[rank:].sum() / total_out))

    return error


# -- the weight-only fallback ----------------------------------------------------------------------


def weight_only_layers(w: np.ndarray, b: np.ndarray | None, geo: ConvGeometry, mode: str, rank: int) -> list[Layer]:
    """The new convs, first to last, with bases from the SVD of the weights alone (no calibration data)."""
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
