"""Plans: optimize --save-plan records the kept rewrites; apply replays them without measuring and gives
the same bytes; a plan for another model, or a step the pass no longer finds, is exit 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from rewriter.cli import app
from rewriter.errors import InputError
from rewriter.io import sha256_file
from rewriter.pipeline import optimize
from rewriter.plan import Plan, PlanStep, apply_plan, feeds_digest, plan_from_result
from rewriter.validation.feeds import FeedSet
from rewriter.validation.judge import ValidationConfig

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int = 2) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture()
def planned(sample_path: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The sample optimized with every exact pass (numerics only) and its plan."""
    output, plan = tmp_path / "opt.onnx", tmp_path / "plan.json"
    result = invoke("optimize", sample_path, "-o", output, "--no-latency", "--save-plan", plan)
    assert result.exit_code == 0, result.output
    return output, plan


def test_plan_records_the_kept_rewrites_and_matches_its_schema(sample_path: Path, planned: tuple[Path, Path]) -> None:
    output, plan_path = planned
    data = json.loads(plan_path.read_text())
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")
    jsonschema.Draft202012Validator(json.loads((ROOT / "docs" / "plan.schema.json").read_text())).validate(data)
    assert data["input_sha256"] == sha256_file(sample_path)
    assert data["output_sha256"] == sha256_file(output)
    assert data["input_shapes"] == {"input": [1, 3, 112, 112]}
    assert [s["pass"] for s in data["steps"]] == ["fuse_1x1_chain"]
    assert data["steps"][0]["nodes"] == ["lin_expand_24", "lin_project_25"]
    assert data["calibration"] is None


def test_apply_is_byte_identical_to_optimize_and_deterministic(sample_path: Path, planned: tuple[Path, Path], tmp_path: Path) -> None:
    output, plan = planned
    shas = []
    for name in ("a.onnx", "b.onnx"):
        result = invoke("apply", sample_path, "--plan", plan, "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
        shas.append(sha256_file(tmp_path / name))
        assert f"sha256 {shas[-1]}" in result.stdout and "1 rewrite(s) replayed" in result.stdout
    assert shas[0] == shas[1] == sha256_file(output)


def test_apply_plan_library_on_a_proto(sample_model: onnx.ModelProto) -> None:
    result = optimize(sample_model, ["fuse_1x1_chain"], config=ValidationConfig(latency=False))
    sha = hashlib.sha256(sample_model.SerializeToString()).hexdigest()
    plan = plan_from_result(result, input_sha256=sha)
    assert [s.nodes for s in plan.steps] == [d.candidate.nodes for d in result.kept]
    replayed = apply_plan(sample_model, Plan.from_dict(json.loads(json.dumps(plan.to_dict()))))
    assert replayed.model.SerializeToString() == result.model.SerializeToString()
    assert replayed.sha256_matches and [c.key for c in replayed.applied] == [d.candidate.key for d in result.kept]


def test_plan_for_another_model_is_refused_unless_forced(sample_path: Path, planned: tuple[Path, Path], tmp_path: Path) -> None:
    output, plan = planned
    other = tmp_path / "other.onnx"
    proto = onnx.load(str(sample_path))
    proto.doc_string = "same graph, other bytes"
    onnx.save_model(proto, str(other))
    target = tmp_path / "x.onnx"
    line = one_line_error(invoke("apply", other, "--plan", plan, "-o", target))
    assert "differs from the plan's" in line and "--force" in line
    assert not target.exists()
    result = invoke("apply", other, "--plan", plan, "-o", target, "--force")
    assert result.exit_code == 0, result.output
    assert "differs from the plan's" in result.stderr  # a warning, still


def test_a_step_the_pass_does_not_find_is_named(sample_path: Path, planned: tuple[Path, Path], tmp_path: Path) -> None:
    _, plan = planned
    data = json.loads(plan.read_text())
    data["steps"].append({"pass": "fuse_1x1_chain", "nodes": ["stem_1", "nope"], "options": {}, "description": ""})
    plan.write_text(json.dumps(data))
    target = tmp_path / "x.onnx"
    line = one_line_error(invoke("apply", sample_path, "--plan", plan, "-o", target))
    assert "plan step 2 (fuse_1x1_chain on stem_1, nope)" in line and "finds no such rewrite" in line
    assert not target.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "invalid JSON"),
        ('{"plan_version": 9, "steps": []}', "plan_version 9"),
        ('{"plan_version": 1, "steps": [{"pass": "x"}]}', "step 1 needs"),
        ('{"plan_version": 1, "steps": [{"pass": "nope", "nodes": ["a"], "options": {}}]}', "unknown pass 'nope'"),
    ],
)
def test_bad_plan_files_exit_2(sample_path: Path, tmp_path: Path, content: str, expected: str) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(content)
    line = one_line_error(invoke("apply", sample_path, "--plan", plan, "-o", tmp_path / "x.onnx"))
    assert expected in line


def test_missing_plan_file_exits_2(sample_path: Path, tmp_path: Path) -> None:
    assert "no such plan file" in one_line_error(invoke("apply", sample_path, "--plan", tmp_path / "p.json", "-o", tmp_path / "x.onnx"))


def test_calibrated_plans_need_the_same_data(sample_model: onnx.ModelProto) -> None:
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((1, 3, 112, 112)).astype(np.float32)} for _ in range(2)]
    data = FeedSet(feeds, feeds, "files", synthetic=False)
    plan = Plan((), None, {"input": (1, 3, 112, 112)}, {}, None, {"source": "files", "count": 2, "sha256": feeds_digest(feeds)})
    with pytest.raises(InputError, match="fitted on 2 calibration feed"):
        apply_plan(sample_model, plan)
    other = FeedSet(feeds, feeds[:1], "files", synthetic=False)
    with pytest.raises(InputError, match="calibration feeds differ"):
        apply_plan(sample_model, plan, feeds=other)
    assert apply_plan(sample_model, plan, feeds=data).applied == []


def test_plan_step_key_matches_candidate_key() -> None:
    from rewriter.contract import Candidate, Cost

    c = Candidate("p", ("a", "b"), "d", Cost(1, 0, 0, 0), {"rank": 16})
    assert PlanStep("p", ("a", "b"), {"rank": 16}).key == c.key


# -- plans written before the search and the bottleneck package were re-laid still replay ------------------
DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name, steps", [("sample_exact.plan-0.1.0.json", 1), ("sample_bottleneck.plan-0.1.0.json", 4)])
def test_plans_saved_by_earlier_versions_replay_to_the_same_model(sample_path: Path, name: str, steps: int) -> None:
    """Plans saved by the code before this layout (``optimize --save-plan`` on the sample model: the exact
    defaults; the bottleneck pass weight-only, four steps of which two replace earlier ones) replay step
    for step, to the very model that run wrote (its ``output_sha256``) when the input is the same file."""
    plan = Plan.load(DATA / name)
    same_input = sha256_file(sample_path) == plan.input_sha256
    replayed = apply_plan(sample_path, plan, force=not same_input)
    assert [c.key for c in replayed.applied] == [s.key for s in plan.steps] and len(plan.steps) == steps
    if same_input:  # the same onnx serializer as the run that wrote the plan
        assert hashlib.sha256(replayed.model.SerializeToString()).hexdigest() == plan.output_sha256
