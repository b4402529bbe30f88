"""bottleneck fitting on the calibration service (passes/bottleneck/fit.py): the consumer's metric, samples
of inputs and original outputs, bases and error estimates from calibration moments, cached and exact fits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from passes.bottleneck import (
    Bottleneck,
    BottleneckOptions,
    Fitter,
    Site,
    channels_last,
    consumer_metric,
    input_basis,
    output_basis,
    spectral_proxy,
    weight_only_layers,
    weight_spectra,
)
from rewriter.contract import CalibrationData, Candidate
from rewriter.model import Model
from rewriter.validation.calibration import Calibration
from tests.bottleneck_support import gs_graph
from tests.helpers import assert_same_outputs, parse

#: X -> 3x3 conv C0 (8 -> 8) -> 3x3 conv C1 (8 -> 16) -> ReLU -> 1x1 conv C2 (16 -> 8) -> Y.
MODEL = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 8, 10, 10] X) => (float[2, 8, 10, 10] Y)
    <float[8, 8, 3, 3] W0, float[8] B0, float[16, 8, 3, 3] W1, float[16] B1, float[8, 16, 1, 1] W2> {
        A0 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W0, B0)
        A1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (A0, W1, B1)
        R = Relu (A1)
        Y = Conv <kernel_shape = [1, 1]> (R, W2)
    }
"""
FEEDS = [{"X": np.random.default_rng(k).standard_normal((2, 8, 10, 10)).astype(np.float32)} for k in range(4)]


def setup(**options: Any) -> tuple[Model, Calibration, Site, Fitter]:
    """The model, a calibration service on it, the site of C1 and a fitter with ``options``."""
    model = Model.from_source(parse(MODEL))
    cal = Calibration(model, FEEDS)
    conv = next(n for n in model.graph.nodes if n.outputs[0].name == "A1")
    site = Bottleneck()._site(model, conv)
    assert isinstance(site, Site)
    return model, cal, site, Fitter("bottleneck", BottleneckOptions(**options), cal)


def projector(basis: np.ndarray) -> np.ndarray:
    q = np.linalg.qr(basis)[0]
    return q @ q.T


class CountingCalibration:
    """A calibration service that counts the model runs ``map`` makes (structurally a CalibrationData)."""

    def __init__(self, inner: Calibration) -> None:
        self.inner = inner
        self.original = inner.original
        self.feeds = inner.feeds
        self.runs = 0

    def map(self, model: Model, names: Sequence[str], fn: Callable[[int, dict[str, np.ndarray]], Any]) -> list[Any]:
        self.runs += 1
        return self.inner.map(model, names, fn)

    def __getattr__(self, name: str) -> Any:  # moments, memo, cached, lasting, has_lasting, lineage
        return getattr(self.inner, name)


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


def test_samples_gathered_through_files_are_the_samples_gathered_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past GATHER_BYTES a calibration run spools each conv's rows to a file: the same rows, one conv in memory at a time."""
    from passes.bottleneck import fit as fit_module

    model, _, _, fitter = setup(max_samples=60)
    sites = [Bottleneck()._site(model, n) for n in model.graph.nodes if n.op == "Conv" and n.outputs[0].name != "Y"]
    in_memory = fitter.sample_many(model, sites)  # type: ignore[arg-type]
    monkeypatch.setattr(fit_module, "GATHER_BYTES", 0)
    spooled_fitter = setup(max_samples=60)[3]
    assert spooled_fitter.sample_many(model, sites, fetch=False) == []  # gathered, none handed back
    spooled = spooled_fitter.sample_many(model, sites)  # type: ignore[arg-type]
    for a, b in zip(in_memory, spooled):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_samples_are_input_patches_and_original_outputs_at_the_same_positions() -> None:
    model, cal, site, fitter = setup(max_samples=60)
    p, y, groups = fitter.samples(model, site)
    assert p.shape == (60, 8 * 9) and y.shape == (60, 16)  # 15 positions from each of the 4 feeds
    np.testing.assert_array_equal(groups, np.repeat(np.arange(4), 15))
    w = site.w.reshape(16, -1).astype(np.float64)
    np.testing.assert_allclose(p @ w.T + site.b, y, rtol=1e-4, atol=1e-4)  # the conv applied to its patches
    again = fitter.samples(model, site)
    assert again[0] is p and again[1] is y  # cached for this version
    # More samples asked than positions exist: every position of every feed.
    p_all, _, groups_all = setup(max_samples=10_000)[3].samples(model, site)
    assert len(p_all) == 4 * 2 * 10 * 10 and np.bincount(groups_all).tolist() == [200] * 4


def test_samples_of_a_later_version_take_its_inputs_and_the_originals_outputs() -> None:
    model, cal, site, fitter = setup(max_samples=60)
    p0, y0, _ = fitter.samples(model, site)
    trial = model.fork()  # C0 doubled: C1's inputs double, the targets stay the original's
    c0 = next(n for n in trial.graph.nodes if n.outputs[0].name == "A0")
    c0.inputs[1] = gs.Constant("W0_x2", c0.inputs[1].values * 2)
    c0.inputs[2] = gs.Constant("B0_x2", c0.inputs[2].values * 2)
    version = trial.commit()
    site_v = Bottleneck()._site(version, next(n for n in version.graph.nodes if n.outputs[0].name == "A1"))
    assert isinstance(site_v, Site)
    p1, y1, _ = fitter.samples(version, site_v)
    np.testing.assert_allclose(p1, 2 * p0, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y1, y0)


def test_prefetch_gathers_every_convs_samples_in_one_run_of_each_model() -> None:
    model = Model.from_source(parse(MODEL))
    counting = CountingCalibration(Calibration(model, FEEDS))
    assert isinstance(counting, CalibrationData)
    bneck = Bottleneck(modes=("output",), rank_multiple=4)
    bneck.use_calibration(counting)
    found = [c for c in bneck.find(model) if isinstance(c, Candidate)]
    assert {c.nodes[0] for c in found} == {n.name for n in model.graph.nodes if n.op == "Conv" and n.inputs[1].name != "W2"}
    runs = counting.runs
    bneck.prefetch(model, found)
    assert counting.runs == runs + 2  # targets from the original, inputs from this version: both convs at once
    for c in found:
        site = bneck._site(model, model.node(c.nodes[0]))
        assert isinstance(site, Site)
        bneck.fitter.samples(model, site)
    assert counting.runs == runs + 2  # later samples come from the service's cache


def test_weight_only_error_proxies_are_the_weight_spectra() -> None:
    model, _, site, fitter = setup()
    proxy = Fitter("bottleneck", fitter.options, None).error_proxies(model, [site])[site.conv.name]
    want = spectral_proxy(*weight_spectra(site.w), lambda r: 0.0)
    for mode in ("output", "input", "tucker"):
        for r in (2, 4, 8):
            assert proxy(mode, r) == want(mode, r)


def test_data_aware_error_proxies_are_the_residual_energy_of_the_calibration_moments() -> None:
    model, cal, site, fitter = setup(consumer_metric=False)
    proxy = fitter.error_proxies(model, [site])[site.conv.name]
    y = channels_last(cal.reference(["A1"])["A1"]).astype(np.float64)
    x = channels_last(cal.of(model, ["A0"])["A0"]).astype(np.float64)
    cov = np.cov(y.T, bias=True)
    out_eig = np.sort(np.linalg.eigvalsh(cov))[::-1]
    in_eig = np.sort(np.linalg.eigvalsh(x.T @ x / len(x)))[::-1]
    total = float(np.mean(np.sum(y * y, axis=1)))  # trace of the uncentred second moment
    for r in (2, 8, 12):
        assert proxy("output", r) == pytest.approx(np.sqrt(out_eig[r:].sum() / total), rel=1e-3, abs=1e-4)
    for r in (2, 4, 6):
        assert proxy("input", r) == pytest.approx(np.sqrt(in_eig[r:].sum() / in_eig.sum()), rel=1e-3, abs=1e-4)
    assert proxy("output", 16) == 0.0 and proxy("input", 8) == 0.0
    # In the consumer's norm (C2 reads C1 through the ReLU): other numbers, the same shape.
    metric = fitter_with(fitter, consumer_metric=True).error_proxies(model, [site])[site.conv.name]
    errs = [metric("output", r) for r in (2, 4, 8, 12, 16)]
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] == 0.0 and errs[0] != proxy("output", 2)


def fitter_with(fitter: Fitter, **options: Any) -> Fitter:
    from dataclasses import replace

    return replace(fitter, options=replace(fitter.options, **options))


def test_bases_are_pca_of_the_original_output_and_the_inputs_uncentred_moment() -> None:
    model, cal, site, fitter = setup(consumer_metric=False, max_samples=10_000)
    y = channels_last(cal.reference(["A1"])["A1"]).astype(np.float64)
    x = channels_last(cal.of(model, ["A0"])["A0"]).astype(np.float64)
    u, mu, coords = fitter.output_basis(model, site, 5)
    assert coords is None
    want_u, want_mu = output_basis(y, 5)
    np.testing.assert_allclose(mu, want_mu, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(projector(u), projector(want_u), atol=1e-4)
    want_v = projector(input_basis(x, 3))
    np.testing.assert_allclose(projector(fitter.input_basis(model, site, 3)), want_v, atol=1e-4)  # from the samples' centre taps
    no_refit = fitter_with(fitter, refit=False)
    model2, _, site2, _ = setup()
    np.testing.assert_allclose(projector(Fitter("bottleneck", no_refit.options, Calibration(model2, FEEDS)).input_basis(model2, site2, 3)),
                               want_v, atol=1e-4)  # from the channel moments
    # In the consumer's norm: a basis and the coordinates that read it.
    u_m, _, p_m = fitter_with(fitter, consumer_metric=True).output_basis(model, site, 5)
    assert p_m is not None
    np.testing.assert_allclose(p_m.T @ u_m, np.eye(5), atol=1e-8)


def test_layers_are_weight_only_without_calibration_and_kept_by_lineage_with_it() -> None:
    model, cal, site, fitter = setup()
    alone = Fitter("bottleneck", fitter.options, None).layers(model, site, "output", 8)
    for (w, b, g), (w2, b2, g2) in zip(alone, weight_only_layers(site.w, site.b, site.geo, "output", 8)):
        np.testing.assert_array_equal(w, w2)
        np.testing.assert_array_equal(b, b2)
        assert g == g2
    fitted = fitter.layers(model, site, "output", 8)
    assert fitter.layers(model.fork(), site, "output", 8) is fitted  # same lineage of the conv's input: same fit
    for (w, b, _), (w2, b2, _) in zip(fitted, fitter.fit(model, site, "output", 8)):
        np.testing.assert_array_equal(w, w2)
        np.testing.assert_array_equal(b, b2)
    assert not np.allclose(fitted[0][0], alone[0][0])  # the data changed the fit


def test_sampling_without_calibration_is_refused() -> None:
    model, _, site, fitter = setup()
    with pytest.raises(RuntimeError, match="no calibration data"):
        Fitter("bottleneck", fitter.options, None).samples(model, site)


@pytest.mark.parametrize("mode,rank,conv", [("output", 16, "A1"), ("input", 8, "A1"), ("tucker", 8, "A0"), ("spatial", 24, "A1")])
def test_data_aware_fits_are_exact_at_full_rank(mode: str, rank: int, conv: str) -> None:
    """At full rank the projected weights are exact and the refit (pulled towards them) keeps them so.
    (Tucker-2 is full on both sides only for C = O: C0, 8 -> 8.)"""
    model, cal, _, _ = setup()
    bneck = Bottleneck(modes=(mode,))
    bneck.use_calibration(cal)
    trial = model.fork()
    site = bneck._site(trial, next(n for n in trial.graph.nodes if n.outputs[0].name == conv))
    assert isinstance(site, Site)
    bneck._rewrite(trial, site, bneck.fitter.layers(trial, site, mode, rank))
    result = trial.commit().proto
    assert sum(n.op_type == "Conv" for n in result.graph.node) == (5 if mode == "tucker" else 4)
    assert_same_outputs(model.proto, result, rtol=1e-3, atol=1e-3)
