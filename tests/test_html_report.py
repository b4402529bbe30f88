"""The HTML report: one self-contained file with per-layer bars, the Pareto curve and the decision table,
checked as markup and rendered in a real headless browser (Debian's chromium) when one is installed.

``make html-check`` runs the browser test with ONNX_BOTTLENECK_REQUIRE_CHROMIUM=1, which turns the skip
into a failure, and keeps the screenshot (ONNX_BOTTLENECK_SCREENSHOT_OUT).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
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
    layer_rows,
    node_durations_from_trace,
    profile_layers,
    render_html,
    write_html,
)
from rewriter.pipeline import optimize
from rewriter.report import ParetoPoint, build_report
from rewriter.sweep import pareto_front
from rewriter.validation.judge import ValidationConfig

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


# -- data ----------------------------------------------------------------------------------------------
def test_pareto_front_keeps_the_undominated_points_by_error() -> None:
    assert [p.label for p in pareto_front(SWEEP)] == ["rank 48", "rank 32", "rank 16", "rank 8"]
    assert pareto_front([]) == []


def test_layer_rows_match_by_name_and_place_new_layers_where_the_old_ones_were() -> None:
    before = _analysis(("a", "Conv", 10), ("b", "Conv", 20), ("c", "Conv", 30), ("d", "Gemm", 5))
    after = _analysis(("a", "Conv", 10), ("bc_fused", "Conv", 12), ("d", "Gemm", 5))
    rows = layer_rows(before, after, {"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 0.9, "bc_fused": 1.5})
    assert [r.name for r in rows] == ["a", "b", "c", "bc_fused", "d"]
    by = {r.name: r for r in rows}
    assert (by["b"].macs_before, by["b"].macs_after, by["b"].ms_after) == (20, None, None)
    assert (by["bc_fused"].macs_before, by["bc_fused"].macs_after, by["bc_fused"].ms_after) == (None, 12, 1.5)
    assert (by["d"].ms_before, by["d"].ms_after) == (0.0, 0.0)  # profiled, but no kernel recorded


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
    return json.loads(json.dumps(data)), profile_layers(result, runs=3)


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


# -- a real browser ------------------------------------------------------------------------------------
def find_chromium() -> str | None:
    override = os.environ.get("CHROMIUM")
    if override:
        return shutil.which(override) or (override if os.path.isfile(override) else None)
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def _colour_present(image, rgb: tuple[int, int, int], tolerance: int = 6, min_pixels: int = 50) -> bool:  # type: ignore[no-untyped-def]
    hits = 0
    for count, pixel in image.getcolors(maxcolors=1 << 24):
        if all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], rgb)):
            hits += count
    return hits >= min_pixels


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def test_screenshot_in_headless_chromium(full_report: tuple[dict, list[LayerRow]], tmp_path: Path) -> None:
    browser = find_chromium()
    if browser is None:
        message = "no chromium or chromium-browser on PATH (Debian: apt-get install chromium); HTML not rendered in a browser"
        if os.environ.get("ONNX_BOTTLENECK_REQUIRE_CHROMIUM"):
            pytest.fail(message)
        pytest.skip(message)
    Image = pytest.importorskip("PIL.Image", reason="Pillow is in the dev extra")
    data, layers = full_report
    page, shot = tmp_path / "report.html", tmp_path / "report.png"
    write_html(page, data, layers=layers)
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,2000",
         "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000, (proc.returncode, proc.stderr[-2000:])
    with Image.open(shot) as img:
        rgb = img.convert("RGB")
        assert rgb.size == (1200, 2000)
        colours = rgb.getcolors(maxcolors=1 << 24)
        assert len(colours) > 16  # text, bars and tables, not a blank page
        assert _colour_present(rgb, _hex(AFTER_COLOUR)), "no 'after' bars in the screenshot"
        assert _colour_present(rgb, _hex(FRONT_COLOUR)), "no Pareto front in the screenshot"
    keep = os.environ.get("ONNX_BOTTLENECK_SCREENSHOT_OUT")
    if keep:
        shutil.copyfile(shot, keep)
