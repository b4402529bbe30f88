"""The pass contract's calibration service: ``Calibration`` implements ``CalibrationData``; ``optimize`` and
``apply_plan`` hand it to data-aware passes only, and ``None`` when there is no calibration data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import pytest

from rewriter.contract import CalibrationData, Candidate, Cost, Pass, Skip
from rewriter.model import Model
from rewriter.pipeline import optimize
from rewriter.plan import Plan, PlanStep, apply_plan, feeds_digest
from rewriter.validation.calibration import Calibration
from rewriter.validation.feeds import FeedSet
from rewriter.validation.judge import ValidationConfig
from tests.helpers import parse

MODEL = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4, 6, 6] X) => (float[1, 8, 6, 6] Y)
    <float[8, 4, 3, 3] W> {
        Y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W)
    }
"""
RNG = np.random.default_rng(0)
FEEDS = [{"X": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(4)]


class Recorder(Pass):
    """Finds one no-op rewrite of the conv; records every calibration it is handed (class-wide, for plans)."""

    name = "recorder"
    summary = "records use_calibration calls"
    exact = True
    handed: ClassVar[list[tuple[str, CalibrationData | None]]] = []

    def use_calibration(self, calibration: CalibrationData | None) -> None:
        Recorder.handed.append((self.name, calibration))
        super().use_calibration(calibration)

    def find(self, model: Model) -> Iterator[Candidate | Skip]:
        conv = model.graph.nodes[0]
        yield Candidate(self.name, (conv.name,), "no-op", Cost(1, 1, 1, 1))

    def apply(self, model: Model, candidate: Candidate) -> None:
        """Nothing to change."""


class AwareRecorder(Recorder):
    name = "aware_recorder"
    exact = False
    data_aware = True

    def find(self, model: Model) -> Iterator[Candidate | Skip]:
        assert self.calibration is None or self.calibration.original.proto.graph.node[0].name == model.graph.nodes[0].name
        yield from super().find(model)


@pytest.fixture(autouse=True)
def _fresh_record() -> Iterator[None]:
    Recorder.handed.clear()
    yield
    Recorder.handed.clear()


def test_calibration_implements_the_protocol() -> None:
    model = Model.from_source(parse(MODEL))
    cal = Calibration(model, FEEDS)
    assert isinstance(cal, CalibrationData)
    assert cal.original is model and len(cal.feeds) == 4
    mean, second = cal.moments(model, ["Y"])["Y"]
    assert mean.shape == (8,) and second.shape == (8, 8)


def test_passes_are_not_data_aware_and_hold_no_calibration_by_default() -> None:
    plain = Recorder()
    assert Pass.data_aware is False and not plain.data_aware and plain.calibration is None
    cal = Calibration(Model.from_source(parse(MODEL)), FEEDS)
    plain.use_calibration(cal)
    assert plain.calibration is cal
    plain.use_calibration(None)
    assert plain.calibration is None


def test_optimize_hands_calibration_to_data_aware_passes_only() -> None:
    aware, plain = AwareRecorder(), Recorder()
    feeds = FeedSet(FEEDS[:2], FEEDS[2:], "files", synthetic=False)
    optimize(parse(MODEL), [plain, aware], feeds=feeds, config=ValidationConfig(latency=False), screen=False)
    assert [name for name, _ in Recorder.handed] == ["aware_recorder"]  # once, and never to the plain pass
    cal = aware.calibration
    assert isinstance(cal, Calibration) and plain.calibration is None
    assert [f["X"].tobytes() for f in cal.feeds] == [f["X"].tobytes() for f in FEEDS[2:]]  # the calibration half
    # Synthetic feeds: nothing to fit on, so the pass is told so (and drops what an earlier run gave it).
    Recorder.handed.clear()
    optimize(parse(MODEL), [plain, aware], feeds=FeedSet(FEEDS[:2], FEEDS[2:], "random", synthetic=True),
             config=ValidationConfig(latency=False), screen=False)
    assert Recorder.handed == [("aware_recorder", None)] and aware.calibration is None


def test_optimize_builds_no_calibration_without_data_aware_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    import rewriter.pipeline

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("no data-aware pass selected: no calibration service should be built")

    monkeypatch.setattr(rewriter.pipeline, "Calibration", refuse)
    optimize(parse(MODEL), [Recorder()], feeds=FeedSet(FEEDS[:2], FEEDS[2:], "files"), config=ValidationConfig(latency=False))
    assert Recorder.handed == []


def test_apply_plan_binds_calibration_to_the_plans_data_aware_passes() -> None:
    model = parse(MODEL)
    conv = Model.from_source(model).proto.graph.node[0].name  # as the loader names it
    feeds = FeedSet(FEEDS[:2], FEEDS[2:], "files", synthetic=False)
    plan = Plan((PlanStep("recorder", (conv,)), PlanStep("aware_recorder", (conv,))), None, {}, {}, None,
                {"source": "files", "count": 2, "sha256": feeds_digest(feeds.calibration)})
    result = apply_plan(model, plan, available={"recorder": Recorder, "aware_recorder": AwareRecorder}, feeds=feeds)
    assert len(result.applied) == 2
    assert [name for name, _ in Recorder.handed] == ["aware_recorder"]
    cal = Recorder.handed[0][1]
    assert isinstance(cal, Calibration) and len(cal.feeds) == 2
    # A plan fitted on no calibration data: data-aware passes replay weight-only.
    Recorder.handed.clear()
    apply_plan(model, Plan((PlanStep("aware_recorder", (conv,)),), None), available={"aware_recorder": AwareRecorder})
    assert Recorder.handed == [("aware_recorder", None)]
