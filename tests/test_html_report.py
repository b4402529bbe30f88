"""The optimize report's HTML page: per-layer rows (MACs, latency with its noise rule), the page's parts, and
the page checks that need no browser (no placeholders, no empty sections, no overlapping labels).
The browser checks are in test_html_browser.py (``make html-check``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from rewriter.analysis import Analysis, NodeCost
from rewriter.cli import app
from rewriter.html_report import (
    AFTER_COLOUR,
    FRONT_COLOUR,
    LayerRow,
    LayerTime,
    end_to_end_rows,
    layer_rows,
    node_durations_from_trace,
    profile_layers,
    render_html,
)
from rewriter.pipeline import optimize
from rewriter.report import ParetoPoint, build_report
from rewriter.sweep import pareto_front
from rewriter.validation.judge import ValidationConfig
from tests.html_checks import page_problems

runner = CliRunner()
SWEEP = [
    ParetoPoint(1.10, 2e-5, "rank 48"),
    ParetoPoint(1.35, 4e-4, "rank 32"),
    ParetoPoint(1.30, 9e-4, "dominated"),
    ParetoPoint(1.62, 3e-3, "rank 16"),
    ParetoPoint(1.90, 2e-2, "rank 8"),
]


def _analysis(*nodes: tuple[str, str, int]) -> Analysis:
    costs = [NodeCost(name, op, macs, 0) for name, op, macs in nodes]
    return Analysis(costs, {}, sum(c.macs for c in costs), 0)


def _t(ms: float) -> LayerTime:
    return LayerTime(ms, ms, ms, 1)


# -- data ----------------------------------------------------------------------------------------------
def test_pareto_front_keeps_the_undominated_points_by_error() -> None:
    assert [p.label for p in pareto_front(SWEEP)] == ["rank 48", "rank 32", "rank 16", "rank 8"]
    assert pareto_front([]) == []


def test_layer_rows_match_by_name_and_place_new_layers_where_the_old_ones_were() -> None:
    before = _analysis(("a", "Conv", 10), ("b", "Conv", 20), ("c", "Conv", 30), ("d", "Gemm", 5))
    after = _analysis(("a", "Conv", 10), ("bc_fused", "Conv", 12), ("d", "Gemm", 5))
    rows = layer_rows(before, after, {"a": _t(1.0), "b": _t(2.0), "c": _t(3.0)}, {"a": _t(0.9), "bc_fused": _t(1.5)}, touched=["b", "c"])
    assert [r.name for r in rows] == ["a", "b", "c", "bc_fused", "d"]
    by = {r.name: r for r in rows}
    assert (by["b"].macs_before, by["b"].macs_after, by["b"].ms_after, by["b"].change) == (20, None, None, "removed")
    assert (by["bc_fused"].macs_before, by["bc_fused"].macs_after, by["bc_fused"].ms_after, by["bc_fused"].change) == (None, 12, 1.5, "new")
    assert (by["d"].ms_before, by["d"].ms_after) == (0.0, 0.0)  # profiled, but no kernel recorded
    assert [r.name for r in rows if r.touched] == ["b", "c", "bc_fused"]
    assert by["a"].change == "faster"  # single rounds: ranges are points, disjoint
    assert layer_rows(before, after)[0].change is None  # not profiled


def test_node_durations_from_trace() -> None:
    events = [
        {"cat": "Node", "name": "conv_1_kernel_time", "dur": 100, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "conv_1_kernel_time", "dur": 120, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "conv_1_fence_before", "dur": 5},
        {"cat": "Session", "name": "model_run", "dur": 999},
    ]
    assert node_durations_from_trace(events) == {"conv_1": [100.0, 120.0]}


# -- markup --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_report(sample_model: onnx.ModelProto) -> tuple[dict, list[LayerRow]]:
    """A real run of the sample (numerics only), its layers profiled before/after, and a synthetic sweep."""
    result = optimize(sample_model, ["fuse_1x1_chain"], config=ValidationConfig(latency=False))
    data = build_report(result, input_path="sample.onnx", input_sha256="0" * 64, output_path="opt.onnx", output_sha256="1" * 64,
                        provider="cpu", threads=1, gate=[], pareto=SWEEP)
    return json.loads(json.dumps(data)), profile_layers(result)


def test_html_is_self_contained_with_every_part(full_report: tuple[dict, list[LayerRow]]) -> None:
    data, layers = full_report
    page = render_html(data, layers=layers)
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 3  # MACs bars, latency bars, Pareto curve
    assert "MACs per layer" in page and "Latency per layer" in page and "Pareto" in page
    assert "<polyline" in page and FRONT_COLOUR in page and AFTER_COLOUR in page
    assert "lin_expand_24" in page and "removed" in page and "new" in page
    assert "<table>" in page and "fuse_1x1_chain" in page and "kept" in page
    # Self-contained: no scripts, no external resources (the SVG namespace is an identifier, not a fetch).
    assert "<script" not in page
    assert not re.search(r'(src|href)\s*=\s*"(?!#)', page)
    assert "url(" not in page


def test_html_escapes_names_and_renders_without_layers_or_sweep() -> None:
    report = {
        "schema_version": 2, "input": {"path": "<m>.onnx", "sha256": None}, "output": {"path": None, "sha256": None},
        "gate": {"passed": False, "failures": ["<b>numerics</b>"]}, "totals": {},
        "decisions": [{"pass": "p", "nodes": ["<script>alert(1)</script>"], "description": "d & e", "cost": {},
                       "kept": False, "reason": "r", "numerics": {}, "latency": None, "end_to_end": None}],
    }
    page = render_html(report)
    assert page_problems(page) == []  # the unknown sha256, output and totals are left out, not printed as None
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;numerics&lt;/b&gt;" in page and "d &amp; e" in page
    assert "gate failed" in page and "<svg" not in page
    assert "target speedup" not in page
    assert "target speedup 1.3x not reached" in render_html({**report, "target_speedup": {"speedup": 1.3, "reached": False}})


def test_optimize_html_option(sample_path: Path, tmp_path: Path) -> None:
    output, html = tmp_path / "o.onnx", tmp_path / "report.html"
    result = runner.invoke(app, ["optimize", str(sample_path), "-o", str(output), "--no-latency", "--passes", "fuse_1x1_chain", "--html", str(html)])
    assert result.exit_code == 0, result.output
    page = html.read_text()
    assert page.count("<svg") == 2 and "Latency per layer" in page  # no sweep ran: no Pareto curve
    assert oct(html.stat().st_mode & 0o777) != oct(0o600)  # an ordinary file, not mkstemp's private mode


def test_optimize_page_has_no_placeholder_no_empty_section_and_no_overlapping_label(full_report: tuple[dict, list[LayerRow]]) -> None:
    data, layers = full_report
    assert page_problems(render_html(data, layers=layers)) == []
    assert page_problems(render_html({"input": {"path": "m.onnx"}, "decisions": []})) == []  # an almost empty report


def test_page_checks_can_fail() -> None:
    page = render_html({"input": {"path": "m.onnx"}, "decisions": []})
    assert page_problems(page.replace("m.onnx", "None")) and page_problems(page.replace("</h1>", "</h1><h2>x</h2><h2>y</h2>"))
    overlapping = '<svg><text x="10" y="10" class="pl">step 1</text><text x="20" y="12" class="pl">step 2</text></svg>'
    assert page_problems(page.replace("</body>", overlapping + "</body>")) == ["labels overlap: 'step 1' and 'step 2'"]


def test_end_to_end_section_has_a_row_per_setting(full_report: tuple[dict, list[LayerRow]]) -> None:
    data, _ = full_report
    measured = {**data, "totals": {**data["totals"], "final_latency": {"speedup": 1.5, "ci_low": 1.4, "ci_high": 1.6, "pairs": 20,
                                                                        "base_median_ms": 3.0, "candidate_median_ms": 2.0}}}
    lat = measured["totals"]["final_latency"]
    measured["profiles"] = [{"threads": 1, "batch": 1, "primary": True, "latency": lat}]
    assert end_to_end_rows(measured) == [("cpu, 1 thread(s), batch 1", lat)]
    page = render_html(measured)
    assert "End-to-end latency" in page and "1.500x [1.400, 1.600]" in page and "2 ms" in page
    assert "not measured" in render_html(data)  # latency=False: said, not left blank
    slower = {**lat, "speedup": 1.2, "ci_low": 1.1, "ci_high": 1.3}
    two = {**measured, "profiles": measured["profiles"] + [{"threads": 2, "batch": 8, "primary": False, "latency": slower}]}
    assert end_to_end_rows(two) == [("cpu, 1 thread(s), batch 1, primary", lat), ("cpu, 2 thread(s), batch 8", slower)]
    page = render_html(two)
    assert "1.500x [1.400, 1.600]" in page and "1.200x [1.100, 1.300]" in page and not page_problems(page)
    del two["profiles"]  # a report of schema 5 and before: the run's own setting
    assert end_to_end_rows(two) == [("cpu, 1 thread(s)", lat)]


# -- per-layer latency: noise is drawn as unchanged --------------------------------------------------------
def _fake_profiler(slower: frozenset[str] = frozenset()):  # type: ignore[no-untyped-def]
    """Deterministic kernel times: a base time per node name, the same seeded jitter (up to +-30%) for both
    models, so an untouched layer's two sides come from one distribution; ``slower`` nodes take 3x after."""
    import zlib

    def profile(proto: onnx.ModelProto, round_: int) -> dict[str, list[float]]:
        after = any("_fused" in n.name for n in proto.graph.node)
        out = {}
        for node in proto.graph.node:
            base = 20.0 + zlib.crc32(node.name.encode()) % 200
            rng = [(zlib.crc32(f"{node.name}/{round_}/{after}/{k}".encode()) % 61 - 30) / 100 for k in range(3)]
            out[node.name] = [base * (1 + j) * (3.0 if after and node.name in slower else 1.0) for j in rng]
        return out

    return profile


@pytest.fixture(scope="module")
def exact_result(sample_model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    return optimize(sample_model, ["fuse_1x1_chain"], config=ValidationConfig(latency=False))


def test_untouched_layers_are_unchanged_under_a_deterministic_noisy_profile(exact_result) -> None:  # type: ignore[no-untyped-def]
    rows = profile_layers(exact_result, profiler=_fake_profiler())
    touched = {r.name for r in rows if r.touched}
    assert touched == {"lin_expand_24", "lin_project_25", "lin_expand_24_lin_project_25_fused"}
    assert {r.name: r.change for r in rows if r.touched} == {"lin_expand_24": "removed", "lin_project_25": "removed",
                                                              "lin_expand_24_lin_project_25_fused": "new"}
    assert {r.change for r in rows if not r.touched} == {"unchanged"}
    assert all(r.time_before is not None and r.time_before.high > r.time_before.low for r in rows if not r.touched)  # noise was there
    slowed = {r.name: r.change for r in profile_layers(exact_result, profiler=_fake_profiler(frozenset({"stem_1"})))}
    assert slowed["stem_1"] == "slower" and slowed["res_3x3_19"] == "unchanged"  # a real change still shows
    page = render_html({"decisions": []}, layers=rows)
    assert "unchanged (within noise)" in page and 'class="lb touched"' in page


def test_untouched_layers_of_the_sample_are_unchanged_when_really_profiled(full_report: tuple[dict, list[LayerRow]]) -> None:
    """onnxruntime's own profile of the sample before and after an exact rewrite: the layers the rewrite did
    not touch are reported unchanged (their differences lie within the rounds' noise)."""
    _, layers = full_report
    untouched = [r for r in layers if not r.touched and r.change is not None]
    assert len(untouched) >= 20
    assert {r.name: r.change for r in untouched if r.change != "unchanged"} == {}


def test_the_page_says_what_bound_the_search_and_each_units_precision(full_report: tuple[dict, list[LayerRow]]) -> None:
    data, _ = full_report
    precision = {
        "precision": "int8", "status": "mixed", "kept": True, "reason": "2 of 3 unit(s) int8, shown faster at every profile",
        "recipe": {"format": "QDQ", "per_channel": True}, "normalizations": ["converted from opset 9 to 13"],
        "counts": {"int8": 2, "float": 1}, "trials": 5, "seconds": 1.5,
        "nodes": [{"node": "conv<1>", "op_type": "Conv", "precision": "float", "reason": "kept float: among the 1 most sensitive"},
                  {"node": "conv2", "op_type": "Conv", "precision": "int8", "reason": "int8"}],
        "latency": [{"threads": 1, "batch": 1, "speedup": 1.4, "ci_low": 1.3, "ci_high": 1.5}],
        "budget": {"validation": {"feeds": 8, "holds": True, "spend": 0.8}, "test": {"feeds": 4, "holds": True, "spend": 0.9}},
    }
    search = {"bound": "time", "candidates": 9, "judged": 6, "dominated": 0, "untried": {"not_tried_time": 3}, "budget_spent": 0.5}
    page = render_html({**data, "precision": precision, "search": search})
    assert page_problems(page) == []
    assert "Precision: int8" in page and "conv&lt;1&gt;" in page and "kept float: among the 1 most sensitive" in page
    assert "int8 against float at threads=1, batch=1: 1.400x [1.300, 1.500]" in page
    assert "budget on test (4 feeds): holds, 90% spent" in page and "converted from opset 9 to 13" in page
    assert "6 of 9 candidates judged (3 time left); error budget 50% spent -- bound by the time budget" in page
    assert "Precision: int8" not in render_html(data)  # fp32 runs have no precision section
