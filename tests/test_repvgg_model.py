"""The RepVGG sample model: builds deterministically, checks, runs, and its MACs match a hand count."""

from __future__ import annotations

import numpy as np
import onnx

from models.repvgg import BLOCKS, INPUT_HW, build_repvgg
from passes.fold_batchnorm import FoldBatchNorm
from passes.merge_parallel_branches import MergeParallelBranches
from rewriter.analysis import analyze
from rewriter.model import Model
from rewriter.pipeline import apply_pass
from tests.helpers import assert_same_outputs, feeds_for, ops, run_reference


def test_builds_checks_and_runs() -> None:
    model = build_repvgg()
    onnx.checker.check_model(model, full_check=True)
    (out,) = run_reference(model, feeds_for(model, count=1))[0]
    assert out.shape == (1, 10) and np.all(np.isfinite(out))
    assert ops(model) == {"BatchNormalization": 20, "Conv": 18, "Add": 12, "Relu": 9, "Flatten": 1, "Gemm": 1,
                          "GlobalAveragePool": 1}


def test_is_deterministic() -> None:
    assert build_repvgg(0).SerializeToString() == build_repvgg(0).SerializeToString()
    assert build_repvgg(0).SerializeToString() != build_repvgg(1).SerializeToString()


def test_macs_match_a_hand_count() -> None:
    costs = {c.name: c.macs for c in analyze(Model.from_source(build_repvgg())).nodes}

    def macs(prefix: str) -> int:
        (value,) = [v for name, v in costs.items() if name.startswith(prefix)]
        return value

    # block2: 48 -> 48 channels at 24x24 (stride 1, with the identity branch)
    assert macs("block2_3x3") == 24 * 24 * 48 * 48 * 9 == 11_943_936
    assert macs("block2_1x1") == 24 * 24 * 48 * 48 == 1_327_104
    assert all(v == 0 for name, v in costs.items() if name.startswith(("bn_", "block2_add")))
    # the whole model: each block is a 3x3 and a 1x1 conv, then the 1x1 pair and the Gemm
    hw, total = INPUT_HW, 0
    for cin, cout, stride in BLOCKS:
        hw //= stride
        total += hw * hw * cout * cin * (9 + 1)
    total += 6 * 6 * (192 * 384 + 384 * 128) + 128 * 10
    assert sum(costs.values()) == total == 81_839_360


def test_fold_batchnorm_then_merge_leaves_one_conv_per_block() -> None:
    model = build_repvgg()
    folded = apply_pass(model, FoldBatchNorm()).model
    merged = apply_pass(folded, MergeParallelBranches())
    assert len(merged.applied) == len(BLOCKS)
    assert ops(merged.model) == {"Conv": 10, "Relu": 9, "Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1}
    onnx.checker.check_model(merged.model, full_check=True)
    assert_same_outputs(model, merged.model)
