"""bottleneck samples alone (passes/bottleneck/patches.py): output positions, im2col patches against a direct
convolution, channels-last samples, and the per-tap projections done as one matrix product."""

from __future__ import annotations

import numpy as np
import pytest

from passes.bottleneck import ConvGeometry, channels_last, column_responses, extract_patches, project_taps, sample_positions
from tests.bottleneck_support import GEOMETRIES


def naive_conv(x: np.ndarray, w: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """Convolution by its definition, one output position and tap at a time (zero padding)."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = geo.kernel, geo.strides, geo.pads, geo.dilations
    n, c, h, wd = x.shape
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, w.shape[0], ho, wo))
    for i in range(ho):
        for j in range(wo):
            for a in range(kh):
                for b in range(kw):
                    r, s = i * sh + a * dh - pt, j * sw + b * dw - pl
                    if 0 <= r < h and 0 <= s < wd:
                        y[:, :, i, j] += x[:, :, r, s] @ w[:, :, a, b].T
    return y


def test_sample_positions_are_distinct_in_range_and_all_of_them_when_few() -> None:
    n, i, j = sample_positions(2, 5, 7, 30, np.random.default_rng(1))
    assert len(n) == 30 and len({(a, b, c) for a, b, c in zip(n, i, j)}) == 30
    assert n.max() < 2 and i.max() < 5 and j.max() < 7 and min(n.min(), i.min(), j.min()) >= 0
    every = sample_positions(2, 5, 7, 70, np.random.default_rng(1))
    assert sorted(zip(*every)) == [(a, b, c) for a in range(2) for b in range(5) for c in range(7)]
    again = sample_positions(2, 5, 7, 30, np.random.default_rng(1))
    assert all(np.array_equal(u, v) for u, v in zip(again, (n, i, j)))  # seeded


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_patches_times_the_weights_are_the_conv_output(geo: ConvGeometry) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 9, 8))
    w = rng.standard_normal((5, 4) + geo.kernel)
    want = naive_conv(x, w, geo)
    n, o, ho, wo = want.shape
    pos = sample_positions(n, ho, wo, 17, rng)
    patches = extract_patches(x, geo, pos)
    assert patches.shape == (17, 4 * geo.kernel[0] * geo.kernel[1])
    np.testing.assert_allclose(patches @ w.reshape(o, -1).T, channels_last(want, pos), rtol=1e-12, atol=1e-12)


def test_channels_last_takes_every_position_or_the_given_ones() -> None:
    t = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 3, 4, 5)
    every = channels_last(t)
    assert every.shape == (40, 3)
    np.testing.assert_array_equal(every[7], t[0, :, 1, 2])  # row (n, i, j) in C order
    pos = (np.array([1, 0]), np.array([3, 0]), np.array([4, 1]))
    np.testing.assert_array_equal(channels_last(t, pos), np.stack([t[1, :, 3, 4], t[0, :, 0, 1]]))


def test_tap_projection_and_column_responses_equal_their_einsums() -> None:
    rng = np.random.default_rng(5)
    p = rng.standard_normal((7, 4 * 3 * 2)).astype(np.float32)
    v = rng.standard_normal((4, 3)).astype(np.float32)
    expected = np.einsum("mck,cr->mrk", p.reshape(7, 4, 6), v).reshape(7, -1)
    np.testing.assert_allclose(project_taps(p, 4, 6, v), expected, rtol=1e-5, atol=1e-5)
    a = rng.standard_normal((5, 4, 3)).astype(np.float32)
    expected = np.einsum("mchw,rch->mrw", p.reshape(7, 4, 3, 2), a).reshape(7, -1)
    np.testing.assert_allclose(column_responses(p, (4, 3, 2), a), expected, rtol=1e-5, atol=1e-5)
