#!/usr/bin/env python3
"""Structure x precision on the trained digits CNN: int8 PTQ alone, ours in float, ours with int8, each judged by
top-1 on held-out digits the search never scored.

The task is the demo's (examples/digits_task.py): training digits as data (split by the tool into calibration,
validation and a held-out test split), top-1 on the first half of the held-out test digits as the metric the
search gates on (``--max-metric-drop 0.01``), the other half for the confirmation and for the figures here.

* **int8 alone**: onnxruntime's ``quantize_static`` with the tool's recipe (QDQ, per-channel int8 weights, uint8
  activations, MinMax) on the same calibration feeds, every node int8 -- what a deployer tries first.
* **ours, float**: the bottleneck pass under ``cosine>=0.999`` and the top-1 gate (the demo's run).
* **ours, int8**: the guarded int8 stage on that result (``--precision int8``: judged against the original,
  confirmed on the held-out split, kept only if shown faster than the float result).

Latency: each against the float original, and ours-int8 against int8 alone, at 1 intra-op thread, batch 8,
``ORT_ENABLE_ALL`` on both sides, interleaved pairs, ratio of medians with a 95% bootstrap CI.

``--nudenet CORPUS`` adds NudeNet 320n (the corpus's trained detector) under ``cosine>=0.99`` on its raw output,
with calibration, validation, held-out and unseen crops of disjoint scikit-image photographs.

    python -m benchmarks.precision_digits --nudenet .cache/corpus --json docs/precision_digits.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import onnx

from passes.bottleneck import Bottleneck
from rewriter.model import Model
from rewriter.pipeline import optimize
from rewriter.precision.int8 import quantize_int8
from rewriter.precision.stage import PrecisionOptions, run_stage
from rewriter.validation.feeds import FeedSet, input_specs
from rewriter.validation.judge import Judge, TaskMetric, ValidationConfig, load_metric
from rewriter.validation.latency import TimingOptions, time_pairs
from rewriter.validation.numerics import Budget
from rewriter.validation.runtime import RuntimeOptions, deploy_session, eval_session

log = logging.getLogger("precision_digits")

MODEL = Path("models/digits/digits_cnn.onnx")
TASK = "examples/digits_task.py"
SHAPE = {"input": (8, 1, 32, 32)}


def timed(base: onnx.ModelProto, model: onnx.ModelProto, feed: dict[str, Any]) -> dict[str, Any]:
    """``model`` against ``base``: 1 intra-op thread, ORT_ENABLE_ALL, interleaved pairs, 95% bootstrap CI."""
    options = RuntimeOptions(threads=1)
    lat = time_pairs(deploy_session(base, options), deploy_session(model, options), feed,
                     TimingOptions(min_pairs=60, max_pairs=300, time_budget_s=20.0))
    return {"speedup": round(lat.ci.speedup, 3), "ci95": [round(lat.ci.low, 3), round(lat.ci.high, 3)], "pairs": lat.ci.pairs}


def nudenet(corpus: Path, time_budget: float) -> dict[str, Any]:
    """NudeNet 320n under ``cosine>=0.99`` on its raw output: int8 alone, ours float, ours int8; each judged by
    the output's cosine on crops neither the search nor the calibration saw, and timed at 1 thread."""
    from benchmarks.images import CALIBRATION_PHOTOS, VALIDATION_PHOTOS, crops
    from rewriter.validation.feeds import ImageSpec
    from rewriter.validation.numerics import compare_outputs
    from rewriter.validation.runtime import reference_session, run_feeds
    from scripts.fetch_corpus import fetch

    spec = ImageSpec.parse("320x320,NCHW,RGB,scale=0.00392156862745098")
    original = Model.from_source(fetch(corpus)["nudenet-320n"], {"images": (1, 3, 320, 320)})

    def feeds(photos: tuple[str, ...], count: int, seed: int) -> list[dict[str, Any]]:
        return [{"images": spec.preprocess(c)} for c in crops(photos, count, 320, 320, seed=seed)]

    data = FeedSet(feeds(VALIDATION_PHOTOS, 16, 1), feeds(CALIBRATION_PHOTOS, 16, 0), "scikit-image crops",
                   test=feeds(VALIDATION_PHOTOS, 12, 3))
    unseen = feeds(VALIDATION_PHOTOS, 24, 2)
    config = ValidationConfig(budget=Budget.parse("cosine>=0.99"))
    plain, _ = quantize_int8(original.proto, data.calibration)
    structure = optimize(original, [Bottleneck()], feeds=data, config=config, time_budget_s=time_budget)
    stage = run_stage(original.proto, structure.model, data, Judge(original, data.for_search(), config), PrecisionOptions())
    ours_int8 = stage.model if stage.model is not None else structure.model
    reference = run_feeds(reference_session(original.proto), unseen)
    rows: dict[str, Any] = {}
    for name, model in (("int8 alone", plain), ("ours float", structure.model), ("ours int8", ours_int8)):
        stats = compare_outputs(reference, run_feeds(eval_session(model, RuntimeOptions(threads=1)), unseen))
        rows[name] = {"cosine_unseen": round(min(s.cosine for s in stats.values()), 6), "vs_fp32": timed(original.proto, model, unseen[0])}
    rows["ours int8"]["vs_int8_alone"] = timed(plain, ours_int8, unseen[0])
    return {"model": "NudeNet 320n (YOLOv8n), 1x3x320x320", "budget": "cosine>=0.99 on the raw output (validation), "
            "confirmed on 12 held-out crops; figures on 24 unseen crops", "rows": rows,
            "int8_stage": {"status": stage.status, "kept": stage.kept, "reason": stage.reason,
                           "counts": stage.search.counts if stage.search else None, "seconds": round(stage.seconds, 1)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-budget", type=float, default=90.0, help="seconds of the bottleneck search")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--nudenet", type=Path, default=None, metavar="CORPUS", help="also NudeNet 320n from this corpus folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    original = Model.from_source(MODEL, SHAPE)
    feeds = FeedSet.from_loader(f"{TASK}:load_data", input_specs(original.proto, original.input_shapes))
    top1 = load_metric(f"{TASK}:top1")
    config = ValidationConfig(budget=Budget.parse("cosine>=0.999"), metric=TaskMetric(top1, max_drop=0.01, name="top1"))
    start = time.perf_counter()
    plain, _ = quantize_int8(original.proto, feeds.calibration)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    structure = optimize(original, [Bottleneck()], feeds=feeds, config=config, time_budget_s=args.time_budget)
    structure_s = time.perf_counter() - start
    stage = run_stage(original.proto, structure.model, feeds, Judge(original, feeds.for_search(), config), PrecisionOptions())
    ours_int8 = stage.model if stage.model is not None else structure.model
    feed = feeds.validation[0]
    rows = {}
    for name, model in (("fp32", original.proto), ("int8 alone", plain), ("ours float", structure.model), ("ours int8", ours_int8)):
        rows[name] = {"top1_test": round(top1(eval_session(model, RuntimeOptions(threads=1)), split="test"), 4)}
        if name != "fp32":
            rows[name]["vs_fp32"] = timed(original.proto, model, feed)
    rows["ours int8"]["vs_int8_alone"] = timed(plain, ours_int8, feed)
    out = {
        "model": "digits CNN (models/digits/digits_cnn.onnx), batch 8",
        "budget": "cosine>=0.999 and top-1 drop <= 0.01 on the held-out digits' first half (the search's metric)",
        "figures": "top1_test: the held-out digits' second half, never scored by the search; latency at 1 thread, batch 8",
        "rows": rows,
        "int8_stage": {"status": stage.status, "kept": stage.kept, "reason": stage.reason,
                       "counts": stage.search.counts if stage.search else None, "seconds": round(stage.seconds, 1)},
        "seconds": {"int8_alone": round(plain_s, 1), "structure": round(structure_s, 1)},
    }
    if args.nudenet is not None:
        out["nudenet"] = nudenet(args.nudenet, args.time_budget)
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
