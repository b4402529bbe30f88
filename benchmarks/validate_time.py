#!/usr/bin/env python3
"""How long judging one rewrite takes on open-nsfw: end to end and through the region fast path.

The "rewrite" is a stand-in that touches one 3x3 conv (its weights scaled by 1.0001, so numerics stay
within a loose budget): judging cost does not depend on what the rewrite did, only on the model, the
number of numerics feeds and the latency A/B. Reports wall seconds of ``Judge.judge`` with
``subgraph_latency`` off (whole model timed) and on (region timed).

    python benchmarks/validate_time.py --corpus .cache/corpus --feeds 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from rewriter.contract import Candidate, Cost
from rewriter.graph import NameFactory, constant, const_value
from rewriter.model import Model
from rewriter.validation.feeds import FeedSet, input_specs
from rewriter.validation.judge import Judge, ValidationConfig
from rewriter.validation.numerics import Budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path(".cache/corpus"))
    parser.add_argument("--feeds", type=int, default=32)
    parser.add_argument("--node", default="Conv__450")
    args = parser.parse_args()
    t0 = time.perf_counter()
    model = Model.from_source(args.corpus / "open-nsfw.onnx")
    trial = model.fork()
    node = trial.node(args.node)
    w = const_value(node.inputs[1])
    node.inputs[1] = constant(NameFactory(trial.graph), "scaled_W", (w * np.float32(1.0001)).astype(w.dtype))
    trial = trial.commit()
    candidate = Candidate("stand-in", (args.node,), "scale one 3x3 conv", Cost(0, 0, 0, 0))
    feeds = FeedSet.random(input_specs(model.proto, model.input_shapes), count=args.feeds, calibration_count=1)
    budget = Budget.parse("cosine>=0.99")
    setup = time.perf_counter() - t0
    results = {}
    for scope, sub in (("model", False), ("subgraph", True)):
        judge = Judge(model, feeds, ValidationConfig(budget=budget, subgraph_latency=sub))
        start = time.perf_counter()
        _ = judge.reference  # computed once per pipeline run; counted here
        ref_s = time.perf_counter() - start
        verdict = judge.judge(model, trial, candidate, exact=False)
        total = time.perf_counter() - start
        results[scope] = {
            "seconds_total": round(total, 3),
            "seconds_reference_once": round(ref_s, 3),
            "seconds_judge": round(verdict.seconds, 3),
            "latency_scope": verdict.latency_scope,
            "speedup": None if verdict.latency is None else str(verdict.latency.ci),
        }
    # The fast path proper: region latency alone (numerics always run on the whole model).
    judge = Judge(model, feeds, ValidationConfig(budget=budget))
    start = time.perf_counter()
    judge.region_latency(model, trial, candidate)
    results["subgraph_latency_only_s"] = round(time.perf_counter() - start, 3)
    results["feeds"] = args.feeds
    results["setup_s"] = round(setup, 3)
    sys.stdout.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
