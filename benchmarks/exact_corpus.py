#!/usr/bin/env python3
"""Exact passes on the corpus and sample models: ops, MACs and latency before/after, and the error.

For each model: ``optimize`` with the default (exact) passes under full validation; then the final model
against the original, interleaved, ORT_ENABLE_ALL, 1 intra-op thread, with a 95% bootstrap CI of the
speedup; and the max abs error / allclose ratio against the original run with optimizations disabled.
Writes a Markdown table and a JSON file.

    python benchmarks/exact_corpus.py --corpus .cache/corpus --out docs/exact_corpus
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import onnxruntime

from models.repvgg import build_repvgg
from models.sample import build_sample
from rewriter.graph import op_histogram
from rewriter.model import Model
from rewriter.pipeline import optimize
from rewriter.shapes import parse_input_shapes
from rewriter.validation.judge import Judge, ValidationConfig
from rewriter.validation.latency import TimingOptions
from scripts.fetch_corpus import CORPUS, fetch


def _diff(before: dict[str, int], after: dict[str, int]) -> str:
    keys = sorted(set(before) | set(after), key=lambda k: -before.get(k, 0))
    return ", ".join(f"{k} {before.get(k, 0)}->{after.get(k, 0)}" for k in keys if before.get(k, 0) != after.get(k, 0)) or "unchanged"


def run(name: str, source, shapes: dict, pairs: int) -> dict:  # type: ignore[no-untyped-def]
    model = Model.from_source(source, shapes)
    start = time.perf_counter()
    result = optimize(model)
    seconds = time.perf_counter() - start
    judge = Judge(model, config=ValidationConfig(timing=TimingOptions(min_pairs=pairs, max_pairs=pairs, time_budget_s=60, settle_early=False)))
    stats = judge.numerics(result.model)
    lat = judge.model_latency(model.proto, result.model)
    return {
        "model": name,
        "kept": len(result.kept),
        "rolled_back": len(result.decisions) - len(result.kept),
        "nodes_before": len(model.proto.graph.node),
        "nodes_after": len(result.model.graph.node),
        "ops_change": _diff(op_histogram(model.proto.graph.node), op_histogram(result.model.graph.node)),
        "macs_before": result.before.total_macs,
        "macs_after": result.after.total_macs,
        "max_abs_error": max(s.max_abs for s in stats.values()),
        "allclose_ratio": max(s.allclose_ratio for s in stats.values()),
        "speedup": lat.ci.speedup,
        "ci95": [lat.ci.low, lat.ci.high],
        "optimize_seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path(".cache/corpus"))
    parser.add_argument("--out", type=Path, default=Path("docs/exact_corpus"))
    parser.add_argument("--pairs", type=int, default=60)
    args = parser.parse_args()
    paths = fetch(args.corpus)
    jobs = [("sample (random weights)", build_sample(), {}), ("repvgg (random weights)", build_repvgg(), {})]
    jobs += [(m.short, paths[m.short], parse_input_shapes(m.input_shapes)) for m in CORPUS]
    rows = [run(name, src, shapes, args.pairs) for name, src, shapes in jobs]
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "setting": "CPU EP, 1 intra-op thread, ORT_ENABLE_ALL on both sides, interleaved pairs, 95% bootstrap CI",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Exact passes: corpus and sample models ({meta['date']})",
        "",
        f"{meta['setting']}; onnxruntime {meta['onnxruntime']}, Python {meta['python']}, {meta['machine']}.",
        "Error: against the original under onnxruntime with optimizations disabled; allclose ratio <= 1 means",
        "within rtol 1e-4 / atol 1e-5.",
        "",
        "| model | kept | nodes | op changes | MACs before -> after | speedup [95% CI] | max abs err | allclose ratio | optimize s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['kept']} (rolled back {r['rolled_back']}) | {r['nodes_before']} -> {r['nodes_after']} | {r['ops_change']} | "
            f"{r['macs_before'] / 1e6:.1f}M -> {r['macs_after'] / 1e6:.1f}M | {r['speedup']:.3f}x [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | "
            f"{r['max_abs_error']:.2e} | {r['allclose_ratio']:.3f} | {r['optimize_seconds']} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
