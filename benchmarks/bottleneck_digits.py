#!/usr/bin/env python3
"""The bottleneck pass on the trained digits CNN: real top-1 accuracy and speedup at three budgets.

Calibration: 64 training images; numerics judged on 64 held-out images; top-1 measured on the whole
held-out split (539 images) with its labels. Speedup: end to end against the original, interleaved,
ORT_ENABLE_ALL, 1 thread, batch 8, 95% bootstrap CI.

    python -m benchmarks.bottleneck_digits --json docs/bottleneck_digits.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from models.digits import load_split
from rewriter.model import Model
from rewriter.pipeline import optimize
from rewriter.validation.feeds import FeedSet
from rewriter.validation.judge import Judge, ValidationConfig
from rewriter.validation.latency import TimingOptions
from rewriter.validation.numerics import Budget
from rewriter.validation.runtime import RuntimeOptions, deploy_session

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits" / "digits_cnn.onnx"
BATCH = 8


def top1(proto, x: np.ndarray, y: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    session = deploy_session(proto, RuntimeOptions(threads=1))
    logits = np.concatenate([session.run(None, {"input": x[i : i + BATCH]})[0] for i in range(0, len(x) - BATCH + 1, BATCH)])
    return float(np.mean(np.argmax(logits, axis=1) == y[: len(logits)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="cosine>=0.999999;cosine>=0.99999;cosine>=0.999")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    x_train, _, x_test, y_test = load_split()
    feeds = FeedSet(
        validation=[{"input": x_test[i : i + BATCH]} for i in range(0, 64, BATCH)],
        calibration=[{"input": x_train[i : i + BATCH]} for i in range(0, 64, BATCH)],
        source="digits: 64 training images (calibration), 64 held-out (numerics)",
    )
    original = Model.from_source(MODEL, {"input": (BATCH, 1, 32, 32)})
    rows = [{"budget": "original", "top1": top1(original.proto, x_test, y_test), "speedup": 1.0, "ci95": [1.0, 1.0], "kept": 0}]
    timing = TimingOptions(min_pairs=30, max_pairs=60, time_budget_s=10, settle_early=False)
    for budget in args.budgets.split(";"):
        config = ValidationConfig(budget=Budget.parse(budget), timing=TimingOptions())
        start = time.perf_counter()
        result = optimize(original, ["bottleneck"], feeds=feeds, config=config)
        seconds = time.perf_counter() - start
        lat = Judge(original, feeds, ValidationConfig(timing=timing)).model_latency(original.proto, result.model)
        rows.append({
            "budget": budget,
            "top1": top1(result.model, x_test, y_test),
            "speedup": lat.ci.speedup,
            "ci95": [lat.ci.low, lat.ci.high],
            "kept": len(result.in_model),
            "macs": [result.before.total_macs, result.after.total_macs],
            "kept_rewrites": [d.candidate.description for d in result.in_model],
            "search_seconds": round(seconds, 1),
        })
    text = json.dumps({"model": "digits_cnn (trained, 98.1% held-out top-1)", "batch": BATCH, "rows": rows}, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
