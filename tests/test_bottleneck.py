"""bottleneck, the pass (passes/bottleneck/bottleneck_pass.py): the rewrite's plumbing, the grid of variants,
refreshing an earlier factorization, and data-aware vs weight-only fits through the calibration it is handed.
The math, the ridge solvers and the fitting have their own files (test_bottleneck_lowrank/_patches/_ridge/_fit)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from passes.bottleneck import Bottleneck, ConvGeometry, Site
from rewriter.contract import Candidate
from rewriter.model import Model
from rewriter.pipeline import apply_pass
from rewriter.validation.calibration import Calibration
from tests.bottleneck_support import conv_model, rel_error
from tests.helpers import assert_same_outputs, ops, parse, run_reference


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
    assert isinstance(site, Site)
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


@pytest.mark.parametrize(
    "attrs,inputs,want",
    [
        ("<kernel_shape = [3, 3], strides = [2, 1], pads = [1, 0, 1, 2], dilations = [1, 2]>", "X, W, B",
         ConvGeometry((3, 3), (2, 1), (1, 0, 1, 2), (1, 2))),
        ("<pads = [1, 2, 1, 2]>", "X, W", ConvGeometry((3, 3), (1, 1), (1, 2, 1, 2), (1, 1))),  # kernel from W
        ('<auto_pad = "VALID">', "X, W", ConvGeometry((3, 3), (1, 1), (0, 0, 0, 0), (1, 1))),
        ('<auto_pad = "NOTSET", pads = [1, 1, 1, 1]>', "X, W, ", ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1), (1, 1))),
        ('<auto_pad = "SAME_UPPER">', "X, W, B", "auto_pad SAME_* is not handled; export with explicit pads"),
        ('<auto_pad = "SAME_LOWER">', "X, W", "auto_pad SAME_* is not handled; export with explicit pads"),
        ("<pads = [1, 1, 1, 1]>", "X, W, Bx", "bias is not constant"),
    ],
)
def test_site_reads_the_geometry_and_bias_through_passes_common(attrs: str, inputs: str, want: object) -> None:
    """The conv's attributes as :func:`passes.common.conv_geometry` reads them, in the pass's 2-D geometry;
    the pass's own reasons for what it declines."""
    model = Model.from_source(parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 32, 12, 10] X, float[16] Bx) => (float[1, 16, H, W] Y)
        <float[16, 32, 3, 3] W, float[16] B> {{
            Y = Conv {attrs} ({inputs})
        }}
    """))
    site = Bottleneck()._site(model, model.graph.nodes[0])
    assert (site.geo if isinstance(site, Site) else site) == want
    if isinstance(site, Site):
        assert (site.b is None) == (inputs != "X, W, B")


@pytest.mark.parametrize("value,want", [(b"VALID", (0, 0, 0, 0)), (b"NOTSET", (1, 1, 1, 1)),
                                        (b"SAME_UPPER", "auto_pad SAME_* is not handled; export with explicit pads")])
def test_an_auto_pad_given_as_bytes_is_decoded(value: bytes, want: object) -> None:
    """A graph edited in process may hold ``auto_pad`` as bytes (a loaded one never does: onnx-graphsurgeon
    decodes string attributes); it reads as the text would."""
    model = Model.from_source(conv_model())
    node = model.graph.nodes[0]
    node.attrs["auto_pad"] = value
    if value == b"VALID":
        del node.attrs["pads"]
    site = Bottleneck()._site(model, node)
    assert (site.geo.pads if isinstance(site, Site) else site) == want


def test_unknown_options_are_rejected() -> None:
    with pytest.raises(TypeError, match="unknown option"):
        Bottleneck(rank=3)
    with pytest.raises(TypeError, match="unknown mode"):
        Bottleneck(modes=("sideways",))


def test_the_pass_is_data_aware_and_fits_on_the_calibration_it_is_handed(caplog: pytest.LogCaptureFixture) -> None:
    model = Model.from_source(conv_model())
    rng = np.random.default_rng(0)
    feeds = [{"X": rng.standard_normal((1, 32, 12, 10)).astype(np.float32)} for _ in range(3)]
    bneck = Bottleneck(modes=("output",))
    assert Bottleneck.data_aware and bneck.calibration is None and bneck.fitter.calibration is None
    plain = {c.key: c.error for c in bneck.find(model) if isinstance(c, Candidate)}
    with caplog.at_level(logging.WARNING, logger="passes.bottleneck"):
        for _ in range(2):
            trial = model.fork()
            bneck.apply(trial, next(c for c in bneck.find(model) if isinstance(c, Candidate)))
    assert sum("no calibration data" in r.getMessage() for r in caplog.records) == 1  # warned once
    cal = Calibration(model, feeds)
    bneck.use_calibration(cal)
    assert bneck.calibration is cal and bneck.fitter.calibration is cal
    assert not hasattr(model, "calibration")  # the model carries no service
    fitted = {c.key: c.error for c in bneck.find(model) if isinstance(c, Candidate)}
    assert fitted.keys() == plain.keys() and fitted != plain  # the same variants, estimated on the data
    bneck.use_calibration(None)  # withdrawn: weight-only again
    assert {c.key: c.error for c in bneck.find(model) if isinstance(c, Candidate)} == plain


@pytest.mark.parametrize("mode,rank,factor", [("output", 16, 0.5), ("spatial", 32, 0.9)])
def test_data_aware_fit_beats_weight_only_on_a_trained_conv(mode: str, rank: int, factor: float) -> None:
    """On the trained digits CNN, the calibrated factorization of a 64->64 3x3 conv keeps the network's
    held-out outputs far closer than weight-only SVD at the same rank."""
    pytest.importorskip("sklearn")
    from pathlib import Path

    from models.digits import load_split

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
        errors[label] = float(np.mean([rel_error(g[0], r[0]) for g, r in zip(got, ref)]))
    assert errors["data"] < factor * errors["weights"], errors


def const_value_shape(node) -> tuple[int, ...] | None:  # type: ignore[no-untyped-def]
    from rewriter.graph import const_value

    v = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if v is None else tuple(v.shape)


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
