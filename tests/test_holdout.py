"""Held-out confirmation: the three-way split, a search that never runs the test split, the back-off, the
metric's split, --holdout-fail and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import rewriter.pipeline
from rewriter.contract import Candidate, Cost
from rewriter.decision import Decision
from rewriter.errors import InputError
from rewriter.holdout import Unit, back_off_order, budget_spend, units
from rewriter.html_report import render_html
from rewriter.job import OptimizeOptions
from rewriter.model import Model
from rewriter.outcome import Outcome
from rewriter.pipeline import optimize
from rewriter.validation.feeds import FeedSet, feedset_for, input_specs, split_feeds, split_holdout
from rewriter.validation.judge import TaskMetric, ValidationConfig
from rewriter.validation.numerics import Budget, OutputStats, compare_outputs
from tests.helpers import assert_valid, parse, run_reference
from tests.search_fixtures import CHAIN3, ClipInput, Perturb
from tests.test_cli import assert_one_line_error, invoke

LOOSE = ValidationConfig(budget=Budget.parse("cosine>=0.99"), latency=False)


def feeds(count: int, scale: float, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"X": (scale * rng.standard_normal((1, 4, 6, 6))).astype(np.float32)} for _ in range(count)]


def tuned() -> FeedSet:
    """Validation and calibration inputs small enough that clipping at 2 moves nothing; test inputs unlike them."""
    small = feeds(8, 0.3, 0)
    return FeedSet(small[:4], small[4:], "tuned", test=feeds(4, 4.0, 1))


# -- the split ------------------------------------------------------------------------------------------
def test_the_data_is_split_three_ways_disjoint_seeded_and_sized() -> None:
    items = [{"i": np.asarray(i)} for i in range(12)]
    test, rest = split_holdout(items, 0.25, seed=3)
    cal, val = split_feeds(rest, 0.5, seed=3)
    ids = [sorted(int(f["i"]) for f in part) for part in (test, cal, val)]
    assert [len(p) for p in ids] == [3, 4, 5]
    assert sorted(sum(ids, [])) == list(range(12))  # disjoint and complete
    again, _ = split_holdout(items, 0.25, seed=3)
    other, _ = split_holdout(items, 0.25, seed=4)
    assert [int(f["i"]) for f in again] == ids[0] and sorted(int(f["i"]) for f in other) != ids[0]
    # No test split: calibration and validation are the very ones of before.
    none, whole = split_holdout(items, 0.0, seed=3)
    assert none == [] and [int(f["i"]) for f in split_feeds(whole, 0.5, 3)[0]] == [int(f["i"]) for f in split_feeds(items, 0.5, 3)[0]]
    # At least one test feed; at least one calibration and one validation feed left.
    assert [len(p) for p in split_holdout(items[:3], 0.01)] == [1, 2]
    assert [len(p) for p in split_holdout(items[:4], 0.9)] == [2, 2]
    with pytest.raises(InputError, match="needs at least 3"):
        split_holdout(items[:2], 0.25, what="--feeds a.npz")
    with pytest.raises(InputError, match="below 1"):
        split_holdout(items, 1.0)


def test_random_feeds_have_no_test_split_and_the_report_says_so() -> None:
    model = parse(CHAIN3)
    specs = input_specs(model, {"X": (1, 4, 6, 6)})
    fs = feedset_for(specs, count=4)
    assert fs.synthetic and fs.sizes() == {"calibration": 0, "validation": 4, "test": 0}  # random inputs calibrate nothing
    result = optimize(model, [Perturb()], config=LOOSE)
    assert result.holdout is not None and result.holdout.status == "off" and result.holdout.holds is None
    assert "random feeds" in result.holdout.reason


# -- the search never sees the test split ---------------------------------------------------------------------
def test_the_search_never_runs_the_test_feeds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every array onnxruntime is fed is recorded, with the phase: the test feeds appear only in the
    confirmation after the search, never in judging, screening or calibration."""
    seen: dict[str, set[int]] = {"search": set(), "confirm": set()}
    phase = ["search"]
    real_run, real_confirm = ort.InferenceSession.run, rewriter.pipeline.confirm

    def run(self, names, feed, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen[phase[0]].update(id(v) for v in feed.values())
        return real_run(self, names, feed, *args, **kwargs)

    def confirm(*args, **kwargs):  # type: ignore[no-untyped-def]
        phase[0] = "confirm"
        return real_confirm(*args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", run)
    monkeypatch.setattr(rewriter.pipeline, "confirm", confirm)
    fs = tuned()
    result = optimize(parse(CHAIN3), [ClipInput(), Perturb()], feeds=fs, config=LOOSE)
    test_ids = {id(f["X"]) for f in fs.test}
    assert not test_ids & seen["search"]
    assert test_ids <= seen["confirm"] and {id(f["X"]) for f in fs.validation} <= seen["search"]
    assert result.holdout is not None and result.holdout.sizes == {"calibration": 4, "validation": 4, "test": 4}


# -- backing off ----------------------------------------------------------------------------------------------
def test_a_rewrite_tuned_to_the_validation_feeds_is_backed_off_and_the_result_holds_on_test() -> None:
    fs = tuned()
    original = parse(CHAIN3)
    result = optimize(original, [ClipInput()], feeds=fs, config=LOOSE)
    (clip,) = result.decisions
    assert clip.outcome is Outcome.HOLDOUT and clip.outcome.kind == "rolled_back" and "held-out test split" in clip.reason
    held = result.holdout
    assert held is not None and held.status == "backed_off" and held.holds is True
    assert held.searched is not None and not held.searched.holds  # the search's result broke it
    assert held.final is not None and held.final.holds and [b.decisions for b in held.backed_off] == [(0,)]
    assert (result.passes[0].kept, result.passes[0].rolled_back) == (0, 1)
    assert not any(n.op_type == "Clip" for n in result.model.graph.node) and not result.kept
    # The written model holds the budget on the test feeds, measured here independently.
    stats = compare_outputs([dict(zip(["P"], o)) for o in run_reference(original, fs.test)],
                            [dict(zip(["P"], o)) for o in run_reference(result.model, fs.test)])
    assert not LOOSE.budget.failures(stats, exact=False)


def test_units_are_undone_in_the_validation_order_until_the_test_split_holds() -> None:
    """The order comes from the search's own (validation) measurements, so the test split only says where to
    stop: here the clip, which spent nothing on validation, goes last, after the rewrites that spent more per
    MAC saved; nothing is undone after the test split holds, and the counts follow."""
    fs = tuned()
    result = optimize(parse(CHAIN3), [ClipInput(), Perturb()], feeds=fs, config=LOOSE)
    held = result.holdout
    assert held is not None and held.status == "backed_off" and held.holds and held.final is not None and held.final.holds
    scores = [b.score for b in held.backed_off]
    assert scores == sorted(scores, reverse=True) and held.backed_off[-1].descriptions == ("clip A's input",)
    assert [b.after.holds for b in held.backed_off] == [False] * (len(scores) - 1) + [True]  # stopped once it held
    undone = {i for b in held.backed_off for i in b.decisions}
    assert {i for i, d in enumerate(result.decisions) if d.outcome is Outcome.HOLDOUT} == undone
    kinds = [d.outcome.kind for d in result.decisions]
    assert sum(r.kept for r in result.passes) == kinds.count("kept") and sum(r.rolled_back for r in result.passes) == kinds.count("rolled_back")


def test_the_rewrite_that_spent_most_per_mac_saved_goes_first_and_the_rest_stay() -> None:
    """Clipping at 0.8 moves the validation outputs a little (it spends budget there) for one MAC saved: it
    goes first, the test split then holds, and the perturbations stay. The final numerics are the
    backed-off model's."""
    fs = tuned()
    original = parse(CHAIN3)
    result = optimize(original, [ClipInput(bound=0.8, saves=1), Perturb()], feeds=fs, config=LOOSE)
    outcomes = {d.candidate.description: d.outcome for d in result.decisions}
    assert outcomes == {"clip A's input": Outcome.HOLDOUT, "perturb C x1": Outcome.KEPT, "perturb B x1": Outcome.KEPT,
                        "perturb A x1": Outcome.NUMERICS, "perturb A x2": Outcome.NOT_TRIED_DOMINATED}
    held = result.holdout
    assert held is not None and held.status == "backed_off" and len(held.backed_off) == 1 and held.backed_off[0].after.holds
    assert not any(n.op_type == "Clip" for n in result.model.graph.node)
    names = ["P"]
    stats = compare_outputs([dict(zip(names, o)) for o in run_reference(original, fs.validation)],
                            [dict(zip(names, o)) for o in run_reference(result.model, fs.validation)])
    assert result.final_numerics["P"].cosine == pytest.approx(stats["P"].cosine) and stats["P"].cosine < 1.0
    assert (result.passes[0].kept, result.passes[0].rolled_back, result.passes[1].kept) == (0, 1, 2)
    # The plan holds the rewrites left, and replays to the very model written.
    from rewriter.plan import apply_plan, plan_from_result

    plan = plan_from_result(result, input_sha256=None)
    assert [s.pass_name for s in plan.steps] == ["perturb", "perturb"]
    replayed = apply_plan(original, plan, available={"clip_input": ClipInput, "perturb": Perturb})
    assert replayed.model.SerializeToString() == result.model.SerializeToString()


def test_the_back_off_order_is_budget_spent_per_mac_saved() -> None:
    budget = Budget.parse("cosine>=0.99,max-abs<=0.1")
    stats = {"y": OutputStats("y", 0.05, 0.01, 0.1, 0.995, 30.0, 1.0, 0, 10)}
    assert budget_spend(stats, budget) == pytest.approx(0.5)  # (1 - 0.995) / (1 - 0.99) and 0.05 / 0.1 are both half
    drop = TaskMetric(lambda s: 0.0, max_drop=0.04)
    assert budget_spend(stats, budget, (1.0, 0.99, drop)) == pytest.approx(0.5)
    assert budget_spend(stats, budget, (1.0, 0.97, drop)) == pytest.approx(0.75)  # the metric's drop is the worst term
    floor = TaskMetric(lambda s: 0.0, min_value=0.0)  # a floor only (no allowed drop): the room above it is the budget
    assert budget_spend(stats, budget, (0.01, 0.0046, floor)) == pytest.approx(0.54)
    assert budget_spend(stats, Budget.parse("snr-db>=20")) == pytest.approx(20 / 30)
    found = [Unit((0,), True, 0.2, 100), Unit((1,), False, 0.0, 10), Unit((2,), True, 0.2, 1000), Unit((3,), True, 0.1, 10)]
    assert [u.members for u in back_off_order(found)] == [(3,), (0,), (2,)]  # exact units are never backed off


def test_a_rewrite_built_on_another_goes_with_it() -> None:
    original = Model.from_source(parse(CHAIN3))
    conv_c = next(n.name for n in original.proto.graph.node if n.output[0] == "C")
    p = Perturb()
    first = Decision(Candidate("perturb", (conv_c,), "perturb C", Cost(100, 50, 1, 1), {"strength": 1}), False, Outcome.SUPERSEDED, "")
    second = Decision(Candidate("perturb", (conv_c + "_p",), "perturb C again", Cost(100, 50, 1, 1), {"strength": 1}), False, Outcome.KEPT, "")
    other = next(n.name for n in original.proto.graph.node if n.output[0] == "B")
    third = Decision(Candidate("perturb", (other,), "perturb B", Cost(100, 50, 1, 1), {"strength": 1}), False, Outcome.KEPT, "")
    found = units(original, [first, second, third], {"perturb": p}, {0: 0.1, 1: 0.2, 2: 0.05})
    assert sorted((u.members, round(u.spend, 6), u.macs_saved) for u in found) == [((0, 1), 0.3, 100), ((2,), 0.05, 50)]


# -- the task metric's split ----------------------------------------------------------------------------------
def test_a_metric_with_a_split_scores_validation_in_the_search_and_test_after_it() -> None:
    """The metric: how close the model's scores stay to the original's, on inputs of its own per split (small
    ones for validation, large ones for test). Numerics alone (no test feeds here) cannot see the clip."""
    original = parse(CHAIN3)
    data = {"validation": feeds(4, 0.3, 5), "test": feeds(4, 4.0, 6)}
    reference = {k: run_reference(original, v) for k, v in data.items()}
    calls: list[str] = []

    def closeness(session, split: str = "validation") -> float:  # type: ignore[no-untyped-def]
        calls.append(split)
        outs = [session.run(None, f)[0] for f in data[split]]
        return -float(np.mean([np.abs(o - r[0]).mean() for o, r in zip(outs, reference[split])]))

    metric = TaskMetric(closeness, max_drop=1e-3, name="closeness")
    assert metric.takes_split and not TaskMetric(lambda session: 1.0).takes_split
    config = ValidationConfig(budget=Budget.parse("cosine>=0.5"), latency=False, metric=metric)
    small = feeds(8, 0.3, 0)
    result = optimize(original, [ClipInput()], feeds=FeedSet(small[:4], small[4:], "small"), config=config)
    first_test = calls.index("test")
    assert set(calls[:first_test]) == {"validation"} and set(calls[first_test:]) == {"test"}
    held = result.holdout
    assert held is not None and held.metric_split is True and held.status == "backed_off"
    assert held.searched is not None and held.searched.metric is not None and held.searched.metric < -1e-3
    assert held.metric_baseline is not None and abs(held.metric_baseline) < 1e-6
    assert held.final is not None and held.final.metric == held.metric_baseline
    assert result.decisions[0].outcome is Outcome.HOLDOUT


def test_a_metric_without_a_split_is_not_rescored() -> None:
    config = ValidationConfig(budget=Budget.parse("cosine>=0.5"), latency=False, metric=TaskMetric(lambda session: 1.0, name="one"))
    result = optimize(parse(CHAIN3), [ClipInput()], config=config)
    assert result.holdout is not None and result.holdout.status == "off" and result.holdout.metric_split is False
    assert result.decisions[0].outcome is Outcome.KEPT


# -- the command line -------------------------------------------------------------------------------------
@pytest.fixture()
def clip_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """CHAIN3 on disk, ``clip_input`` as the run's pass, and a feeds file whose default test split holds large
    inputs (the split is seeded: the same function picks the same places)."""
    monkeypatch.setattr(OptimizeOptions, "build_passes", lambda self: [ClipInput()])
    model = tmp_path / "chain.onnx"
    onnx.save(parse(CHAIN3), model)
    n = 12
    test_places, _ = split_holdout(list(range(n)), 0.25, seed=0)
    x = np.stack([f["X"] * (4.0 / 0.3 if i in test_places else 1.0) for i, f in enumerate(feeds(n, 0.3, 0))])
    data = tmp_path / "feeds.npz"
    np.savez(data, X=x)
    return model, data


def test_the_cli_backs_off_and_reports_it(clip_cli: tuple[Path, Path], tmp_path: Path, report_validator) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    model, data = clip_cli
    output, report, html = tmp_path / "out.onnx", tmp_path / "report.json", tmp_path / "report.html"
    result = invoke("optimize", model, "-o", output, "--report", report, "--html", html, "--no-latency",
                    "--max-error", "cosine>=0.99", "--feeds", data)
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert_valid(report_validator, rep)
    held = rep["holdout"]
    assert held["status"] == "backed_off" and held["holds"] is True and held["sizes"] == {"calibration": 4, "validation": 5, "test": 3}
    assert held["searched"]["holds"] is False and held["final"]["holds"] is True and held["backed_off"][0]["decisions"] == [0]
    assert rep["decisions"][0]["outcome"] == "holdout" and rep["decisions"][0]["decision"] == "rolled_back"
    assert rep["passes"][0]["kept"] == 0 and rep["gate"]["passed"]
    assert not any(n.op_type == "Clip" for n in onnx.load(output).graph.node)
    assert "held-out test split (3 feeds the search never saw" in result.output
    assert "Held-out test split" in html.read_text() and "Held-out test split" in render_html(rep)


def test_holdout_fail_exits_1_and_writes_no_model(clip_cli: tuple[Path, Path], tmp_path: Path, report_validator) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    model, data = clip_cli
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke("optimize", model, "-o", output, "--report", report, "--no-latency", "--max-error", "cosine>=0.99",
                    "--feeds", data, "--holdout-fail")
    line = assert_one_line_error(result, exit_code=1)
    assert "held-out test split" in line and "--holdout-fail" in line
    assert not output.exists()
    rep = json.loads(report.read_text())
    assert_valid(report_validator, rep)
    assert rep["holdout"]["status"] == "broken" and rep["holdout"]["holds"] is False and rep["output"]["path"] is None
    assert rep["decisions"][0]["outcome"] == "kept"  # nothing backed off


def test_holdout_fraction_0_from_a_config_file_holds_nothing_out(clip_cli: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = clip_cli
    config = tmp_path / "rewriter.toml"
    config.write_text("holdout-fraction = 0\n")
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke("optimize", model, "-o", output, "--report", report, "--no-latency", "--max-error", "cosine>=0.99",
                    "--feeds", data, "--config", config)
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert rep["holdout"]["status"] == "off" and rep["holdout"]["sizes"]["test"] == 0
    assert rep["decisions"][0]["outcome"] == "numerics"  # the large inputs are then the search's own to judge


def test_too_few_feeds_for_three_splits_is_a_usage_error(clip_cli: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = clip_cli
    few = tmp_path / "few.npz"
    np.savez(few, X=np.stack([f["X"] for f in feeds(2, 0.3, 0)]))
    line = assert_one_line_error(invoke("optimize", model, "-o", tmp_path / "out.onnx", "--no-latency", "--feeds", few))
    assert "at least 3" in line and "--holdout-fraction 0" in line
    assert invoke("optimize", model, "-o", tmp_path / "out.onnx", "--no-latency", "--feeds", few, "--holdout-fraction", "0").exit_code == 0


def test_a_sweep_maps_the_search_s_own_curve_and_leaves_the_test_split_out() -> None:
    from rewriter.sweep import sweep
    from rewriter.validation.latency import TimingOptions

    config = ValidationConfig(budget=Budget.parse("cosine>=0.99"), latency=False, timing=TimingOptions(min_pairs=4, max_pairs=6, time_budget_s=0.3))
    result = sweep(parse(CHAIN3), [ClipInput()], feeds=tuned(), config=config)
    assert result.search.holdout is not None and result.search.holdout.status == "off"
    assert [p.label for p in result.points] == ["original", "clip A's input"]
