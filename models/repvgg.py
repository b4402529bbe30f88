"""A RepVGG-style sample model: training-time multi-branch blocks that re-parameterize into plain 3x3 convs.

A 10-class CNN on Nx3x96x96 input:

* RepVGG blocks ``relu(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)])`` -- the identity branch only where the
  stride is 1 and the channels stay the same; every branch has its own BatchNormalization, as a
  RepVGG network is exported for training-mode-free inference before re-parameterization. Folding the
  BNs (``fold_batchnorm``) and then merging the branches (``merge_parallel_branches``) turns every block
  into one 3x3 conv + ReLU;
* four stages at 48, 24, 12 and 6 pixels: 3->32 (s2); 32->48 (s2), 48->48; 48->96 (s2), 96->96 x2;
  96->192 (s2), 192->192;
* a linear 1x1 pair: expansion 192->384 straight into projection 384->128 (``fuse_1x1_chain``: one
  192->128 1x1, 5x fewer MACs for the pair);
* a head: GlobalAveragePool -> Flatten -> Gemm -> logits (N x 10).

Run ``python -m models.repvgg OUT.onnx``. Weights are seeded random (structure and latency only).
"""

from __future__ import annotations

import argparse

import onnx

from models.builder import NetBuilder

#: (in channels, out channels, stride) of every block, stage by stage.
BLOCKS: tuple[tuple[int, int, int], ...] = (
    (3, 32, 2),
    (32, 48, 2), (48, 48, 1),
    (48, 96, 2), (96, 96, 1), (96, 96, 1),
    (96, 192, 2), (192, 192, 1),
)
INPUT_HW = 96


def repvgg_block(b: NetBuilder, x: str, cin: int, cout: int, stride: int, name: str) -> str:
    """``relu(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)])``; the convs carry no bias (their BN holds it)."""
    dense = b.batchnorm(b.conv(x, cin, cout, 3, stride=stride, bias=False, name=f"{name}_3x3"), cout)
    point = b.batchnorm(b.conv(x, cin, cout, 1, stride=stride, pad=0, bias=False, name=f"{name}_1x1"), cout)
    y = b.op("Add", [dense, point], name=f"{name}_add")
    if stride == 1 and cin == cout:
        y = b.op("Add", [y, b.batchnorm(x, cin)], name=f"{name}_add_id")
    return b.relu(y)


def build_repvgg(seed: int = 0) -> onnx.ModelProto:
    b = NetBuilder(seed)
    x = "input"
    for i, (cin, cout, stride) in enumerate(BLOCKS):
        x = repvgg_block(b, x, cin, cout, stride, f"block{i}")
    # Linear 1x1 pair: expansion then projection, nothing nonlinear between.
    x = b.conv(x, 192, 384, 1, name="lin_expand")
    x = b.relu(b.conv(x, 384, 128, 1, name="lin_project"))
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    logits = b.gemm(x, 128, 10)
    return b.model("input", ["N", 3, INPUT_HW, INPUT_HW], logits, ["N", 10], "repvgg_cnn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="where to write the model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from rewriter.io import save_model

    save_model(build_repvgg(args.seed), args.output)


if __name__ == "__main__":
    main()
