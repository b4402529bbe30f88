"""bottleneck: factorization math alone, the rewrite's plumbing, and data-aware vs weight-only fits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from passes.bottleneck import (
    Bottleneck,
    ConvGeometry,
    HeldOut,
    RidgeSolver,
    column_responses,
    consumer_metric,
    _Site,
    extract_patches,
    factor_spatial,
    factor_input,
    factor_output,
    factor_tucker,
    input_basis,
    metric_basis,
    output_basis,
    project_taps,
    rank_grid,
    ridge_fit,
    ridge_fit_through_relu,
    round_rank,
    sample_positions,
    spatial_errors,
    split_geometry,
    tap_correlation,
    tap_products,
    weight_input_basis,
    weight_output_basis,
)
import onnx_graphsurgeon as gs

from rewriter.contract import Candidate
from rewriter.model import Model
from rewriter.pipeline import apply_pass
from tests.helpers import assert_same_outputs, ops, parse, run_reference

GEOMETRIES = [
    ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ConvGeometry((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    ConvGeometry((3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    ConvGeometry((5, 3), (1, 2), (2, 1, 2, 1), (1, 1)),
    ConvGeometry((3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
]


def conv_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, geo: ConvGeometry) -> np.ndarray:
    """Direct convolution through im2col at every output position."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = geo.kernel, geo.strides, geo.pads, geo.dilations
    n, _, h, wd = x.shape
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    pos = sample_positions(n, ho, wo, n * ho * wo, np.random.default_rng(0))
    y = extract_patches(x, geo, pos) @ w.reshape(w.shape[0], -1).T + (0 if b is None else b)
    return y.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)


def pointwise(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    y = np.einsum("oc,nchw->nohw", w.reshape(w.shape[0], w.shape[1]), x)
    return y if b is None else y + b[None, :, None, None]


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
    true = [_rel_error(conv_ref(conv_ref(x, *factor_spatial(w, r)[:1], None, rows), factor_spatial(w, r)[1], None, cols), want) for r in ranks]
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
        true = _rel_error(conv_ref(conv_ref(smooth, a, None, rows), b, None, cols), want)
        est = spatial_errors(w, second, [r], r_smooth)[r]
        assert 0.5 * true < est < 2.0 * true, (r, est, true)


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_error_decreases_with_rank() -> None:
    geo = GEOMETRIES[0]
    want = conv_ref(X, W, B, geo)
    out_errs, in_errs = [], []
    for r in (2, 4, 6, 8, 10):
        w1, b1, w2, b2 = factor_output(W, B, weight_output_basis(W, r), None)
        out_errs.append(_rel_error(pointwise(conv_ref(X, w1, b1, geo), w2, b2), want))
    for r in (1, 2, 4, 6):
        w1, w2 = factor_input(W, weight_input_basis(W, r))
        in_errs.append(_rel_error(conv_ref(pointwise(X, w1, None), w2, B, geo), want))
    assert all(a > b for a, b in zip(out_errs, out_errs[1:])) and out_errs[-1] < 1e-9
    assert all(a > b for a, b in zip(in_errs, in_errs[1:])) and in_errs[-1] < 1e-9


def test_output_basis_is_pca_of_responses() -> None:
    y = RNG.standard_normal((500, 3)) @ RNG.standard_normal((3, 8)) + 5.0  # rank-3 responses around a mean
    u, mu = output_basis(y, 3)
    np.testing.assert_allclose(mu, y.mean(axis=0))
    recon = (y - mu) @ u @ u.T + mu
    np.testing.assert_allclose(recon, y, atol=1e-9)


def test_ridge_fit_recovers_a_linear_map_and_relu_fit_ignores_dead_zone() -> None:
    p = RNG.standard_normal((2000, 5))
    a_true, c_true = RNG.standard_normal((3, 5)), RNG.standard_normal(3)
    a, c = ridge_fit(p, p @ a_true.T + c_true, ridge=1e-9)
    np.testing.assert_allclose(a, a_true, atol=1e-6)
    np.testing.assert_allclose(c, c_true, atol=1e-6)
    # Through a ReLU: targets below zero may be matched by anything below zero.
    y = p @ a_true.T + c_true
    a2, c2 = ridge_fit_through_relu(p, y, None, None, ridge=1e-9)
    pred = p @ a2.T + c2
    np.testing.assert_allclose(np.maximum(pred, 0), np.maximum(y, 0), atol=1e-5)


def test_ridge_prior_pulls_towards_the_projected_weights_when_data_are_scarce() -> None:
    p = RNG.standard_normal((12, 40))  # fewer samples than features: the data alone cannot fix A
    a_prior = RNG.standard_normal((3, 40))
    z = p @ a_prior.T + 0.01 * RNG.standard_normal((12, 3))
    solver = RidgeSolver(p, ridge=1.0)
    a_zero, _ = solver.fit(z)
    a_near, _ = solver.fit(z, a_prior)
    assert np.linalg.norm(a_near - a_prior) < 0.2 * np.linalg.norm(a_zero - a_prior)
    # Plenty of data: the prior hardly matters and the map is recovered either way.
    p = RNG.standard_normal((4000, 6))
    a_true = RNG.standard_normal((2, 6))
    solver = RidgeSolver(p, ridge=1e-6)
    for prior in (None, np.zeros((2, 6)), 5 * a_true):
        a, c = solver.fit(p @ a_true.T + 1.5, prior)
        np.testing.assert_allclose(a, a_true, atol=1e-4)
        np.testing.assert_allclose(c, 1.5, atol=1e-4)
        np.testing.assert_allclose(solver.predict(a, c), p @ a.T + c, atol=1e-4)


@pytest.mark.parametrize("features", [15, 200])  # more / fewer training rows (120 per fold) than features
def test_held_out_error_matches_a_ridge_fit_on_the_other_feeds(features: int) -> None:
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(6), 40)
    p = rng.standard_normal((240, features)).astype(np.float32)
    z = p @ rng.standard_normal((features, 4)) + 0.3 * rng.standard_normal((240, 4))
    prior = rng.standard_normal((4, features))
    held = HeldOut(p, groups, folds=2)
    errors = held.errors(z, (1e-3, 0.5), prior)
    for ridge in (1e-3, 0.5):  # the SVD shortcut equals fitting on even feeds, predicting odd ones (and back)
        num = den = 0.0
        for f in (0, 1):
            test = groups % 2 == f
            a, c = RidgeSolver(p[~test], ridge).fit(z[~test], prior)
            num += float(((p[test] @ a.T + c - z[test]) ** 2).sum())
            den += float(((z[test] - z[test].mean(axis=0)) ** 2).sum())
        assert errors[ridge] == pytest.approx(num / den, rel=1e-3)


def test_held_out_ridge_is_small_with_plenty_of_data_and_large_when_data_are_scarce() -> None:
    rng = np.random.default_rng(4)
    grid = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 3.0)
    # Plenty of samples per weight and a clean linear target: no pull towards the (wrong) prior.
    groups = np.repeat(np.arange(8), 500)
    p = rng.standard_normal((4000, 6))
    a_true = rng.standard_normal((3, 6))
    ridge, err = HeldOut(p, groups).best(p @ a_true.T, grid, prior=np.zeros((3, 6)))
    assert ridge == 1e-4 and err is not None and err < 1e-6
    # Fewer samples than weights, truth near the prior: a strong pull predicts unseen feeds far better.
    groups = np.repeat(np.arange(8), 10)
    p = rng.standard_normal((80, 200))
    prior = rng.standard_normal((3, 200))
    z = p @ (prior + 0.05 * rng.standard_normal((3, 200))).T + rng.standard_normal((80, 3))
    held = HeldOut(p, groups)
    ridge, err = held.best(z, grid, prior)
    scores = held.errors(z, grid, prior)
    assert ridge >= 0.1 and err == min(scores.values()) < scores[1e-4]
    # One feed: nothing to hold out, the default comes back.
    assert HeldOut(p, np.zeros(80, dtype=int)).best(z, grid, prior, default=7.0) == (7.0, None)


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


def test_consumer_metric_reads_through_a_relu_and_declines_other_readers() -> None:
    graph = gs_graph("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X) => (float[1, 3, 6, 6] Y, float[1, 5, 6, 6] Z)
        <float[5, 4, 3, 3] W, float[3, 5, 1, 1] Wn, float[5, 4, 3, 3] W2> {
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W)
            R = Relu (A)
            Y = Conv <kernel_shape = [1, 1]> (R, Wn)
            B = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W2)
            Z = Relu (B)
        }
    """)
    convs = {n.outputs[0].name: n for n in graph.nodes if n.op == "Conv"}
    wn = convs["Y"].inputs[1].values[:, :, 0, 0].astype(np.float64)
    np.testing.assert_allclose(consumer_metric(convs["A"]), wn.T @ wn, rtol=1e-6)
    assert consumer_metric(convs["B"]) is None  # read by a graph output, not a conv


CONV_MODEL = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 32, 12, 10] X) => (float[1, {o}, {ho}, {wo}] Y)
    <float[{o}, 32, 3, 3] W, float[{o}] B> {{
        Y = Conv <kernel_shape = [3, 3], strides = [{s}, {s}], pads = [{p}, {p}, {p}, {p}], dilations = [{d}, {d}]> (X, W, B)
    }}
"""


def gs_graph(text: str) -> gs.Graph:
    return gs.import_onnx(parse(text))


def conv_model(s: int = 1, p: int = 1, d: int = 1, o: int = 48) -> onnx.ModelProto:
    ho = (12 + 2 * p - d * 2 - 1) // s + 1
    wo = (10 + 2 * p - d * 2 - 1) // s + 1
    return parse(CONV_MODEL.format(s=s, p=p, d=d, ho=ho, wo=wo, o=o))


@pytest.mark.parametrize("mode", ["output", "input", "tucker", "spatial"])
@pytest.mark.parametrize("s,p,d", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 0, 1)])
def test_rewrite_carries_geometry_and_bias_exactly_at_full_rank(mode: str, s: int, p: int, d: int) -> None:
    """Full rank through the real rewrite: every attribute carried over, outputs equal (weight-only bases)."""
    model = conv_model(s, p, d, o=32)  # C = O = 32: rank 32 is full on every side
    m = Model.from_source(model)
    trial = m.fork()
    bneck = Bottleneck(modes=(mode,))
    node = trial.node(m.proto.graph.node[0].name)
    site = bneck._site(trial, node)
    assert isinstance(site, _Site)
    bneck._rewrite(trial, site, bneck.fitter.layers(trial, site, mode, 96 if mode == "spatial" else 32))  # spatial: min(C*kh, O*kw)
    result = trial.commit().proto
    onnx.checker.check_model(result, full_check=True)
    assert ops(result) == {"Conv": 2 if mode != "tucker" else 3}
    assert_same_outputs(model, result, rtol=1e-4, atol=1e-4)


def test_pass_finds_ranks_on_the_grid_and_rewrites() -> None:
    model = conv_model()
    found = list(Bottleneck(rank_fractions=(0.25, 0.5)).find(Model.from_source(model)))
    ranks = sorted({(c.options["mode"], c.options["rank"]) for c in found})
    # input at 0.5 -> 16 too; spatial ranks are fractions (0.5, 0.75, 1) of min(C, O) = 32, rounded to 16
    assert ranks == [("input", 16), ("output", 16), ("output", 32), ("spatial", 16), ("spatial", 32)]
    assert all(c.cost.macs_after < c.cost.macs_before for c in found)
    result = apply_pass(model, Bottleneck(rank_fractions=(0.5,), modes=("output",)))
    assert ops(result.model) == {"Conv": 2}
    assert len(result.applied) == 1  # its own output convs are never factorized again


def test_grouped_and_1x1_convs_are_left_alone() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 32, 8, 8] X) => (float[1, 32, 8, 8] Y)
        <float[32, 16, 3, 3] W, float[32, 32, 1, 1] P> {
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 2> (X, W)
            Y = Conv <kernel_shape = [1, 1]> (A, P)
        }
    """)
    result = apply_pass(model, Bottleneck())
    assert not result.modified
    assert any("grouped" in s.reason for s in result.skipped)


def test_unknown_options_are_rejected() -> None:
    with pytest.raises(TypeError, match="unknown option"):
        Bottleneck(rank=3)
    with pytest.raises(TypeError, match="unknown mode"):
        Bottleneck(modes=("sideways",))


@pytest.mark.parametrize("mode,rank,factor", [("output", 16, 0.5), ("spatial", 32, 0.9)])
def test_data_aware_fit_beats_weight_only_on_a_trained_conv(mode: str, rank: int, factor: float) -> None:
    """On the trained digits CNN, the calibrated factorization of a 64->64 3x3 conv keeps the network's
    held-out outputs far closer than weight-only SVD at the same rank."""
    pytest.importorskip("sklearn")
    from pathlib import Path

    from models.digits import load_split
    from rewriter.validation.calibration import Calibration

    x_train, _, x_test, _ = load_split()
    calib_feeds = [{"input": x_train[i : i + 8]} for i in range(0, 64, 8)]
    judge_feeds = [{"input": x_test[i : i + 32]} for i in range(0, 256, 32)]
    path = Path(__file__).resolve().parents[1] / "models" / "digits" / "digits_cnn.onnx"
    original = Model.from_source(path, {"input": (8, 1, 32, 32)})
    convs = [n for n in original.graph.nodes if n.op == "Conv" and const_value_shape(n) == (64, 64, 3, 3)]
    assert convs, "the digits CNN has a 64->64 3x3 conv"
    name = convs[0].name
    errors = {}
    for label, calibration in (("data", Calibration(original, calib_feeds)), ("weights", None)):
        trial = original.fork()
        bneck = Bottleneck(modes=(mode,))
        bneck.use_calibration(calibration)
        site = bneck._site(trial, trial.node(name))
        bneck._rewrite(trial, site, bneck.fitter.layers(trial, site, mode, rank))
        ref = run_reference(original.proto, judge_feeds)
        got = run_reference(trial.commit().proto, judge_feeds)
        errors[label] = float(np.mean([_rel_error(g[0], r[0]) for g, r in zip(got, ref)]))
    assert errors["data"] < factor * errors["weights"], errors


def const_value_shape(node) -> tuple[int, ...] | None:  # type: ignore[no-untyped-def]
    from rewriter.graph import const_value

    v = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if v is None else tuple(v.shape)


def test_tap_projection_and_column_responses_equal_their_einsums() -> None:
    rng = np.random.default_rng(5)
    p = rng.standard_normal((7, 4 * 3 * 2)).astype(np.float32)
    v = rng.standard_normal((4, 3)).astype(np.float32)
    expected = np.einsum("mck,cr->mrk", p.reshape(7, 4, 6), v).reshape(7, -1)
    np.testing.assert_allclose(project_taps(p, 4, 6, v), expected, rtol=1e-5, atol=1e-5)
    a = rng.standard_normal((5, 4, 3)).astype(np.float32)
    expected = np.einsum("mchw,rch->mrw", p.reshape(7, 4, 3, 2), a).reshape(7, -1)
    np.testing.assert_allclose(column_responses(p, (4, 3, 2), a), expected, rtol=1e-5, atol=1e-5)


def test_a_stronger_variant_replaces_a_milder_one_kept_before_and_the_plan_replays_it() -> None:
    from dataclasses import replace as dc_replace

    from rewriter.plan import apply_plan, plan_from_result
    from rewriter.pipeline import optimize
    from rewriter.validation.judge import ValidationConfig
    from rewriter.validation.numerics import Budget

    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 32, 8, 8] X) => (float[1, 32, 8, 8] Y)
        <float[32, 32, 3, 3] W, float[32] B> {
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W, B)
            Y = Relu (A)
        }
    """
    options = {"modes": ("output",), "rank_fractions": (0.5, 0.75), "rank_multiple": 8}

    class MildFirst(Bottleneck):
        """Rank 24 tried before rank 16 (separate families), so 16 arrives once 24 has replaced the conv."""

        def find(self, model):  # type: ignore[no-untyped-def]
            for c in super().find(model):
                yield dc_replace(c, family=f"{c.family}:{c.options['rank']}", priority=float(c.options["rank"])) if isinstance(c, Candidate) else c

    original = Model.from_source(parse(text))
    bneck = MildFirst(**options)
    r24, r16 = sorted((c for c in bneck.find(original) if isinstance(c, Candidate)), key=lambda c: -c.options["rank"])
    first = original.fork()
    bneck.apply(first, r24)
    first = first.commit()
    assert bneck.refresh(first, r24) is None  # no fewer MACs than what is there
    fresh = bneck.refresh(first, r16)
    assert fresh is not None and all("_bneck" in n for n in fresh.nodes) and len(fresh.nodes) == 2
    assert fresh.cost.macs_before == r24.cost.macs_after and fresh.cost.macs_after == r16.cost.macs_after
    second = first.fork()
    bneck.apply(second, fresh)
    second = second.commit()
    direct = original.fork()
    bneck.apply(direct, r16)  # the same as factorizing the original at rank 16 straight away
    assert_same_outputs(direct.commit().proto, second.proto, rtol=0, atol=0)
    assert ops(second.proto) == {"Conv": 2, "Relu": 1}

    result = optimize(parse(text), [MildFirst(**options)], config=ValidationConfig(budget=Budget.parse("cosine>=0.1"), latency=False), screen=False)
    kept = [d for d in result.decisions if d.kept]
    assert [d.candidate.options["rank"] for d in kept] == [24, 16]
    assert kept[0].reason.endswith("later replaced by: " + kept[1].candidate.description) and kept[0].superseded
    assert result.in_model == kept[1:]
    assert "in place of its earlier factorization" in kept[1].candidate.description
    plan = plan_from_result(result, input_sha256=None, pass_options={"bottleneck": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}})
    replayed = apply_plan(parse(text), plan, available={"bottleneck": MildFirst})
    assert len(replayed.applied) == 2 and replayed.model.SerializeToString() == result.model.SerializeToString()
