"""The HTML pages in a real browser (headless chromium): the optimize report of the sample model, the sweep
page of a small real sweep of it, and the page of the recorded 116-step NudeNet sweep.

Each page is laid out by chromium and checked there (:mod:`tests.html_checks`: the real boxes of every SVG
label, no two overlapping; no placeholder text; no empty section), and a screenshot must show the page's
colours. Skipped without chromium; ``make html-check`` sets ONNX_BOTTLENECK_REQUIRE_CHROMIUM=1 (a missing
browser fails) and ONNX_BOTTLENECK_HTML_OUT=build (pages and screenshots are kept there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from models.sample import build_sample
from rewriter.cli import app
from rewriter.html_report import AFTER_COLOUR, FRONT_COLOUR, write_sweep_html
from tests.html_checks import browser_problems, find_chromium, page_problems, screenshot

NUDENET = Path(__file__).resolve().parents[1] / "docs" / "bottleneck_nudenet.json"
#: page name -> (screenshot height, a colour the screenshot must show)
PAGES = {"report": (2200, AFTER_COLOUR), "sweep": (1100, FRONT_COLOUR), "sweep_nudenet": (1100, FRONT_COLOUR)}


@pytest.fixture(scope="module")
def browser() -> str:
    found = find_chromium()
    if found is None:
        message = "no chromium or chromium-browser on PATH (Debian: apt-get install chromium); HTML not rendered in a browser"
        if os.environ.get("ONNX_BOTTLENECK_REQUIRE_CHROMIUM"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def pages(browser: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three pages, made as a user makes them (the CLI on the sample; the recorded sweep's JSON)."""
    keep = os.environ.get("ONNX_BOTTLENECK_HTML_OUT")
    folder = Path(keep) if keep else tmp_path_factory.mktemp("pages")
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "sample.onnx"
    onnx.save_model(build_sample(seed=0), model)
    _cli("optimize", str(model), "-o", str(folder / "sample.opt.onnx"), "--html", str(folder / "report.html"))
    _cli("sweep", str(model), "--max-error", "cosine>=0.95", "--time-budget", "20", "--max-pairs", "10", "--html", str(folder / "sweep.html"))
    write_sweep_html(folder / "sweep_nudenet.html", json.loads(NUDENET.read_text()))
    return {name: folder / f"{name}.html" for name in PAGES}


@pytest.mark.parametrize("name", list(PAGES))
def test_page_laid_out_in_chromium(name: str, browser: str, pages: dict[str, Path], tmp_path: Path) -> None:
    page = pages[name]
    assert page_problems(page.read_text()) == []
    assert browser_problems(browser, page, tmp_path) == []
    Image = pytest.importorskip("PIL.Image", reason="Pillow is in the dev extra")
    height, colour = PAGES[name]
    shot = page.with_suffix(".png")
    screenshot(browser, page, shot, tmp_path, height)
    with Image.open(shot) as img:
        rgb = img.convert("RGB")
        assert rgb.size == (1200, height)
        assert len(rgb.getcolors(maxcolors=1 << 24)) > 16, "a blank page"  # text, bars and tables
        want = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
        hits = sum(n for n, px in rgb.getcolors(maxcolors=1 << 24) if all(abs(a - b) <= 6 for a, b in zip(px, want)))
        assert hits >= 50, f"{colour} is not in the screenshot of {name}"
