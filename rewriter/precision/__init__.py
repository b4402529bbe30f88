"""Precision search: int8 post-training quantization through onnxruntime, guarded by the numerics budget
(:mod:`rewriter.precision.search`), its recipe in :mod:`rewriter.precision.int8`."""

from rewriter.precision.check import BudgetCheck
from rewriter.precision.int8 import Int8Options, Prepared, Quantizer, prepare, quantize_int8, quantized_nodes, refusal
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

__all__ = [
    "BudgetCheck",
    "Int8Options",
    "Int8Result",
    "NodeDecision",
    "Precision",
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
    "search_int8",
    "sensitivities",
    "smallest_holding",
]
