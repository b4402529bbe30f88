"""Same work after onnxruntime's optimizer: rewrites it makes itself are proven latency-neutral without timing."""

from __future__ import annotations

import json

import onnx
import pytest

from rewriter.gate import gate_failures
from rewriter.model import Model
from rewriter.pipeline import optimize
from rewriter.validation.deployed import deployed_key, structure_key
from rewriter.validation.judge import Judge, ValidationConfig
from rewriter.validation.latency import TimingOptions
from rewriter.validation.runtime import RuntimeOptions
from tests.helpers import assert_same_outputs, assert_valid, parse
from tests.search_fixtures import THREE_BN

FAST = ValidationConfig(timing=TimingOptions(min_pairs=6, max_pairs=8, time_budget_s=0.3))

CHAIN = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 16, 8, 8] X) => (float[1, 16, 8, 8] Y)
    <float[64, 16, 1, 1] Wa, float[16, 64, 1, 1] Wb> {
        A = Conv (X, Wa)
        Y = Conv (A, Wb)
    }
"""


def test_the_structure_key_ignores_names_and_order_but_not_work() -> None:
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 8, 8] X) => (float[1, 4, 8, 8] Y, float[1, 4, 8, 8] Z)
        <float[4, 4, 3, 3] W, float[4, 4, 3, 3] V> {
            A = Conv <pads = [1, 1, 1, 1]> (X, W)
            B = Conv <pads = [1, 1, 1, 1]> (X, V)
            Y = Relu (A)
            Z = Sigmoid (B)
        }
    """
    base = parse(text)
    renamed = parse(text.replace("A =", "Q =").replace("(A)", "(Q)"))
    reordered = parse(text)
    nodes = list(reordered.graph.node)
    del reordered.graph.node[:]
    reordered.graph.node.extend([nodes[1], nodes[0], nodes[3], nodes[2]])
    other_values = parse(text, seed=7)
    assert structure_key(base) == structure_key(renamed) == structure_key(reordered) == structure_key(other_values)
    assert structure_key(base) != structure_key(parse(text.replace("Y = Relu (A)", "Y = Sigmoid (A)")))
    assert structure_key(base) != structure_key(parse(text.replace("pads = [1, 1, 1, 1]> (X, W)", "pads = [1, 1, 1, 1], group = 2> (X, W)").replace("float[4, 4, 3, 3] W", "float[4, 2, 3, 3] W")))
    assert structure_key(base) != structure_key(parse(text.replace("Z = Sigmoid (B)", "Z = Sigmoid (A)")))  # wiring


def test_a_bn_fold_leaves_the_deployed_graph_as_it_was_and_a_chain_fusion_does_not() -> None:
    from rewriter.pipeline import apply_pass

    folded = apply_pass(parse(THREE_BN, seed=1), "fold_batchnorm").model
    judge = Judge(Model.from_source(parse(THREE_BN, seed=1)), None, FAST)
    assert judge.same_deployed(judge.original.proto, folded)  # onnxruntime folds them itself
    fused = apply_pass(parse(CHAIN), "fuse_1x1_chain").model
    assert not Judge(Model.from_source(parse(CHAIN)), None, FAST).same_deployed(parse(CHAIN), fused)
    assert deployed_key(parse(CHAIN), RuntimeOptions(provider="cuda")) is None  # a provider that compiles: only a timing tells


def test_an_exact_run_of_rewrites_onnxruntime_makes_itself_is_not_timed(report_validator, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from rewriter.report import build_report

    timed: list[int] = []
    monkeypatch.setattr(Judge, "model_latency", lambda *a, **k: timed.append(1))  # type: ignore[arg-type]
    monkeypatch.setattr(Judge, "region_latency", lambda *a, **k: timed.append(1))  # type: ignore[arg-type]
    source = parse(THREE_BN, seed=1)
    result = optimize(source, ["fold_batchnorm"], config=FAST)
    assert not timed and len(result.kept) == 3 and result.same_deployed and result.final_latency is None
    assert all("latency unchanged by construction" in d.reason for d in result.decisions)
    assert result.passes[0].same_deployed and result.passes[0].reverted is None
    assert_same_outputs(source, result.model)
    report = build_report(result, input_path=None, input_sha256=None, output_path=None, output_sha256=None, provider="cpu", threads=1)
    assert report["totals"]["same_deployed_graph"] is True and report["passes"][0]["same_deployed_graph"] is True
    assert_valid(report_validator, json.loads(json.dumps(report)))
    assert gate_failures(result, FAST) == []
    (why,) = gate_failures(result, FAST, require_speedup=True)
    assert why == "no end-to-end speedup: onnxruntime runs the same graph for the output as for the input (its optimizer makes these rewrites itself)"


def test_the_cli_says_the_latency_is_unchanged_by_construction(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from rewriter.cli import app

    src = tmp_path / "m.onnx"
    onnx.save(parse(THREE_BN, seed=1), src)
    res = CliRunner().invoke(app, ["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--html", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert "end-to-end latency unchanged by construction: onnxruntime runs the same graph as for the input (not timed)" in res.output
    assert "unchanged by construction" in (tmp_path / "r.html").read_text()
