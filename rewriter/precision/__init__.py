"""Precision search: int8 post-training quantization through onnxruntime, guarded by the numerics budget
(:mod:`rewriter.precision.search`, ranked by :mod:`rewriter.precision.leave_one_out`), its recipe in
:mod:`rewriter.precision.int8`, and the ``optimize --precision int8`` stage in :mod:`rewriter.precision.stage`."""

from rewriter.precision.check import BudgetCheck
from rewriter.precision.int8 import Int8Options, Prepared, Quantizer, prepare, quantize_int8, quantized_nodes, refusal
from rewriter.precision.leave_one_out import LeaveOneOut, LeaveOneOutOptions
from rewriter.precision.search import (
    Int8Result,
    NodeDecision,
    Precision,
    SearchOptions,
    Trial,
    guarded_int8,
    islands,
    search_int8,
    smallest_holding,
)
from rewriter.precision.sensitivity import sensitivities
from rewriter.precision.stage import PrecisionOptions, PrecisionResult, run_stage

__all__ = [
    "BudgetCheck",
    "Int8Options",
    "Int8Result",
    "LeaveOneOut",
    "LeaveOneOutOptions",
    "NodeDecision",
    "Precision",
    "PrecisionOptions",
    "PrecisionResult",
    "Prepared",
    "Quantizer",
    "SearchOptions",
    "Trial",
    "guarded_int8",
    "islands",
    "prepare",
    "quantize_int8",
    "quantized_nodes",
    "refusal",
    "run_stage",
    "search_int8",
    "sensitivities",
    "smallest_holding",
]
