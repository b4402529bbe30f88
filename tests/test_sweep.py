"""The speedup-vs-error sweep: the path of one search, each step measured against the original."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from rewriter.cli import app
from rewriter.html_report import FRONT_COLOUR, CurvePoint, curve_svg, render_sweep_html, sweep_axis, text_boxes
from rewriter.io import sha256_file
from rewriter.model import Model
from rewriter.sweep import SweepPoint, pareto_front, sweep
from rewriter.validation.feeds import FeedSet
from rewriter.validation.judge import ValidationConfig
from rewriter.validation.latency import TimingOptions
from rewriter.validation.numerics import Budget
from tests.html_checks import page_problems

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits" / "digits_cnn.onnx"
FAST = TimingOptions(min_pairs=6, max_pairs=10, time_budget_s=0.3)


def _point(step: int, speedup: float, error: float) -> SweepPoint:
    return SweepPoint(step, f"s{step}", speedup, speedup, speedup, error, 0.0, None, 0)


def test_pareto_front_keeps_undominated_points() -> None:
    points = [_point(0, 1.0, 0.0), _point(1, 1.2, 0.01), _point(2, 1.1, 0.02), _point(3, 1.3, 0.05), _point(4, 1.3, 0.06)]
    assert [p.step for p in pareto_front(points)] == [0, 1, 3]


def test_pareto_front_keeps_identical_points_together() -> None:
    """Tie rule: equal points do not beat each other; a point only as fast and less accurate is beaten."""
    points = [_point(0, 1.0, 0.0), _point(1, 1.3, 0.01), _point(2, 1.3, 0.01), _point(3, 1.3, 0.02), _point(4, 1.2, 0.01)]
    assert [p.step for p in pareto_front(points)] == [0, 1, 2]


def test_sweep_table_and_html_mark_the_same_front(sample_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tied points (where the table's and the page's fronts once differed) are marked alike in both."""
    import rewriter.sweep as sweep_module

    points = [_point(0, 1.0, 0.0), _point(1, 1.3, 0.01), _point(2, 1.3, 0.01), _point(3, 1.2, 0.02), _point(4, 1.5, 0.05)]

    def fake_sweep(*args, **kwargs):  # type: ignore[no-untyped-def]
        return sweep_module.SweepResult(points, SimpleNamespace(budget="cosine>=0.99", feeds="random (seed 0)", seconds=1.0), [p.step for p in pareto_front(points)])

    monkeypatch.setattr(sweep_module, "sweep", fake_sweep)
    out_html = tmp_path / "sweep.html"
    res = CliRunner().invoke(app, ["sweep", str(sample_path), "--html", str(out_html)])
    assert res.exit_code == 0, res.output
    table_front = set()
    for line in res.stdout.splitlines():
        cells = [c.strip() for c in line.split("\u2502")]
        if len(cells) > 2 and cells[1].isdigit() and cells[-2] == "*":
            table_front.add(int(cells[1]))
    circles = re.findall(r'fill="(#[0-9a-fA-F]+)"><title>step (\d+):', out_html.read_text())
    assert len(circles) == len(points)
    html_front = {int(step) for colour, step in circles if colour == FRONT_COLOUR}
    assert table_front == html_front == {0, 1, 2, 4}


def _digit_feeds() -> FeedSet:
    pytest.importorskip("sklearn")
    from models.digits import load_split

    x_train, _, x_test, _ = load_split()
    return FeedSet(
        validation=[{"input": x_test[i : i + 4]} for i in range(0, 32, 4)],
        calibration=[{"input": x_train[i : i + 4]} for i in range(0, 32, 4)],
        source="digits",
    )


def test_sweep_measures_every_kept_step_of_the_trained_cnn(monkeypatch: pytest.MonkeyPatch) -> None:
    import rewriter.validation.judge as judge_module

    runs: list[int] = []
    real_run_feeds = judge_module.run_feeds

    def counting(session, feeds):  # type: ignore[no-untyped-def]
        runs.append(len(feeds))
        return real_run_feeds(session, feeds)

    monkeypatch.setattr(judge_module, "run_feeds", counting)
    model = Model.from_source(DIGITS, {"input": (4, 1, 32, 32)})
    config = ValidationConfig(budget=Budget.parse("cosine>=0.98"), timing=FAST, lossy_min_speedup=0.0)
    result = sweep(model, ["bottleneck"], feeds=_digit_feeds(), config=config)
    judged = sum(1 for d in result.search.decisions if d.verdict is not None)
    # one reference run, one numerics run per judged candidate, the search's final one, one per sweep point
    assert len(runs) == 1 + judged + 1 + len(result.points)
    kept = [d for d in result.search.decisions if d.kept]
    assert len(result.points) == 1 + len(kept) >= 2
    assert result.points[0].speedup == 1.0 and result.points[0].error < 1e-6
    for p in result.points[1:]:
        assert p.macs < result.points[0].macs  # every step is a real factorization
        assert p.error <= 0.02 + 1e-9  # within the loosest budget (1 - cosine)
        assert p.ci_low <= p.speedup <= p.ci_high
    assert 0 in result.front
    assert json.loads(json.dumps(result.to_dict()))["points"][0]["label"] == "original"


def test_sweep_cli_writes_json_and_html(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from models.digits import load_split

    x_train, _, _, _ = load_split()
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, input=x_train[:64].reshape(16, 4, 1, 32, 32))
    out_json, out_html = tmp_path / "sweep.json", tmp_path / "sweep.html"
    res = CliRunner().invoke(app, ["sweep", str(DIGITS), "--input-shape", "input:4x1x32x32", "--feeds", str(feeds),
                                   "--max-error", "cosine>=0.98", "--max-pairs", "6", "--json", str(out_json), "--html", str(out_html)])
    assert res.exit_code == 0, res.output
    data = json.loads(out_json.read_text())
    assert data["points"][0]["step"] == 0 and len(data["points"]) >= 2
    assert data["input"] == {"path": str(DIGITS), "sha256": sha256_file(DIGITS)}
    assert data["environment"]["provider"] == "cpu" and data["environment"]["threads"] == 1 and data["environment"]["onnxruntime"]
    assert set(data["points"][1]["budget_values"]) == {"cosine"}
    page = out_html.read_text()
    assert page_problems(page) == []
    assert "1 \u2212 cosine (worst output)" in page and sha256_file(DIGITS) in page and "The Pareto front" in page


# -- the sweep page ----------------------------------------------------------------------------------------
NUDENET = Path(__file__).resolve().parents[1] / "docs" / "bottleneck_nudenet.json"


def test_sweep_page_of_a_long_recorded_sweep_labels_a_thinned_front() -> None:
    """116 steps of NudeNet (docs/bottleneck_nudenet.json, recorded before sweeps kept their environment):
    the front is labelled where labels fit, every point keeps its hover tip, nothing unknown is printed."""
    data = json.loads(NUDENET.read_text())
    page = render_sweep_html(data)
    assert page_problems(page) == []
    labels = re.findall(r'class="pl">step (\d+)</text>', page)
    front = _front_of(page)
    assert 5 <= len(labels) < len(front) and {int(s) for s in labels} <= front
    assert len(re.findall(r"<circle[^>]*><title>step \d+: ", page)) == len(data["points"])
    assert "Speedup vs 1 \u2212 cosine" in page and ">error<" not in page
    rows = re.findall(r"<tr><td class=\"n\">(\d+)</td>", page)
    assert {int(r) for r in rows} == front  # the table lists the front


def _front_of(page: str) -> set[int]:
    return {int(s) for colour, s in re.findall(r'fill="(#[0-9a-fA-F]+)"><title>step (\d+):', page) if colour == FRONT_COLOUR}


def test_sweep_page_draws_the_budget_metric_and_takes_the_front_on_it() -> None:
    points = [
        {"step": 0, "label": "original", "speedup": 1.0, "ci_low": 1.0, "ci_high": 1.0, "error": 0.0, "max_abs": 0.0, "metric": None, "macs": 100,
         "budget_values": {"top1_drop": 0.0, "snr_db": None}},
        {"step": 1, "label": "a", "speedup": 1.2, "ci_low": 1.1, "ci_high": 1.3, "error": 0.02, "max_abs": 1.0, "metric": None, "macs": 90,
         "budget_values": {"top1_drop": 0.01, "snr_db": 30.0}},
        {"step": 2, "label": "b", "speedup": 1.3, "ci_low": 1.2, "ci_high": 1.4, "error": 0.01, "max_abs": 1.0, "metric": None, "macs": 80,
         "budget_values": {"top1_drop": 0.05, "snr_db": 20.0}},
    ]
    data = {"input": {"path": "m.onnx"}, "points": points, "budget": "top1-drop<=0.05,snr-db>=20", "front": [0, 2]}
    assert sweep_axis(data).name == "top-1 drop (worst output)"
    page = render_sweep_html(data)
    assert page_problems(page) == [] and _front_of(page) == {0, 1, 2}  # on top-1 drop, step 1 is not beaten
    assert "1 \u2212 cosine" in page  # the sweep's own error is still in the table
    old = {**data, "points": [{k: v for k, v in p.items() if k != "budget_values"} for p in points]}
    assert sweep_axis(old).name == "1 \u2212 cosine (worst output)" and _front_of(render_sweep_html(old)) == {0, 2}


@pytest.mark.parametrize("seed", range(5))
def test_curve_labels_never_overlap(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    errs, speed = np.sort(rng.uniform(0, 1, n)) ** 3, 1 + np.sort(rng.uniform(0, 1, n))
    points = [CurvePoint(float(e), float(s), float(s), float(s), f"step {i}", f"step {i}", True) for i, (e, s) in enumerate(zip(errs, speed))]
    svg = curve_svg(points, "x")
    boxes = [b for t, b in text_boxes(svg) if t.startswith("step")]
    assert 3 <= len(boxes) < n
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
