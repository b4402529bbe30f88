"""The built-in passes. ``ALL_PASSES`` is the registry: an explicit tuple, in the order the default
pipeline runs them (BN folding first, so that the fusions after it see plain convs). Only the exact
passes run by default; ``bottleneck`` (lossy) runs when selected, under a numerics budget. One module per
pass; the module, the class's ``name`` and the CLI name match.
"""

from passes.bottleneck import Bottleneck
from passes.conv1x1_to_gemm import Conv1x1ToGemm
from passes.fold_batchnorm import FoldBatchNorm
from passes.fuse_1x1_chain import Fuse1x1Chain
from passes.fuse_1x1_kxk import Fuse1x1Kxk
from passes.fuse_kxk_1x1 import FuseKxk1x1
from passes.merge_parallel_branches import MergeParallelBranches

ALL_PASSES = (FoldBatchNorm, MergeParallelBranches, Fuse1x1Chain, FuseKxk1x1, Fuse1x1Kxk, Conv1x1ToGemm, Bottleneck)

__all__ = ["ALL_PASSES", "Bottleneck", "Conv1x1ToGemm", "FoldBatchNorm", "Fuse1x1Chain", "Fuse1x1Kxk", "FuseKxk1x1", "MergeParallelBranches"]
