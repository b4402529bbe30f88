"""Deterministic builders of classic CNN architectures, for structure and latency benchmarks.

Each ``build_<name>(seed=0, batch="N")`` returns a checked ``onnx.ModelProto`` (opset 17) with the
published layer configuration and seeded random weights (He-normal; see :mod:`models.builder`). **Random
weights are for structure and latency only**: their spectra are flat, so they say nothing about how much
accuracy a lossy rewrite costs on a trained network (use the corpus models for that).

=================  =============================================================================  =========
name               architecture (what is built)                                                   MACs
=================  =============================================================================  =========
``resnet18``       ResNet-18 (He et al. 2016; torchvision layout), BatchNormalization after       1.82 G
                   every conv
``resnet50``       ResNet-50 v1.5 (stride on the 3x3 of the bottleneck, as torchvision), BN       4.09 G
``vgg16``          VGG-16 configuration D (Simonyan & Zisserman 2015), no BN, 138 M parameters    15.47 G
``googlenet``      GoogLeNet / Inception-v1 as in Szegedy et al. 2015, Table 1: LRN, 1x1           1.59 G
                   reductions before the 3x3 and 5x5 convs, no BN, no auxiliary heads
``squeezenet1_0``  SqueezeNet 1.0 (Iandola et al. 2016): fire modules, 7x7/96 stem                 0.82 G
``squeezenet1_1``  SqueezeNet 1.1: 3x3/64 stem, earlier pooling                                   0.35 G
``mobilenetv2``    MobileNetV2 width 1.0 (Sandler et al. 2018): inverted residuals, depthwise      0.30 G
                   3x3, ReLU6 as Clip(0, 6), BN
``unet``           U-Net (Ronneberger et al. 2015) on a VGG16-BN encoder at half width            12.09 G
                   (32-64-128-256-256, 2-2-3-3-3 convs), nearest x2 Resize + skip Concat +
                   two conv3x3-BN-ReLU per decoder stage, 1x1 conv + Sigmoid; at 256x384
=================  =============================================================================  =========

Inference graphs: no dropout, no auxiliary classifiers. The classifiers take ``input`` ``[batch, 3, 224, 224]``
and return ``logits`` ``[batch, 1000]``; the U-Net (a dense-prediction net: segmentation, text detection as in
DBNet) takes ``input`` ``[batch, 3, 256, 384]`` and returns ``mask`` ``[batch, 1, 256, 384]``, a probability
per pixel. The RepVGG-style block net lives in :mod:`models.repvgg`.

The U-Net upsamples as most exported U-Nets do (segmentation_models_pytorch's ``Unet``, PyTorch's
``F.interpolate(scale_factor=2, mode="nearest")``): a ``Resize`` nearest x2, not a ``ConvTranspose``. Its
widths are VGG16-BN's halved (nnU-Net's base of 32) to keep it at 12 GMACs; ``build_unet(base=64)`` is the
full-width net (48.2 GMACs at 256x384), ``base=16`` a 3.0-GMAC one.

Residual branches end in a BatchNormalization whose scale is shrunk (0.2), so activations of the random
nets stay in a sane range through the depth (trained ResNets behave the same way; the zero-init-residual
trick is its extreme).

Run ``python -m models.zoo NAME OUT.onnx [--seed S] [--batch N]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import onnx

from models.builder import NetBuilder

HW = 224
CLASSES = 1000
#: BN scale on the last layer of a residual branch (see the module docstring).
RESIDUAL_SCALE = 0.2


def _head(b: NetBuilder, x: str, channels: int, batch: int | str, name: str) -> onnx.ModelProto:
    """GlobalAveragePool -> Flatten -> Gemm, renamed to ``logits``."""
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    _as_logits(b, b.gemm(x, channels, CLASSES))
    return b.model("input", [batch, 3, HW, HW], "logits", [batch, CLASSES], name)


def _as_logits(b: NetBuilder, y: str) -> None:
    """Rename the last node's output ``y`` to ``logits`` (the graph output)."""
    _rename_output(b, y, "logits")


def _rename_output(b: NetBuilder, y: str, name: str) -> None:
    """Rename the last node's output ``y`` to ``name`` (the graph output)."""
    assert b.nodes[-1].output[0] == y
    b.nodes[-1].output[0] = name


def _conv_bn(b: NetBuilder, x: str, cin: int, cout: int, k: int, *, stride: int = 1, group: int = 1,
             act: str | None = "relu", bn_scale: float = 1.0, name: str = "conv") -> str:
    """Conv (no bias) -> BatchNormalization -> activation (``relu``, ``relu6`` or ``None``)."""
    y = b.batchnorm(b.conv(x, cin, cout, k, stride=stride, group=group, bias=False, name=name), cout, scale=bn_scale)
    if act == "relu":
        return b.relu(y)
    if act == "relu6":
        return b.clip(y, 0.0, 6.0)
    return y


# -- ResNet ------------------------------------------------------------------------------------------


def _basic_block(b: NetBuilder, x: str, cin: int, cout: int, stride: int, name: str) -> str:
    y = _conv_bn(b, x, cin, cout, 3, stride=stride, name=f"{name}_conv1")
    y = _conv_bn(b, y, cout, cout, 3, act=None, bn_scale=RESIDUAL_SCALE, name=f"{name}_conv2")
    if stride != 1 or cin != cout:
        x = _conv_bn(b, x, cin, cout, 1, stride=stride, act=None, name=f"{name}_downsample")
    return b.relu(b.op("Add", [x, y], name=f"{name}_add"))


def _bottleneck_block(b: NetBuilder, x: str, cin: int, width: int, stride: int, name: str) -> str:
    cout = width * 4
    y = _conv_bn(b, x, cin, width, 1, name=f"{name}_conv1")
    y = _conv_bn(b, y, width, width, 3, stride=stride, name=f"{name}_conv2")  # v1.5: stride on the 3x3
    y = _conv_bn(b, y, width, cout, 1, act=None, bn_scale=RESIDUAL_SCALE, name=f"{name}_conv3")
    if stride != 1 or cin != cout:
        x = _conv_bn(b, x, cin, cout, 1, stride=stride, act=None, name=f"{name}_downsample")
    return b.relu(b.op("Add", [x, y], name=f"{name}_add"))


def _resnet(blocks: tuple[int, int, int, int], bottleneck: bool, seed: int, batch: int | str, name: str) -> onnx.ModelProto:
    b = NetBuilder(seed, float32_draws=True)
    x = _conv_bn(b, "input", 3, 64, 7, stride=2, name="stem")  # 112
    x = b.pool("MaxPool", x, 3, 2, pad=1)  # 56
    cin = 64
    for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            block_name = f"layer{stage + 1}_{i}"
            if bottleneck:
                x = _bottleneck_block(b, x, cin, width, stride, block_name)
                cin = width * 4
            else:
                x = _basic_block(b, x, cin, width, stride, block_name)
                cin = width
    return _head(b, x, cin, batch, name)


def build_resnet18(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """ResNet-18: basic blocks [2, 2, 2, 2]."""
    return _resnet((2, 2, 2, 2), False, seed, batch, "resnet18")


def build_resnet50(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """ResNet-50 v1.5: bottleneck blocks [3, 4, 6, 3]."""
    return _resnet((3, 4, 6, 3), True, seed, batch, "resnet50")


# -- VGG ---------------------------------------------------------------------------------------------

#: VGG-16 (configuration D): conv widths, "M" for a 2x2/2 max pool.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def build_vgg16(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """VGG-16: 13 3x3 convs with bias and ReLU, five max pools, three fully connected layers (no dropout)."""
    b = NetBuilder(seed, float32_draws=True)
    x, cin = "input", 3
    for i, item in enumerate(VGG16):
        if item == "M":
            x = b.pool("MaxPool", x, 2, 2)
        else:
            x = b.conv_relu(x, cin, int(item), 3, name=f"conv{i}")
            cin = int(item)
    x = b.op("Flatten", [x], axis=1)  # 512 x 7 x 7
    x = b.relu(b.gemm(x, 512 * 7 * 7, 4096))
    x = b.relu(b.gemm(x, 4096, 4096))
    _as_logits(b, b.gemm(x, 4096, CLASSES))
    return b.model("input", [batch, 3, HW, HW], "logits", [batch, CLASSES], "vgg16")


# -- GoogLeNet ---------------------------------------------------------------------------------------

#: Inception modules of Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj); "M": 3x3/2 max pool.
INCEPTION = (
    ("3a", (64, 96, 128, 16, 32, 32)), ("3b", (128, 128, 192, 32, 96, 64)), "M",
    ("4a", (192, 96, 208, 16, 48, 64)), ("4b", (160, 112, 224, 24, 64, 64)), ("4c", (128, 128, 256, 24, 64, 64)),
    ("4d", (112, 144, 288, 32, 64, 64)), ("4e", (256, 160, 320, 32, 128, 128)), "M",
    ("5a", (256, 160, 320, 32, 128, 128)), ("5b", (384, 192, 384, 48, 128, 128)),
)


def _lrn(b: NetBuilder, x: str) -> str:
    return b.op("LRN", [x], size=5, alpha=1e-4, beta=0.75, bias=1.0)


def _inception(b: NetBuilder, x: str, cin: int, cfg: tuple[int, ...], name: str) -> tuple[str, int]:
    n1, r3, n3, r5, n5, pp = cfg
    br1 = b.conv_relu(x, cin, n1, 1, name=f"inc{name}_1x1")
    br2 = b.conv_relu(b.conv_relu(x, cin, r3, 1, name=f"inc{name}_3x3_reduce"), r3, n3, 3, name=f"inc{name}_3x3")
    br3 = b.conv_relu(b.conv_relu(x, cin, r5, 1, name=f"inc{name}_5x5_reduce"), r5, n5, 5, name=f"inc{name}_5x5")
    br4 = b.conv_relu(b.pool("MaxPool", x, 3, 1, pad=1), cin, pp, 1, name=f"inc{name}_pool_proj")
    return b.op("Concat", [br1, br2, br3, br4], axis=1, name=f"inc{name}_concat"), n1 + n3 + n5 + pp


def build_googlenet(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """GoogLeNet (Inception-v1), Table 1 of Szegedy et al. 2015; max pools in ceil mode as in Caffe."""
    b = NetBuilder(seed, float32_draws=True)
    x = b.conv_relu("input", 3, 64, 7, stride=2, name="conv1")  # 112
    x = _lrn(b, b.pool("MaxPool", x, 3, 2, ceil_mode=True))  # 56
    x = b.conv_relu(x, 64, 64, 1, name="conv2_reduce")
    x = b.conv_relu(x, 64, 192, 3, name="conv2")
    x = b.pool("MaxPool", _lrn(b, x), 3, 2, ceil_mode=True)  # 28
    cin = 192
    for item in INCEPTION:
        if item == "M":
            x = b.pool("MaxPool", x, 3, 2, ceil_mode=True)
            continue
        label, cfg = item
        x, cin = _inception(b, x, cin, cfg, label)
    return _head(b, x, cin, batch, "googlenet")


# -- SqueezeNet --------------------------------------------------------------------------------------


def _fire(b: NetBuilder, x: str, cin: int, squeeze: int, expand: int, name: str) -> tuple[str, int]:
    s = b.conv_relu(x, cin, squeeze, 1, name=f"{name}_squeeze")
    e1 = b.conv_relu(s, squeeze, expand, 1, name=f"{name}_expand1x1")
    e3 = b.conv_relu(s, squeeze, expand, 3, name=f"{name}_expand3x3")
    return b.op("Concat", [e1, e3], axis=1, name=f"{name}_concat"), 2 * expand


#: (fire squeeze width, expand width) per fire module; "M": 3x3/2 max pool (ceil mode).
SQUEEZENET = {
    "1_0": ((16, 64), (16, 64), (32, 128), "M", (32, 128), (48, 192), (48, 192), (64, 256), "M", (64, 256)),
    "1_1": ((16, 64), (16, 64), "M", (32, 128), (32, 128), "M", (48, 192), (48, 192), (64, 256), (64, 256)),
}


def _squeezenet(version: str, seed: int, batch: int | str) -> onnx.ModelProto:
    b = NetBuilder(seed, float32_draws=True)
    if version == "1_0":
        x, cin = b.conv_relu("input", 3, 96, 7, stride=2, pad=0, name="conv1"), 96  # 109
    else:
        x, cin = b.conv_relu("input", 3, 64, 3, stride=2, pad=0, name="conv1"), 64  # 111
    x = b.pool("MaxPool", x, 3, 2, ceil_mode=True)
    for i, item in enumerate(SQUEEZENET[version]):
        if item == "M":
            x = b.pool("MaxPool", x, 3, 2, ceil_mode=True)
        else:
            x, cin = _fire(b, x, cin, item[0], item[1], f"fire{i}")
    x = b.conv_relu(x, cin, CLASSES, 1, pad=0, name="conv10")  # the classifier is a 1x1 conv
    x = b.op("GlobalAveragePool", [x])
    _as_logits(b, b.op("Flatten", [x], axis=1))
    return b.model("input", [batch, 3, HW, HW], "logits", [batch, CLASSES], f"squeezenet{version}")


def build_squeezenet1_0(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    return _squeezenet("1_0", seed, batch)


def build_squeezenet1_1(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    return _squeezenet("1_1", seed, batch)


# -- MobileNetV2 -------------------------------------------------------------------------------------

#: (expansion t, output channels c, repeats n, first stride s), Table 2 of Sandler et al. 2018.
MOBILENETV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def build_mobilenetv2(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """MobileNetV2 width 1.0: expansion 1x1 -> depthwise 3x3 -> linear 1x1 projection, residual at stride 1."""
    b = NetBuilder(seed, float32_draws=True)
    x = _conv_bn(b, "input", 3, 32, 3, stride=2, act="relu6", name="stem")  # 112
    cin = 32
    for stage, (t, c, n, s) in enumerate(MOBILENETV2):
        for i in range(n):
            stride = s if i == 0 else 1
            name = f"block{stage}_{i}"
            hidden = cin * t
            y = x if t == 1 else _conv_bn(b, x, cin, hidden, 1, act="relu6", name=f"{name}_expand")
            y = _conv_bn(b, y, hidden, hidden, 3, stride=stride, group=hidden, act="relu6", name=f"{name}_dw")
            residual = stride == 1 and cin == c
            y = _conv_bn(b, y, hidden, c, 1, act=None, bn_scale=RESIDUAL_SCALE if residual else 1.0, name=f"{name}_project")
            x = b.op("Add", [x, y], name=f"{name}_add") if residual else y
            cin = c
    x = _conv_bn(b, x, cin, 1280, 1, act="relu6", name="last")
    return _head(b, x, 1280, batch, "mobilenetv2")


# -- U-Net -------------------------------------------------------------------------------------------

#: U-Net encoder: VGG16-BN's conv widths per resolution (2, 2, 3, 3, 3 convs), a 2x2/2 max pool between levels
#: (VGG's fifth pool and classifier dropped: the bottom is at stride 16).
UNET_ENCODER = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
#: Decoder stage widths, deepest first: one stage per skip, each half the width of the skip it joins.
UNET_DECODER = (256, 128, 64, 32)
#: U-Net input height and width (each divisible by 16: four pools).
UNET_HW = (256, 384)
#: U-Net width: VGG16-BN's widths times ``UNET_BASE / 64`` (see the module docstring).
UNET_BASE = 32


def _upsample(b: NetBuilder, x: str, name: str) -> str:
    """Nearest x2 upsampling as PyTorch exports ``F.interpolate(scale_factor=2, mode="nearest")``."""
    scales = b.const(f"{name}.scales", np.array([1.0, 1.0, 2.0, 2.0], np.float32))
    return b.op("Resize", [x, "", scales], name=name, mode="nearest", coordinate_transformation_mode="asymmetric",
                nearest_mode="floor")


def build_unet(seed: int = 0, batch: int | str = "N", *, height: int = UNET_HW[0], width: int = UNET_HW[1],
               base: int = UNET_BASE) -> onnx.ModelProto:
    """U-Net with a VGG16-BN encoder: conv3x3-BN-ReLU blocks (:data:`UNET_ENCODER`, widths scaled by
    ``base / 64``), then per skip Resize nearest x2 -> Concat [upsampled, skip] -> two conv3x3-BN-ReLU
    (:data:`UNET_DECODER`), and a 1x1 conv -> Sigmoid head: one probability map ``mask`` [batch, 1, H, W]."""
    if height % 16 or width % 16:
        raise ValueError(f"U-Net input {height}x{width}: both sides must be divisible by 16")
    b = NetBuilder(seed, float32_draws=True)
    x, cin, skips = "input", 3, []
    for level, widths in enumerate(UNET_ENCODER):
        if level:
            skips.append((x, cin))
            x = b.pool("MaxPool", x, 2, 2)
        for i, w in enumerate(widths):
            cout = w * base // 64
            x, cin = _conv_bn(b, x, cin, cout, 3, name=f"enc{level + 1}_{i + 1}"), cout
    for stage, ((skip, cskip), w) in enumerate(zip(reversed(skips), UNET_DECODER)):
        cout = w * base // 64
        up = _upsample(b, x, f"dec{stage + 1}_up")
        x = b.op("Concat", [up, skip], axis=1, name=f"dec{stage + 1}_concat")
        x = _conv_bn(b, x, cin + cskip, cout, 3, name=f"dec{stage + 1}_1")
        x, cin = _conv_bn(b, x, cout, cout, 3, name=f"dec{stage + 1}_2"), cout
    y = b.op("Sigmoid", [b.conv(x, cin, 1, 1, name="head")])
    _rename_output(b, y, "mask")
    return b.model("input", [batch, 3, height, width], "mask", [batch, 1, height, width], "unet")


#: name -> builder; what ``python -m models.zoo`` and the benchmarks know.
BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet18": build_resnet18,
    "resnet50": build_resnet50,
    "vgg16": build_vgg16,
    "googlenet": build_googlenet,
    "squeezenet1_0": build_squeezenet1_0,
    "squeezenet1_1": build_squeezenet1_1,
    "mobilenetv2": build_mobilenetv2,
    "unet": build_unet,
}


def build(name: str, seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    if name not in BUILDERS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[name](seed=seed, batch=batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("output", help="where to write the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", default="N", help="batch dim: a symbol (default N) or a number")
    args = parser.parse_args()
    from rewriter.io import save_model

    batch: int | str = int(args.batch) if args.batch.isdigit() else args.batch
    save_model(build(args.name, args.seed, batch), args.output)


if __name__ == "__main__":
    main()
