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

    python -m benchmarks.precision_digits --json docs/precision_digits.json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-budget", type=float, default=90.0, help="seconds of the bottleneck search")
    parser.add_argument("--json", type=Path, default=None)
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
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
