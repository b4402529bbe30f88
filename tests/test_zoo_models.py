"""The classic-architecture builders (models/zoo.py): checked in full, run in onnxruntime, deterministic, and
their MACs and parameter counts match the published figures within 3%.

Published figures (MACs; torchvision's model docs list "GFLOPS" that are in fact multiply-accumulates):

* torchvision 0.2x docs, https://pytorch.org/vision/stable/models.html (per-weights tables):
  resnet18 1.81 G / 11.7 M params, resnet50 4.09 G / 25.6 M (v1.5), vgg16 15.47 G / 138.4 M,
  squeezenet1_0 0.82 G / 1.25 M, squeezenet1_1 0.35 G / 1.24 M, mobilenet_v2 0.30 G / 3.5 M.
* MobileNetV2: Sandler et al. 2018, Table 4: 300 M multiply-adds, 3.4 M params (torchvision: 3.5 M).
* GoogLeNet: Szegedy et al. 2015, "Going deeper with convolutions", Table 1, whose "ops" column sums to
  1,586 M (the text rounds it to "1.5 billion multiply-adds"); torchvision's googlenet (1.50 G) is a variant
  with a 3x3 conv in the "5x5" branch, so the paper's table is the figure to match here.

Our parameter counts include BatchNormalization's running mean and variance (torchvision counts them as
buffers), a < 1.2% difference on these nets.

VGG-16 (553 MB of weights, 15.5 GMACs) is built once and held in memory only; it is not run here.

The U-Net has no published figure (its widths are ours: VGG16-BN's halved); its MACs are checked against
its layer table written out below, conv by conv.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models import zoo
from rewriter.analysis import analyze
from rewriter.model import Model
from rewriter.pipeline import optimize
from rewriter.validation.judge import ValidationConfig
from tests.helpers import assert_same_outputs, feeds_for, ops, run_reference

#: name -> (published MACs, published params or None).
PUBLISHED = {
    "resnet18": (1.81e9, 11.7e6),
    "resnet50": (4.09e9, 25.6e6),
    "vgg16": (15.47e9, 138.4e6),
    "googlenet": (1.586e9, None),
    "squeezenet1_0": (0.82e9, 1.25e6),
    "squeezenet1_1": (0.35e9, 1.24e6),
    "mobilenetv2": (0.30e9, 3.5e6),
}
CLASSIFIERS = [n for n in zoo.BUILDERS if n != "unet"]
SMALL = [n for n in CLASSIFIERS if n != "vgg16"]
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def built() -> dict[str, onnx.ModelProto]:
    return {name: zoo.build(name) for name in SMALL}


def _within(value: float, published: float) -> bool:
    return abs(value - published) <= TOLERANCE * published


def test_every_classifier_has_a_published_figure() -> None:
    assert set(PUBLISHED) == set(CLASSIFIERS)


@pytest.mark.parametrize("name", SMALL)
def test_checks_in_full_and_runs(name: str, built: dict[str, onnx.ModelProto]) -> None:
    model = built[name]
    onnx.checker.check_model(model, full_check=True)
    (out,) = run_reference(model, feeds_for(model, count=1))[0]
    assert out.shape == (1, zoo.CLASSES)
    assert np.all(np.isfinite(out)) and 0.1 < float(out.std()) < 100.0  # random nets keep a sane scale


@pytest.mark.parametrize("name", SMALL)
def test_macs_and_params_match_published(name: str, built: dict[str, onnx.ModelProto]) -> None:
    analysis = analyze(Model.from_source(built[name]))
    macs, params = PUBLISHED[name]
    assert _within(analysis.total_macs, macs), f"{name}: {analysis.total_macs / 1e9:.3f} G MACs vs published {macs / 1e9:.3f} G"
    if params is not None:
        assert _within(analysis.total_params, params), f"{name}: {analysis.total_params / 1e6:.2f} M params vs {params / 1e6:.2f} M"


def test_vgg16_macs_and_params() -> None:
    # The builder runs onnx.checker's full check before returning (NetBuilder.model); not repeated here
    # (serializing 553 MB twice is the slow part of this test).
    model = zoo.build_vgg16()
    analysis = analyze(Model.from_source(model))
    macs, params = PUBLISHED["vgg16"]
    assert _within(analysis.total_macs, macs) and _within(analysis.total_params, params)
    assert analysis.histogram == {"Conv": 13, "Relu": 15, "MaxPool": 5, "Flatten": 1, "Gemm": 3}


def test_googlenet_matches_table_1_layer_by_layer(built: dict[str, onnx.ModelProto]) -> None:
    """Each row of Table 1 (Szegedy et al. 2015), in millions of MACs, rounded as the paper rounds.

    Row 5a is left out: its "ops" (54 M) and "params" (1072 K) cells disagree with the row's own filter
    counts (256, 160/320, 32/128, 128 -- the same as Caffe's bvlc_googlenet), which give 51.1 M and 1042 K.
    """
    table = {"conv1_": 118, "conv2": 360, "inc3a_": 128, "inc3b_": 304, "inc4a_": 73, "inc4b_": 88, "inc4c_": 100,
             "inc4d_": 119, "inc4e_": 170, "inc5b_": 71, "fc_": 1}
    costs = analyze(Model.from_source(built["googlenet"])).nodes
    for prefix, millions in table.items():
        ours = sum(c.macs for c in costs if c.name.startswith(prefix)) / 1e6
        assert abs(ours - millions) <= 1.0, f"{prefix}: {ours:.1f} M vs Table 1's {millions} M"


def test_bottleneck_structure(built: dict[str, onnx.ModelProto]) -> None:
    """What the exact passes and the bottleneck pass look for is there."""
    hist = {name: analyze(Model.from_source(m)).histogram for name, m in built.items()}
    assert hist["resnet50"]["BatchNormalization"] == hist["resnet50"]["Conv"] == 53
    assert hist["resnet18"]["BatchNormalization"] == 20
    assert hist["mobilenetv2"]["BatchNormalization"] == 52 and hist["mobilenetv2"]["Clip"] == 35
    assert hist["googlenet"]["Concat"] == 9 and hist["googlenet"]["LRN"] == 2
    assert hist["squeezenet1_1"]["Concat"] == 8
    dense_kxk = [c for c in analyze(Model.from_source(built["resnet50"])).nodes if c.is_dense_kxk_conv]
    assert len(dense_kxk) == 17  # sixteen 3x3 plus the 7x7 stem


# -- U-Net ---------------------------------------------------------------------------------------------

#: The U-Net's convs at 256x384: (output pixels, in channels, out channels, kernel), encoder then decoder.
P1, P2, P3, P4, P5 = 256 * 384, 128 * 192, 64 * 96, 32 * 48, 16 * 24
UNET_CONVS = [
    (P1, 3, 32, 3), (P1, 32, 32, 3),
    (P2, 32, 64, 3), (P2, 64, 64, 3),
    (P3, 64, 128, 3), (P3, 128, 128, 3), (P3, 128, 128, 3),
    (P4, 128, 256, 3), (P4, 256, 256, 3), (P4, 256, 256, 3),
    (P5, 256, 256, 3), (P5, 256, 256, 3), (P5, 256, 256, 3),
    (P4, 256 + 256, 128, 3), (P4, 128, 128, 3),  # decoder: Concat [upsampled, skip] -> two 3x3 convs
    (P3, 128 + 128, 64, 3), (P3, 64, 64, 3),
    (P2, 64 + 64, 32, 3), (P2, 32, 32, 3),
    (P1, 32 + 32, 16, 3), (P1, 16, 16, 3),
    (P1, 16, 1, 1),  # the head
]


@pytest.fixture(scope="module")
def unet() -> onnx.ModelProto:
    return zoo.build("unet")


def test_unet_structure(unet: onnx.ModelProto) -> None:
    assert ops(unet) == {"Conv": 22, "BatchNormalization": 21, "Relu": 21, "MaxPool": 4, "Resize": 4, "Concat": 4, "Sigmoid": 1}
    resize = next(n for n in unet.graph.node if n.op_type == "Resize")
    assert {a.name: a.s for a in resize.attribute} == {"mode": b"nearest", "coordinate_transformation_mode": b"asymmetric", "nearest_mode": b"floor"}
    analysis = analyze(Model.from_source(unet))
    assert analysis.total_macs == sum(p * cin * cout * k * k for p, cin, cout, k in UNET_CONVS)
    assert round(analysis.total_macs / 1e9, 2) == 12.09  # the module docstring's table
    weights = sum(cin * cout * k * k for _, cin, cout, k in UNET_CONVS) + 1  # + the head's bias
    bn = 4 * sum(cout for _, _, cout, k in UNET_CONVS if k == 3)  # scale, bias, mean, var
    assert analysis.total_params == weights + bn + 4 * 4  # + the Resize scales (4 floats each)
    dense = [c for c in analysis.nodes if c.is_dense_kxk_conv]
    assert len(dense) == 21 and {c.kernel for c in dense} == {(3, 3)}
    assert {c.name for c, _ in analysis.expensive_convs()} == {c.name for c in dense}  # what the bottleneck pass ranks


def test_unet_runs_at_256x384(unet: onnx.ModelProto) -> None:
    model = Model.from_source(unet)
    assert model.input_shapes == {"input": (1, 3, 256, 384)}  # the symbolic batch taken as 1
    (out,) = run_reference(unet, feeds_for(unet, count=1))[0]
    assert out.shape == (1, 1, 256, 384)
    assert np.all((out > 0) & (out < 1)) and 0.01 < float(out.std()) < 0.5  # probabilities, not saturated


def test_unet_other_sizes_and_batch() -> None:
    model = zoo.build_unet(batch=2, height=64, width=96)
    (out,) = run_reference(model, feeds_for(model, count=1))[0]
    assert out.shape == (2, 1, 64, 96)
    with pytest.raises(ValueError, match="divisible by 16"):
        zoo.build_unet(height=100)


def test_unet_exact_optimize_folds_every_batchnorm(unet: onnx.ModelProto) -> None:
    result = optimize(unet, config=ValidationConfig(latency=False))
    after = ops(result.model)
    assert "BatchNormalization" not in after and after["Conv"] == 22 and after["Resize"] == after["Concat"] == 4
    assert_same_outputs(unet, result.model, feeds=feeds_for(unet, count=2), rtol=1e-4)


def test_deterministic_by_seed() -> None:
    assert zoo.build_squeezenet1_1(0).SerializeToString() == zoo.build_squeezenet1_1(0).SerializeToString()
    assert zoo.build_squeezenet1_1(0).SerializeToString() != zoo.build_squeezenet1_1(1).SerializeToString()


def test_fixed_batch_runs() -> None:
    model = zoo.build_squeezenet1_1(batch=2)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 224, 224]
    (out,) = run_reference(model, feeds_for(model, count=1))[0]
    assert out.shape == (2, zoo.CLASSES)


def test_unknown_name() -> None:
    with pytest.raises(KeyError, match="unknown model"):
        zoo.build("alexnet")


def test_cli_writes_a_loadable_model(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "sq.onnx"
    monkeypatch.setattr("sys.argv", ["zoo", "squeezenet1_1", str(out), "--batch", "1"])
    zoo.main()
    loaded = onnx.load(out)
    onnx.checker.check_model(loaded, full_check=True)
    assert loaded.graph.output[0].name == "logits"
