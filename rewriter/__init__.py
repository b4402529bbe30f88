"""onnx-rewriter: guarded structural rewrites for ONNX CNNs.

Python API (the CLI is a thin layer over these)::

    import rewriter
    result = rewriter.optimize("model.onnx", passes=["fuse_1x1_chain"])
    rewriter.save_model(result.model, "model.opt.onnx")
"""

from rewriter.analysis import Analysis, analyze
from rewriter.contract import Candidate, Cost, Pass, PatternPass, RewriteError, Skip
from rewriter.errors import GateFailed, InputError, RewriterError
from rewriter.io import load_model, save_model, sha256_file
from rewriter.model import Model
from rewriter.pipeline import Decision, OptimizeResult, PassResult, apply_pass, optimize
from rewriter.plan import ApplyResult, Plan, apply_plan, plan_from_result
from rewriter.registry import available_passes, default_passes, resolve_passes

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "ApplyResult",
    "Candidate",
    "Cost",
    "Decision",
    "GateFailed",
    "InputError",
    "Model",
    "OptimizeResult",
    "Pass",
    "PassResult",
    "Plan",
    "PatternPass",
    "RewriteError",
    "RewriterError",
    "Skip",
    "__version__",
    "analyze",
    "apply_pass",
    "apply_plan",
    "available_passes",
    "default_passes",
    "load_model",
    "optimize",
    "plan_from_result",
    "resolve_passes",
    "save_model",
    "sha256_file",
]
