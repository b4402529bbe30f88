"""The optimize report and the pipeline step: JSON schema, target speedup, the gate's exit codes, idempotence,
plain output.

Reports are validated against the documented schema (docs/report.schema.json). CLI runs go through
typer's CliRunner, where stdout and stderr are not terminals (as in CI).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest
from typer.testing import CliRunner

from passes.fuse_1x1_chain import Fuse1x1Chain
from rewriter.cli import app
from rewriter.contract import Candidate, Cost, Pass
from rewriter.io import sha256_file
from rewriter.model import Model
from rewriter.pipeline import OptimizeResult, optimize
from rewriter.report import ParetoPoint, SCHEMA_VERSION, build_report
from rewriter.validation.judge import ValidationConfig
from tests.helpers import assert_valid
from tests.test_gate import with_latency

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
#: Any C0 control character but newline and tab, DEL, and C1 controls (ESC starts every ANSI sequence).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


class RaisingPass(Pass):
    name = "raising"
    summary = "always raises in apply"
    exact = True

    def find(self, model: Model):  # type: ignore[no-untyped-def]
        yield Candidate(self.name, (model.graph.nodes[0].name,), "boom", Cost(1, 0, 0, 0))

    def apply(self, model: Model, candidate: Candidate) -> None:
        raise RuntimeError("deliberate failure")


@pytest.fixture(scope="module")
def numerics_only_result(sample_model: onnx.ModelProto) -> OptimizeResult:
    return optimize(sample_model, [RaisingPass(), Fuse1x1Chain()], config=ValidationConfig(latency=False))


# -- schema --------------------------------------------------------------------------------------------
def test_cli_report_with_latency_matches_the_schema(sample_path: Path, tmp_path: Path, report_validator) -> None:  # type: ignore[no-untyped-def]
    output, report = tmp_path / "opt.onnx", tmp_path / "report.json"
    result = invoke("optimize", sample_path, "-o", output, "--report", report, "--passes", "fuse_1x1_chain", "--max-pairs", "6",
                    "--target-speedup", "1.01")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert_valid(report_validator, data)
    target = data["target_speedup"]  # the exact pass is not stopped by it; the report says where the run ended
    assert target["speedup"] == 1.01 and target["reached"] in (True, False)  # the rule: test_report_target_speedup
    assert f"target speedup 1.01x: {'reached' if target['reached'] else 'not reached'} (" in result.output
    assert data["schema_version"] == SCHEMA_VERSION == 8
    assert data["normalized"] == []
    assert [(n["input"], n["dim"], n["declared"], n["value"]) for n in data["input_shape_notes"]] == [("input", 0, "N", 1)]  # batch N taken as 1
    env = data["environment"]
    assert env["provider"] == "cpu" and env["threads"] == 1 and env["onnxruntime"] and env["cpu"]
    assert data["input"]["sha256"] == sha256_file(sample_path)
    assert data["output"] == {"path": str(output), "sha256": sha256_file(output)}
    (kept,) = [d for d in data["decisions"] if d["kept"]]
    # A run of exact passes is proven once, on its result: the decision carries that end-to-end comparison.
    assert kept["decision"] == "kept" and kept["latency"]["scope"] == "result" and data["totals"]["exact_latency"] == "result"
    assert {k: v for k, v in kept["latency"].items() if k != "scope"} == {k: v for k, v in data["totals"]["final_latency"].items() if k != "scope"}
    assert data["search"] == {"bound": "complete", "candidates": 1, "judged": 1, "dominated": 0, "untried": {},
                              "budget_spent": None, "time_budget_s": None}
    assert kept["cost"]["macs_after"] < kept["cost"]["macs_before"]
    assert set(kept["numerics"]) == {o.name for o in onnx.load(str(sample_path)).graph.output}
    final = data["totals"]["final_latency"]
    assert final["ci_low"] <= final["speedup"] <= final["ci_high"]
    assert data["gate"] == {"passed": True, "failures": []}
    assert data["pareto"] is None


def test_report_of_every_kind_of_decision_matches_the_schema(numerics_only_result: OptimizeResult, report_validator) -> None:  # type: ignore[no-untyped-def]
    points = [ParetoPoint(1.4, 1e-3, "rank 16"), ParetoPoint(1.2, 2e-4, "rank 32")]
    data = build_report(
        numerics_only_result, input_path=None, input_sha256=None, output_path=None, output_sha256=None,
        provider="cpu", threads=1, gate=["numerics: made up"], pass_options={"fuse_1x1_chain": {}}, pareto=points,
    )
    data = json.loads(json.dumps(data, allow_nan=False))  # what write_json writes
    assert_valid(report_validator, data)
    raised, fused = data["decisions"]
    assert raised["decision"] == "rolled_back" and raised["outcome"] == "raised" and "deliberate failure" in raised["reason"]
    assert raised["numerics"] == {} and raised["latency"] is None and raised["end_to_end"] is None
    assert fused["decision"] == fused["outcome"] == "kept" and fused["latency"] is None  # --no-latency
    assert data["gate"] == {"passed": False, "failures": ["numerics: made up"]}
    assert data["pareto"][0] == {"speedup": 1.4, "error": 1e-3, "label": "rank 16"}
    assert [p["name"] for p in data["passes"]] == ["raising", "fuse_1x1_chain"]


def test_screened_lossy_decisions_match_the_schema(report_validator) -> None:  # type: ignore[no-untyped-def]
    from rewriter.validation.numerics import Budget
    from tests.helpers import parse
    from tests.search_fixtures import CHAIN3, Perturb

    result = optimize(parse(CHAIN3), [Perturb()], config=ValidationConfig(budget=Budget.parse("cosine>=0.5"), latency=False))
    data = json.loads(json.dumps(build_report(
        result, input_path=None, input_sha256=None, output_path=None, output_sha256=None, provider="cpu", threads=1,
        gate=[], pass_options={"perturb": {}}), allow_nan=False))
    assert_valid(report_validator, data)
    screened = [d["screening"] for d in data["decisions"]]
    assert len(screened) == 3 and all(s is not None and s["predicted"] == s["measured"] > 0 for s in screened)
    assert [s["screened"] for s in screened] == [d["description"] for d in data["decisions"]]


def test_schema_rejects_a_report_missing_a_field(numerics_only_result: OptimizeResult, report_validator) -> None:  # type: ignore[no-untyped-def]
    data = build_report(numerics_only_result, input_path=None, input_sha256=None, output_path=None, output_sha256=None, provider="cpu", threads=1)
    del data["decisions"][0]["reason"]
    assert not report_validator.is_valid(data)


# -- the target speedup --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "ci", "expected"),
    [
        (1.2, (1.2, 1.5), {"speedup": 1.2, "reached": True}),  # the CI's low end exactly at the target counts
        (1.2, (1.25, 1.35), {"speedup": 1.2, "reached": True}),
        (1.2, (1.19, 1.61), {"speedup": 1.2, "reached": False}),  # the point estimate (1.4x) is not enough
        (1.5, (1.3, 1.45), {"speedup": 1.5, "reached": False}),
        (1.2, None, {"speedup": 1.2, "reached": False}),  # latency not measured: not shown
        (None, (1.2, 1.5), None),  # no target asked for
    ],
)
def test_report_target_speedup(
    numerics_only_result: OptimizeResult, target: float | None, ci: tuple[float, float] | None, expected: dict[str, Any] | None
) -> None:
    result = dataclasses.replace(numerics_only_result, target_speedup=target)
    if ci is not None:
        result = with_latency(result, *ci, target)
    data = build_report(result, input_path=None, input_sha256=None, output_path=None, output_sha256=None, provider="cpu", threads=1)
    assert data["target_speedup"] == expected


# -- the final gate's exit codes -----------------------------------------------------------------------
def test_fail_if_no_speedup_exits_1_and_writes_nothing(sample_path: Path, tmp_path: Path, report_validator) -> None:  # type: ignore[no-untyped-def]
    first = tmp_path / "first.onnx"
    assert invoke("optimize", sample_path, "-o", first, "--no-latency", "--passes", "fuse_1x1_chain").exit_code == 0
    output, report, plan = tmp_path / "again.onnx", tmp_path / "report.json", tmp_path / "plan.json"
    result = invoke("optimize", first, "-o", output, "--report", report, "--save-plan", plan, "--passes", "fuse_1x1_chain", "--fail-if-no-speedup")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        "error: gate failed, no output written: no end-to-end speedup: no rewrite was kept"
    ]
    assert not output.exists() and not plan.exists()
    data = json.loads(report.read_text())
    assert_valid(report_validator, data)
    assert data["gate"]["passed"] is False and data["output"] == {"path": None, "sha256": None}


def test_fail_if_no_speedup_needs_latency(sample_path: Path, tmp_path: Path) -> None:
    result = invoke("optimize", sample_path, "-o", tmp_path / "o.onnx", "--no-latency", "--fail-if-no-speedup")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: --fail-if-no-speedup needs latency measurement; drop --no-latency"]
    assert os.listdir(tmp_path) == ["sample.onnx"]


def test_missing_report_folder_is_refused_before_any_work(sample_path: Path, tmp_path: Path) -> None:
    output = tmp_path / "o.onnx"
    result = invoke("optimize", sample_path, "-o", output, "--no-latency", "--report", tmp_path / "nope" / "r.json")
    assert result.exit_code == 2
    assert "output folder" in result.stderr and "does not exist" in result.stderr
    assert not output.exists()


# -- idempotence ---------------------------------------------------------------------------------------
def test_optimize_on_its_own_output_is_byte_identical(sample_path: Path, tmp_path: Path) -> None:
    first, second, report = tmp_path / "first.onnx", tmp_path / "second.onnx", tmp_path / "report.json"
    assert invoke("optimize", sample_path, "-o", first, "--no-latency").exit_code == 0
    assert sha256_file(first) != sha256_file(sample_path)  # the first run did change the model
    result = invoke("optimize", first, "-o", second, "--no-latency", "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["totals"]["kept"] == 0
    assert sha256_file(second) == sha256_file(first) == data["output"]["sha256"] == data["input"]["sha256"]


# -- human output --------------------------------------------------------------------------------------
def test_output_off_a_terminal_is_plain(sample_path: Path, tmp_path: Path) -> None:
    result = invoke("optimize", sample_path, "-o", tmp_path / "o.onnx", "--passes", "fuse_1x1_chain", "--max-pairs", "4")
    assert result.exit_code == 0, result.output
    assert "Decisions" in result.stdout and "wrote" in result.stdout
    for stream in (result.stdout, result.stderr):
        assert not CONTROL.search(stream), repr(CONTROL.search(stream))
    verbose = runner.invoke(app, ["--verbose", "optimize", str(sample_path), "-o", str(tmp_path / "v.onnx"), "--no-latency", "--passes", "fuse_1x1_chain"])
    assert verbose.exit_code == 0 and "kept fuse 1x1 chain" in verbose.stderr  # the decision log
    assert not CONTROL.search(verbose.stdout + verbose.stderr)


def test_quiet_prints_only_the_result(sample_path: Path, tmp_path: Path) -> None:
    output = tmp_path / "o.onnx"
    result = runner.invoke(app, ["--quiet", "optimize", str(sample_path), "-o", str(output), "--no-latency"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines() == [f"wrote {output}: 1 rewrite(s) kept, 0 rolled back"]
    assert result.stderr == ""


# -- the Python API example ----------------------------------------------------------------------------
def test_python_api_example_runs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python_api.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical output: True" in proc.stdout
    assert {"report.json", "report.html", "plan.json", "sample.opt.onnx"} <= set(os.listdir(tmp_path))
