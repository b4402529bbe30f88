"""onnx-bottleneck: guarded structural rewrites for ONNX CNNs.

Python API (the CLI is a thin layer over these)::

    import rewriter
    result = rewriter.optimize("model.onnx", passes=["fuse_1x1_chain"])
    rewriter.save_model(result.model, "model.opt.onnx")

    # Many models, one guarded job each (local processes, or Ray tasks with ray_address="auto"):
    fleet = rewriter.optimize_many(["a.onnx", "b.onnx"], "out/", rewriter.OptimizeOptions(latency=False))
    # A zoo: each input shape applies to the models with that input; settings per model by stem or glob:
    fleet = rewriter.optimize_many(paths, "out/", rewriter.OptimizeOptions(input_shapes={"image": (1, 3, 64, 256)}),
                                   per_model=[rewriter.ModelSettings("ppocr*", {"passes": "fold_batchnorm"}, {"x": (1, 3, 640, 640)})])
"""

from rewriter.analysis import Analysis, analyze
from rewriter.contract import CalibrationData, Candidate, Cost, Pass, PatternPass, RewriteError, Rule, RuleSetPass, Skip
from rewriter.errors import GateFailed, InputError, RewriterError
from rewriter.fleet import FleetResult, ModelResult, optimize_many
from rewriter.io import load_model, save_model, sha256_file
from rewriter.job import OptimizeOptions, OptimizeOutcome, optimize_model
from rewriter.model import Model
from rewriter.outcome import Outcome
from rewriter.pipeline import Decision, OptimizeResult, PassResult, apply_pass, optimize
from rewriter.plan import ApplyResult, Plan, apply_plan, plan_from_result
from rewriter.registry import available_passes, default_passes, resolve_passes
from rewriter.version import __version__
from rewriter.zoo import ModelSettings

__all__ = [
    "Analysis",
    "ApplyResult",
    "CalibrationData",
    "Candidate",
    "Cost",
    "Decision",
    "FleetResult",
    "GateFailed",
    "InputError",
    "Model",
    "ModelResult",
    "ModelSettings",
    "OptimizeOptions",
    "OptimizeOutcome",
    "OptimizeResult",
    "Outcome",
    "Pass",
    "PassResult",
    "Plan",
    "PatternPass",
    "RewriteError",
    "Rule",
    "RuleSetPass",
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
    "optimize_many",
    "optimize_model",
    "plan_from_result",
    "resolve_passes",
    "save_model",
    "sha256_file",
]
