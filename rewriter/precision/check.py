"""The budget a quantized model is judged by: its outputs against the *original* float model's, per split.

The original runs in a reference session (onnxruntime, graph optimizations disabled, CPU), once per split,
its outputs kept. A candidate runs as deployed (:func:`~rewriter.validation.runtime.eval_session`: the
runtime options' optimization level, ``all`` by default, where onnxruntime fuses QuantizeLinear /
DequantizeLinear pairs into integer kernels such as QLinearConv), so its numerics are those a user ships.
Failures are :meth:`Budget.failures <rewriter.validation.numerics.Budget.failures>` of
:meth:`Budget.compare <rewriter.validation.numerics.Budget.compare>` (lossy bounds: int8 is never exact), plus
the task metric's gate (:meth:`TaskMetric.failure <rewriter.validation.judge.TaskMetric.failure>`) when one is
given, scored on the same split (a metric with a ``split`` keyword scores ``"validation"`` or ``"test"``).

:meth:`BudgetCheck.spend` is the budget's worst term as a fraction used (:func:`rewriter.holdout.budget_spend`:
1 at the edge), with the metric's terms: ``(baseline - value) / max_drop`` and, for a floor,
``(baseline - value) / (baseline - floor)`` (the share of the room above the floor used).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from rewriter.errors import InputError
from rewriter.validation.judge import TaskMetric
from rewriter.validation.numerics import Budget, OutputStats
from rewriter.validation.runtime import RuntimeOptions, eval_session, reference_session, run_feeds

Feed = dict[str, np.ndarray]


class BudgetCheck:
    """``check(model, split) -> failures`` for :func:`~rewriter.precision.search.search_int8`."""

    def __init__(self, original: onnx.ModelProto, splits: Mapping[str, Sequence[Feed]], budget: Budget,
                 metric: TaskMetric | None = None, runtime: RuntimeOptions | None = None) -> None:
        self.splits = {name: [dict(f) for f in feeds] for name, feeds in splits.items() if feeds}
        if "validation" not in self.splits:
            raise InputError("the int8 budget check needs validation feeds")
        self.budget, self.metric, self.runtime = budget, metric, runtime or RuntimeOptions()
        reference = reference_session(original)
        self.reference = {name: run_feeds(reference, feeds) for name, feeds in self.splits.items()}
        self.baseline: dict[str, float] = {}
        if metric is not None:
            session = eval_session(original, self.runtime)
            self.baseline = {name: metric.score(session, name) for name in self.splits}

    @property
    def has_test(self) -> bool:
        return "test" in self.splits

    def numerics(self, model: onnx.ModelProto, split: str) -> dict[str, OutputStats]:
        """Per-output statistics of ``model`` against the original on ``split``."""
        return self.budget.compare(self.reference[split], run_feeds(eval_session(model, self.runtime), self.splits[split]))

    def spend(self, model: onnx.ModelProto, split: str) -> float:
        """The budget's worst term on ``split`` as a fraction used (module docstring)."""
        from rewriter.holdout import budget_spend

        session = eval_session(model, self.runtime)
        stats = self.budget.compare(self.reference[split], run_feeds(session, self.splits[split]))
        worst = budget_spend(stats, self.budget)
        if self.metric is not None:
            base, value = self.baseline[split], self.metric.score(session, split)
            worst = max(worst, metric_spend(base, value, self.metric))
        return worst

    def __call__(self, model: onnx.ModelProto, split: str) -> list[str]:
        if split not in self.splits:
            raise InputError(f"no {split!r} feeds to check the int8 budget on")
        session = eval_session(model, self.runtime)
        stats = self.budget.compare(self.reference[split], run_feeds(session, self.splits[split]))
        failures = self.budget.failures(stats, exact=False)
        if self.metric is not None:
            why = self.metric.failure(self.baseline[split], self.metric.score(session, split))
            if why is not None:
                failures.append(why)
        return failures


def metric_spend(baseline: float, value: float, metric: TaskMetric) -> float:
    """The metric's share of its budget used (:meth:`TaskMetric.spend`)."""
    return metric.spend(baseline, value)
