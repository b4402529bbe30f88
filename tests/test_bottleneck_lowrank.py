"""bottleneck low-rank math alone (passes/bottleneck/lowrank.py): ranks, bases, factors exact at full rank,
the spatial split and its error estimate, spectral error proxies, the weight-only fallback."""

from __future__ import annotations

import numpy as np
import pytest

from passes.bottleneck import (
    POINTWISE,
    ConvGeometry,
    factor_input,
    factor_output,
    factor_spatial,
    factor_tucker,
    input_basis,
    metric_basis,
    output_basis,
    rank_grid,
    round_rank,
    spatial_errors,
    spectral_proxy,
    spectrum,
    split_geometry,
    tap_correlation,
    tap_products,
    weight_input_basis,
    weight_only_layers,
    weight_output_basis,
    weight_spectra,
)
from tests.bottleneck_support import GEOMETRIES, conv_ref, pointwise, rel_error

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 6, 9, 8))
W = RNG.standard_normal((10, 6, 3, 3))
B = RNG.standard_normal(10)


def test_round_rank_and_grid() -> None:
    assert round_rank(37, 16, 256) == 48
    assert round_rank(3, 16, 256) == 16
    assert round_rank(250, 16, 256) == 256
    assert rank_grid(256, (0.25, 0.5, 0.75), 16) == [64, 128, 192]
    assert rank_grid(64, (0.2, 0.25), 16) == [16]
    assert rank_grid(16, (0.5,), 16) == []  # rounding up reaches the full rank: nothing to gain


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_output_side_is_exact_at_full_rank(geo: ConvGeometry) -> None:
    w = RNG.standard_normal((10, 6) + geo.kernel)
    u = weight_output_basis(w, 10)
    w1, b1, w2, b2 = factor_output(w, B, u, RNG.standard_normal(10))
    got = pointwise(conv_ref(X, w1, b1, geo), w2, b2)
    np.testing.assert_allclose(got, conv_ref(X, w, B, geo), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_input_side_is_exact_at_full_rank_borders_included(geo: ConvGeometry) -> None:
    w = RNG.standard_normal((10, 6) + geo.kernel)
    v = input_basis(np.moveaxis(X, 1, -1).reshape(-1, 6), 6)
    w1, w2 = factor_input(w, v)
    got = conv_ref(pointwise(X, w1, None), w2, B, geo)
    np.testing.assert_allclose(got, conv_ref(X, w, B, geo), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_tucker_is_exact_at_full_rank(geo: ConvGeometry) -> None:
    w = RNG.standard_normal((10, 6) + geo.kernel)
    w1, core, b_core, w3, b3 = factor_tucker(w, B, weight_input_basis(w, 6), weight_output_basis(w, 10), None)
    got = pointwise(conv_ref(pointwise(X, w1, None), core, b_core, geo), w3, b3)
    np.testing.assert_allclose(got, conv_ref(X, w, B, geo), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_spatial_separation_is_exact_at_full_rank(geo: ConvGeometry) -> None:
    w = RNG.standard_normal((10, 6) + geo.kernel)
    full = min(6 * geo.kernel[0], 10 * geo.kernel[1])
    a, b = factor_spatial(w, full)
    rows, cols = split_geometry(geo)
    np.testing.assert_allclose(conv_ref(conv_ref(X, a, None, rows), b, B, cols), conv_ref(X, w, B, geo), rtol=1e-9, atol=1e-9)


def test_spatial_error_estimate_tracks_the_true_error_and_falls_with_rank() -> None:
    w = RNG.standard_normal((10, 6, 3, 3))
    geo, (rows, cols) = GEOMETRIES[0], split_geometry(GEOMETRIES[0])
    x = RNG.standard_normal((4, 6, 12, 12))  # uncorrelated taps and channels: the estimate is exact in expectation
    ranks = [2, 6, 10, 18]
    est = spatial_errors(w, np.eye(6), ranks)
    want = conv_ref(x, w, None, geo)
    true = [rel_error(conv_ref(conv_ref(x, *factor_spatial(w, r)[:1], None, rows), factor_spatial(w, r)[1], None, cols), want) for r in ranks]
    assert est[18] < 1e-7 and true[-1] < 1e-7
    assert all(est[r1] > est[r2] for r1, r2 in zip(ranks, ranks[1:]))
    np.testing.assert_allclose([est[r] for r in ranks[:-1]], true[:-1], rtol=0.25)


def test_tap_correlation_of_smooth_inputs_and_its_effect_on_the_spatial_estimate() -> None:
    white = RNG.standard_normal((2, 6, 40, 40))
    r_white = tap_correlation(tap_products(white, (3, 3), (1, 1)), (3, 3))
    np.testing.assert_allclose(r_white, np.eye(9), atol=0.05)  # white noise: taps uncorrelated
    smooth = np.cumsum(np.cumsum(white, axis=2), axis=3)  # strongly correlated neighbours
    smooth -= smooth.mean()
    r_smooth = tap_correlation(tap_products(smooth, (3, 3), (1, 1)), (3, 3))
    assert np.allclose(np.diag(r_smooth), 1.0) and r_smooth[0, 1] > 0.8
    # The estimate with the measured tap correlation tracks the true error on the smooth input.
    w = RNG.standard_normal((10, 6, 3, 3))
    geo, (rows, cols) = GEOMETRIES[4], split_geometry(GEOMETRIES[4])  # no padding: interior patches only
    want = conv_ref(smooth, w, None, geo)
    second = np.einsum("nchw,ndhw->cd", smooth, smooth) / (smooth.shape[0] * 40 * 40)
    for r in (3, 9):
        a, b = factor_spatial(w, r)
        true = rel_error(conv_ref(conv_ref(smooth, a, None, rows), b, None, cols), want)
        est = spatial_errors(w, second, [r], r_smooth)[r]
        assert 0.5 * true < est < 2.0 * true, (r, est, true)


def test_error_decreases_with_rank() -> None:
    geo = GEOMETRIES[0]
    want = conv_ref(X, W, B, geo)
    out_errs, in_errs = [], []
    for r in (2, 4, 6, 8, 10):
        w1, b1, w2, b2 = factor_output(W, B, weight_output_basis(W, r), None)
        out_errs.append(rel_error(pointwise(conv_ref(X, w1, b1, geo), w2, b2), want))
    for r in (1, 2, 4, 6):
        w1, w2 = factor_input(W, weight_input_basis(W, r))
        in_errs.append(rel_error(conv_ref(pointwise(X, w1, None), w2, B, geo), want))
    assert all(a > b for a, b in zip(out_errs, out_errs[1:])) and out_errs[-1] < 1e-9
    assert all(a > b for a, b in zip(in_errs, in_errs[1:])) and in_errs[-1] < 1e-9


def test_output_basis_is_pca_of_responses() -> None:
    y = RNG.standard_normal((500, 3)) @ RNG.standard_normal((3, 8)) + 5.0  # rank-3 responses around a mean
    u, mu = output_basis(y, 3)
    np.testing.assert_allclose(mu, y.mean(axis=0))
    recon = (y - mu) @ u @ u.T + mu
    np.testing.assert_allclose(recon, y, atol=1e-9)


def test_metric_basis_reconstructs_best_in_the_consumer_norm() -> None:
    o, r = 8, 3
    y = RNG.standard_normal((3000, o)) @ RNG.standard_normal((o, o))
    cov = np.cov(y.T, bias=True)
    wn = RNG.standard_normal((5, o)) * np.array([4.0, 3, 2, 1, 0.5, 0.1, 0.1, 0.1])  # the consumer weighs channels unevenly
    u, p = metric_basis(cov, wn.T @ wn, r, floor=1e-6)
    np.testing.assert_allclose(p.T @ u, np.eye(r), atol=1e-9)
    yc = y - y.mean(axis=0)

    def seen_error(recon: np.ndarray) -> float:
        return float(np.sum(((yc - recon) @ wn.T) ** 2))

    plain = output_basis(y, r)[0]
    assert seen_error(yc @ p @ u.T) < seen_error(yc @ plain @ plain.T)
    # An identity metric is plain PCA.
    u_id, p_id = metric_basis(cov, np.eye(o), r)
    np.testing.assert_allclose(np.abs(u_id.T @ plain), np.eye(r), atol=1e-6)
    np.testing.assert_allclose(u_id, p_id, atol=1e-12)


def apply_layers(x: np.ndarray, layers: list) -> np.ndarray:  # type: ignore[type-arg]
    """Run the new convs of a factorization, first to last (``conv_ref`` for every geometry)."""
    for w, b, geo in layers:
        x = conv_ref(x, w, b, geo)
    return x


@pytest.mark.parametrize("mode", ["output", "input", "tucker", "spatial"])
@pytest.mark.parametrize("geo", GEOMETRIES)
def test_weight_only_layers_are_exact_at_full_rank_and_carry_bias_and_geometry(mode: str, geo: ConvGeometry) -> None:
    w = RNG.standard_normal((6, 6) + geo.kernel)  # C = O = 6: rank 6 is full on every side but the spatial one
    full = min(6 * geo.kernel[0], 6 * geo.kernel[1]) if mode == "spatial" else 6
    layers = weight_only_layers(w, B[:6], geo, mode, full)
    assert len(layers) == (3 if mode == "tucker" else 2)
    if mode == "spatial":
        assert [g for _, _, g in layers] == list(split_geometry(geo))
    else:  # the KxK factor keeps the conv's geometry, the others are 1x1
        assert [g for _, _, g in layers].count(geo) == 1 and all(g in (geo, POINTWISE) for _, _, g in layers)
    biased = [b is not None for _, b, _ in layers]
    assert biased[-1] and biased[0] == (mode == "output")  # the bias goes last (and into the KxK factor, output side)
    np.testing.assert_allclose(apply_layers(X, layers), conv_ref(X, w, B[:6], geo), rtol=1e-9, atol=1e-9)
    # Below full rank the error is the truncation's, and not zero.
    low = weight_only_layers(w, B[:6], geo, mode, 2)
    assert 1e-6 < rel_error(apply_layers(X, low), conv_ref(X, w, B[:6], geo)) < 1.0


def test_weight_spectra_are_the_squared_singular_values_of_both_unfoldings() -> None:
    spec_out, total_out, spec_in = weight_spectra(W)
    np.testing.assert_allclose(spec_out, np.linalg.svd(W.reshape(10, -1), compute_uv=False) ** 2, rtol=1e-12)
    np.testing.assert_allclose(spec_in, np.linalg.svd(W.transpose(1, 0, 2, 3).reshape(6, -1), compute_uv=False) ** 2, rtol=1e-12)
    assert total_out == pytest.approx(float(np.sum(W.astype(np.float64) ** 2)), rel=1e-12)  # sum of s^2 = |W|^2


def test_spectral_proxy_is_the_relative_residual_energy_and_matches_the_weight_only_error() -> None:
    spec_out, total_out, spec_in = weight_spectra(W)
    proxy = spectral_proxy(spec_out, total_out, spec_in, lambda rank: float(rank) * 10)
    assert proxy("spatial", 3) == 30.0  # handed to the spatial estimate as it is
    for r in (1, 3, 5):
        assert proxy("output", r) == pytest.approx(np.sqrt(spec_out[r:].sum() / spec_out.sum()), rel=1e-12)
        assert proxy("tucker", r) == proxy("output", r)
        assert proxy("input", r) == pytest.approx(np.sqrt(spec_in[r:].sum() / spec_in.sum()), rel=1e-12)
    assert proxy("output", 10) == 0.0 and proxy("input", 6) == 0.0
    # The output-side proxy is the relative Frobenius error of the truncated weights (Eckart-Young).
    u = weight_output_basis(W, 4)
    w_r = (u @ u.T @ W.reshape(10, -1)).reshape(W.shape)
    assert proxy("output", 4) == pytest.approx(rel_error(w_r, W), rel=1e-9)


def test_spectrum_is_the_eigenvalues_largest_first() -> None:
    a = RNG.standard_normal((7, 7))
    m = a @ a.T
    got = spectrum(m)
    assert np.all(np.diff(got) <= 0)
    np.testing.assert_allclose(got, np.sort(np.linalg.eigvalsh(m))[::-1], rtol=1e-4, atol=1e-4)
