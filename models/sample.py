"""The embedded sample model that ``make demo`` optimizes.

A small 10-class CNN on 1x3x112x112 input with what the tool is about:

* an Inception block: parallel 1x1, 1x1->3x3, 1x1->5x5 and pool->1x1 branches, concatenated;
* a ResNet bottleneck: 1x1 reduce -> 3x3 -> 1x1 expand, plus the identity;
* a linear 1x1 pair: a 1x1 expansion (80->192) straight into a 1x1 projection (192->64) with nothing
  nonlinear between them -- fusable into one 80->64 1x1 conv, 5.4x fewer MACs for that pair;
* a classifier head: GlobalAveragePool -> Flatten -> Gemm -> logits (N x 10).

Run ``python -m models.sample OUT.onnx``. Weights are seeded random (structure and latency only).
"""

from __future__ import annotations

import argparse

import onnx

from models.builder import NetBuilder


def build_sample(seed: int = 0) -> onnx.ModelProto:
    b = NetBuilder(seed)
    x = b.conv_relu("input", 3, 32, 3, stride=2, name="stem")  # 56x56
    # Inception block (GoogLeNet-style 1x1 reductions before the 3x3 and 5x5 convs).
    br1 = b.conv_relu(x, 32, 16, 1, name="inc_1x1")
    br2 = b.conv_relu(b.conv_relu(x, 32, 24, 1, name="inc_3x3_reduce"), 24, 32, 3, name="inc_3x3")
    br3 = b.conv_relu(b.conv_relu(x, 32, 8, 1, name="inc_5x5_reduce"), 8, 16, 5, name="inc_5x5")
    br4 = b.conv_relu(b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), 32, 16, 1, name="inc_pool_proj")
    x = b.op("Concat", [br1, br2, br3, br4], axis=1)  # 80 channels
    # ResNet bottleneck.
    y = b.conv_relu(x, 80, 32, 1, name="res_reduce")
    y = b.conv_relu(y, 32, 32, 3, name="res_3x3")
    y = b.conv(y, 32, 80, 1, name="res_expand")
    x = b.relu(b.op("Add", [x, y]))
    # Linear 1x1 pair: expansion then projection, nothing nonlinear between.
    x = b.conv(x, 80, 192, 1, name="lin_expand")
    x = b.relu(b.conv(x, 192, 64, 1, name="lin_project"))
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    logits = b.gemm(x, 64, 10)
    return b.model("input", ["N", 3, 112, 112], logits, ["N", 10], "sample_cnn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="where to write the model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from rewriter.io import save_model

    save_model(build_sample(args.seed), args.output)


if __name__ == "__main__":
    main()
