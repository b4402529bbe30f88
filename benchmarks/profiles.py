#!/usr/bin/env python3
"""A lossy search judged at two deployment profiles, through the command line as a user runs it.

The bottleneck pass on a trained detector of the corpus (NudeNet 320n, YOLOv8n, dynamic batch) with a folder of
photographs (crops of scikit-image's pictures written as PNG files, benchmarks/images.py) and
``--profile threads=1,batch=1 --profile threads=2,batch=8``: a rewrite is kept only if its speedup CI lies above 1
at both. The script reads the JSON report and checks what the profiles promise -- the end-to-end speedup with
its CI at each profile, and no kept rewrite shown slower at either -- and writes a summary.

    python -m benchmarks.profiles --corpus .cache/corpus --time-budget 300 --json docs/profiles_nudenet.json

Run it on a quiet machine (nothing else heavy running): the verdicts are latency measurements.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.images import CALIBRATION_PHOTOS, VALIDATION_PHOTOS, crops
from scripts.fetch_corpus import fetch

log = logging.getLogger("profiles")

PROFILES = ("threads=1,batch=1", "threads=2,batch=8")
SPEC = "320x320,NCHW,RGB,scale=0.00392156862745098"


def write_photos(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` PNG crops (320x320) of scikit-image's photographs into ``folder``."""
    from PIL import Image

    photos = CALIBRATION_PHOTOS + VALIDATION_PHOTOS
    for i, rgb in enumerate(crops(photos, count, 320, 320, seed)):
        Image.fromarray(rgb).save(folder / f"crop_{i:03d}.png")


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the run shows per profile, and whether a kept rewrite was shown slower at one of them."""
    kept = [d for d in report["decisions"] if d["kept"]]
    slower = [
        {"nodes": d["nodes"], "profile": f"threads={p['threads']},batch={p['batch']}", "ci": [p["ci_low"], p["ci_high"]]}
        for d in kept for p in d["latency_profiles"] if p["ci_high"] < 1.0
    ]
    not_faster = [d["nodes"] for d in kept if not d["exact"] and any(p["ci_low"] <= 1.0 for p in d["latency_profiles"])]
    totals = report["totals"]
    return {
        "profiles": [
            {"threads": p["threads"], "batch": p["batch"], "primary": p["primary"],
             "speedup": None if p["latency"] is None else p["latency"]["speedup"],
             "ci": None if p["latency"] is None else [p["latency"]["ci_low"], p["latency"]["ci_high"]]}
            for p in report["profiles"]
        ],
        "kept": len(kept),
        "rolled_back": totals["rolled_back"],
        "not_tried": totals["not_tried"],
        "rolled_back_at_a_later_profile": sum(1 for d in report["decisions"] if d["outcome"] == "latency" and "at threads=" in d["reason"]),
        "kept_but_slower_at_a_profile": slower,
        "kept_lossy_not_shown_faster_at_a_profile": not_faster,
        "macs": [totals["macs_before"], totals["macs_after"]],
        "final_numerics": totals["final_numerics"],
        "holdout": report["holdout"],
        "seconds": report["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path(".cache/corpus"))
    parser.add_argument("--images", type=int, default=48, help="PNG crops written for the run")
    parser.add_argument("--time-budget", type=float, default=300.0)
    parser.add_argument("--max-error", default="cosine>=0.999")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = fetch(args.corpus)["nudenet-320n"]
    with tempfile.TemporaryDirectory(prefix="profiles-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        write_photos(folder, args.images)
        report_path = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "rewriter.cli", "optimize", str(model), "-o", str(Path(tmp) / "out.onnx"),
               "--input-shape", "images:1x3x320x320", "--passes", "bottleneck", "--images", str(folder), "--image-spec", SPEC, "--max-error", args.max_error,
               "--time-budget", str(args.time_budget), "--report", str(report_path)]
        for p in PROFILES:
            cmd += ["--profile", p]
        log.info("running: %s", " ".join(cmd[2:]))
        began = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - began
        sys.stderr.write(run.stderr[-4000:])
        if not report_path.exists():
            raise SystemExit(f"no report (exit {run.returncode}): {run.stdout[-2000:]}")
        result = summary(json.loads(report_path.read_text()))
    result.update({"exit_code": run.returncode, "wall_s": round(wall, 1), "command": "onnx-bottleneck " + " ".join(cmd[3:]).replace(tmp, "TMP"),
                   "model": "nudenet-320n", "images": args.images})
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if result["kept_but_slower_at_a_profile"] or result["kept_lossy_not_shown_faster_at_a_profile"]:
        raise SystemExit("a kept rewrite is not shown faster at every profile")


if __name__ == "__main__":
    main()
