"""The int8 stage of ``optimize --precision int8`` (rewriter.precision.stage) through the CLI, on tiny conv chains with
.npz feeds; latency comes from a fake clock (no timing runs): a conv costs 3 ms in float and 1 ms in int8 (``FAST``)
or 5 ms in int8 (``SLOW``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from rewriter.precision import BudgetCheck, LeaveOneOutOptions, SearchOptions, search_int8
from rewriter.precision.check import metric_spend
from rewriter.precision.int8 import quantize_int8
from rewriter.validation.judge import Judge, TaskMetric
from rewriter.validation.latency import LatencyComparison
from rewriter.validation.numerics import Budget
from rewriter.validation.stats import RatioCI
from tests.helpers import assert_valid
from tests.test_cli import assert_one_line_error, invoke
from tests.test_int8 import chain, feeds, float_convs

FAST, SLOW = 1.0, 5.0


def _millis(proto: onnx.ModelProto, int8_ms: float) -> float:
    """3 ms per float conv, ``int8_ms`` per conv whose weight is dequantized."""
    dq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(int8_ms if n.input[1] in dq else 3.0 for n in proto.graph.node if n.op_type == "Conv")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The fake judge clock; ``clock.int8_ms`` sets an int8 conv's cost, ``clock.calls`` counts timings."""

    class Clock:
        int8_ms = FAST
        calls = 0

    def model_latency(self, base, candidate, profile=None):  # type: ignore[no-untyped-def]
        Clock.calls += 1
        b, c = _millis(base, Clock.int8_ms), _millis(candidate, Clock.int8_ms)
        ratio = b / c
        return LatencyComparison(b / 1e3, c / 1e3, RatioCI(ratio, 0.99 * ratio, 1.01 * ratio, 20), 1)

    def region_latency(self, accepted, trial, candidate, profile=None):  # type: ignore[no-untyped-def]
        return LatencyComparison(1e-3, 1e-3, RatioCI(1.0, 0.99, 1.01, 20), 1)

    monkeypatch.setattr(Judge, "model_latency", model_latency)
    monkeypatch.setattr(Judge, "region_latency", region_latency)
    return Clock


def _files(tmp_path: Path, model: onnx.ModelProto, n: int = 16) -> tuple[Path, Path]:
    path, data = tmp_path / "chain.onnx", tmp_path / "feeds.npz"
    onnx.save(model, path)
    np.savez(data, X=np.stack([f["X"] for f in feeds(n, 7)]))
    return path, data


def _run(tmp_path: Path, model: Path, data: Path, *extra: str | Path):  # type: ignore[no-untyped-def]
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke("optimize", model, "-o", out, "--report", report, "--feeds", data, *extra)
    return result, out, report


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(path).graph.node}


def test_cli_int8_writes_a_qdq_model_and_a_report_the_schema_accepts(tmp_path: Path, clock, report_validator) -> None:  # type: ignore[no-untyped-def]
    model, data = _files(tmp_path, chain(4))
    config = tmp_path / "rewriter.toml"
    config.write_text('precision = "int8"\n')  # the config file's key, as --precision
    result, out, report = _run(tmp_path, model, data, "--max-error", "cosine>=0.99", "--config", config)
    assert result.exit_code == 0, result.output
    assert "QuantizeLinear" in _ops(out) and "int8: int8" in result.output
    rep = json.loads(report.read_text())
    assert_valid(report_validator, rep)
    p = rep["precision"]
    assert p["status"] == "int8" and p["kept"] and p["counts"] == {"int8": 4, "float": 0}
    assert p["recipe"]["format"] == "QDQ" and p["recipe"]["per_channel"] and p["recipe"]["activations"] == "uint8"
    assert set(p["budget"]) == {"validation", "test"} and all(b["holds"] for b in p["budget"].values())
    assert p["latency"] and all(row["faster"] for row in p["latency"])
    assert rep["gate"]["passed"] and rep["totals"]["final_latency"]["speedup"] > 1  # the written int8 model's
    assert rep["totals"]["ops_after"].get("QuantizeLinear", 0) > 0 and "QuantizeLinear" not in rep["totals"]["ops_before"]
    # No structure rewrite: the float result is the input, so the end-to-end figure is the gate's own timing.
    assert not rep["decisions"] and clock.calls == p["island_timings"] + len(p["latency"])
    assert rep["totals"]["final_latency"]["speedup"] == p["latency"][0]["speedup"]


def test_int8_needs_real_data_and_a_lossy_budget(tmp_path: Path) -> None:
    model, data = _files(tmp_path, chain(2))
    no_data = invoke("optimize", model, "-o", tmp_path / "o.onnx", "--precision", "int8", "--max-error", "cosine>=0.99")
    assert "real data" in assert_one_line_error(no_data)
    no_budget = invoke("optimize", model, "-o", tmp_path / "o.onnx", "--precision", "int8", "--feeds", data)
    assert "--max-error" in assert_one_line_error(no_budget)
    assert "fp32 or int8" in assert_one_line_error(invoke("optimize", model, "-o", tmp_path / "o.onnx", "--precision", "int4"))
    assert not (tmp_path / "o.onnx").exists()


def test_int8_not_shown_faster_keeps_the_float_model_and_says_why(tmp_path: Path, clock, report_validator) -> None:  # type: ignore[no-untyped-def]
    clock.int8_ms = SLOW
    model, data = _files(tmp_path, chain(3))
    result, out, report = _run(tmp_path, model, data, "--max-error", "cosine>=0.99", "--precision", "int8")
    assert result.exit_code == 0, result.output
    assert "QuantizeLinear" not in _ops(out)
    rep = json.loads(report.read_text())
    assert_valid(report_validator, rep)
    p = rep["precision"]
    assert p["status"] == "float" and not p["kept"]
    # The islands are timed first (each shown slower goes float); whatever is left must be shown faster.
    assert "shown slower" in p["reason"] or ("not shown faster" in p["reason"] and not p["latency"][0]["faster"])
    assert p["island_timings"] >= 1 or p["latency"]


def test_a_sensitive_layer_stays_float_through_the_cli(tmp_path: Path, clock, report_validator) -> None:  # type: ignore[no-untyped-def]
    model, data = _files(tmp_path, chain(8, sensitive=4), n=24)
    result, out, report = _run(tmp_path, model, data, "--max-error", "cosine>=0.999", "--precision", "int8")
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert_valid(report_validator, rep)
    p = rep["precision"]
    assert p["status"] == "mixed" and p["kept"] and p["counts"]["float"] >= 1
    floats = [d["node"] for d in p["nodes"] if d["precision"] == "float"]
    names = [d["node"] for d in p["nodes"]]
    assert {names[4], names[5]} <= set(floats) and len(floats) <= 4  # the sensitive pair (convs 4 and 5), and few more
    assert p["ranking"]["method"] == "leave-one-in" and p["ranking"]["tried"] >= 1
    assert float_convs(onnx.load(out)) == len(floats)
    assert p["budget"]["test"]["holds"] and p["budget"]["validation"]["holds"]


def test_a_quantized_input_is_skipped_with_the_reason(tmp_path: Path, clock, report_validator) -> None:  # type: ignore[no-untyped-def]
    qdq, _ = quantize_int8(chain(3), feeds(4, 0))
    model, data = _files(tmp_path, qdq)
    result, out, report = _run(tmp_path, model, data, "--max-error", "cosine>=0.99", "--precision", "int8")
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert_valid(report_validator, rep)
    assert rep["precision"]["status"] == "skipped" and "already quantized" in rep["precision"]["reason"]
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node) == sum(
        n.op_type == "QuantizeLinear" for n in qdq.graph.node)  # never quantized twice


def test_the_leave_one_out_ranking_puts_the_sensitive_pair_first() -> None:
    model = chain(8, sensitive=4)
    check = BudgetCheck(model, {"validation": feeds(8, 1), "test": feeds(8, 2)}, Budget.parse("cosine>=0.999"))
    result = search_int8(model, feeds(8, 0), check, spend=check.spend)
    ranking = result.ranking
    assert ranking["method"] == "leave-one-in" and ranking["tried"] == 8 and ranking["untried"] == 0
    first = ranking["units"][0]["node"]
    names = [d.node for d in result.nodes]
    assert first in names[4:6] and ranking["units"][0]["spend"] > 1  # that unit alone in int8 breaks the budget
    assert sum(t.purpose.startswith("ranking") for t in result.trials) == 9  # full int8 and one per unit
    assert result.counts == {"int8": 6, "float": 2}


def test_optimize_many_runs_the_stage_and_without_latency_keeps_float(tmp_path: Path) -> None:
    from rewriter.fleet import optimize_many
    from rewriter.job import OptimizeOptions

    model, data = _files(tmp_path, chain(2))
    options = OptimizeOptions(precision="int8", max_error="cosine>=0.99", feeds=(str(data),), latency=False)
    result = optimize_many([model], tmp_path / "out", options, jobs=1)
    assert not result.failed
    rep = json.loads((tmp_path / "out" / "chain.report.json").read_text())
    p = rep["precision"]
    assert p["status"] == "float" and not p["kept"] and "latency not measured" in p["reason"]
    assert p["counts"]["int8"] >= 1 and p["budget"]["validation"]["holds"]  # searched, held, but not shown to pay


@pytest.mark.parametrize("bounds", [LeaveOneOutOptions(direction="out"), LeaveOneOutOptions(max_units=2)])
def test_leave_one_out_and_a_capped_ranking_still_keep_the_sensitive_pair_float(bounds: LeaveOneOutOptions) -> None:
    model = chain(8, sensitive=4)
    check = BudgetCheck(model, {"validation": feeds(8, 1), "test": feeds(8, 2)}, Budget.parse("cosine>=0.999"))
    result = search_int8(model, feeds(8, 0), check, spend=check.spend, options=SearchOptions(leave_one_out=bounds))
    names = [d.node for d in result.nodes]
    assert {names[4], names[5]} <= set(result.float_nodes) and not check(result.model, "test")
    ranking = result.ranking
    if bounds.direction == "out":
        assert ranking["method"] == "leave-one-out" and ranking["base_spend"] > 1  # full int8 breaks the budget
    else:
        assert ranking["tried"] == 2 and ranking["untried"] == 6 and ranking["stopped"] == "max_units"


def test_metric_spend_is_the_share_of_the_allowed_drop_or_of_the_room_above_the_floor() -> None:
    def fn(session):  # type: ignore[no-untyped-def]
        return 0.0

    assert metric_spend(0.9, 0.89, TaskMetric(fn, max_drop=0.02)) == pytest.approx(0.5)
    assert metric_spend(0.9, 0.7, TaskMetric(fn, min_value=0.5)) == pytest.approx(0.5)
    assert metric_spend(0.9, 0.9, TaskMetric(fn)) == 0.0


def test_a_plan_replays_the_int8_stage_byte_for_byte_on_the_same_data(tmp_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    model, data = _files(tmp_path, chain(8, sensitive=4), n=24)
    plan = tmp_path / "plan.json"
    result, out, _ = _run(tmp_path, model, data, "--max-error", "cosine>=0.999", "--precision", "int8", "--save-plan", plan)
    assert result.exit_code == 0, result.output
    import jsonschema

    written = json.loads(plan.read_text())
    jsonschema.Draft202012Validator(json.loads((Path(__file__).parents[1] / "docs" / "plan.schema.json").read_text())).validate(written)
    recorded = written["precision"]
    assert recorded is not None and recorded["excluded"] and recorded["recipe"]["activations"] == "uint8"
    again = tmp_path / "again.onnx"
    replayed = invoke("apply", model, "--plan", plan, "-o", again, "--feeds", data)
    assert replayed.exit_code == 0, replayed.output
    assert again.read_bytes() == out.read_bytes()  # the same structure, calibration and float nodes: the same bytes
    # Without the data, or with other data, the stage cannot be replayed: one line, exit 2, nothing written.
    assert "calibrated on" in assert_one_line_error(invoke("apply", model, "--plan", plan, "-o", tmp_path / "none.onnx"))
    other = tmp_path / "other.npz"
    np.savez(other, X=np.stack([f["X"] for f in feeds(24, 99)]))
    assert "differ" in assert_one_line_error(invoke("apply", model, "--plan", plan, "-o", tmp_path / "none.onnx", "--feeds", other))
    assert not (tmp_path / "none.onnx").exists()
