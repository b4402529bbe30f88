"""Samples of a conv's inputs and outputs at chosen output positions (pure numpy im2col).

An output position ``(n, i, j)`` of a conv with strides ``s``, dilations ``d`` and pads reads the patch
``x_pad[n, c, i*sh + h*dh, j*sw + w*dw]`` over channels ``c`` and taps ``(h, w)``; flattened channel-major,
``[C*kh*kw]``. A factor that reads a projection of the patch (``V^T`` per tap, or a ``kh x 1`` conv per
column) is applied to the samples as one matrix product.
"""

from __future__ import annotations

import numpy as np

from passes.bottleneck.lowrank import ConvGeometry


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


