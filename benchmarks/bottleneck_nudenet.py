#!/usr/bin/env python3
"""Speedup-vs-output-cosine curve of the bottleneck pass on NudeNet 320n (YOLOv8n detector).

Calibration and validation: 320x320 crops of disjoint scikit-image photographs, RGB in [0, 1], NCHW. The
search runs once at the loosest budget (default cosine >= 0.98 on the detector's raw output) and every
kept step is measured end to end (``rewriter.sweep``).

    python -m benchmarks.bottleneck_nudenet --corpus .cache/corpus --time-budget 480 --json docs/bottleneck_nudenet.json --html docs/bottleneck_nudenet.html

``--from-json docs/bottleneck_nudenet.json --html docs/bottleneck_nudenet.html`` draws the page again from a
recorded run without running it (what the JSON does not record, e.g. the environment of older runs, is left out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.images import CALIBRATION_PHOTOS, VALIDATION_PHOTOS, crops
from passes.bottleneck import Bottleneck
from rewriter.html_report import write_sweep_html
from rewriter.model import Model
from rewriter.sweep import sweep
from rewriter.validation.feeds import FeedSet, ImageSpec
from rewriter.validation.judge import ValidationConfig
from rewriter.validation.numerics import Budget
from scripts.fetch_corpus import fetch

SPEC = ImageSpec(320, 320, "NCHW", "RGB", scale=1.0 / 255.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path(".cache/corpus"))
    parser.add_argument("--max-error", default="cosine>=0.98")
    # Screened, the search walks from the mildest rewrites up: a curve to a loose budget needs minutes.
    parser.add_argument("--time-budget", type=float, default=480.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--html", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="Draw --html from this recorded run instead of running.")
    args = parser.parse_args()
    if args.from_json:
        if args.html:
            write_sweep_html(args.html, json.loads(args.from_json.read_text()))
        return
    path = fetch(args.corpus)["nudenet-320n"]
    cal = [{"images": SPEC.preprocess(c)} for c in crops(CALIBRATION_PHOTOS, 16, 320, 320, seed=0)]
    val = [{"images": SPEC.preprocess(c)} for c in crops(VALIDATION_PHOTOS, 8, 320, 320, seed=1)]
    model = Model.from_source(path, {"images": (1, 3, 320, 320)})
    feeds = FeedSet(val, cal, "scikit-image photographs: 16 calibration crops, 8 validation crops of other pictures")
    result = sweep(model, [Bottleneck()], feeds=feeds, config=ValidationConfig(budget=Budget.parse(args.max_error)),
                   time_budget_s=args.time_budget, input_path=path)
    data = {"model": "nudenet 320n (YOLOv8n)", **result.to_dict()}
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    if args.html:
        write_sweep_html(args.html, data)
    for p in result.points:
        sys.stdout.write(f"{p.step:3d}  {p.speedup:.3f}x [{p.ci_low:.3f}, {p.ci_high:.3f}]  1-cos {p.error:.2e}  {'*' if p.step in result.front else ' '}  {p.label}\n")


if __name__ == "__main__":
    main()
