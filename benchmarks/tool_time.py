#!/usr/bin/env python3
"""The cost of proof: wall time and peak memory of our default run against onnxslim's, per model.

Ours = ``onnx-bottleneck optimize MODEL -o OUT`` as a user runs it: the exact passes, numerics validated
*and* latency measured; theirs = ``onnxslim MODEL OUT``. Each is
a fresh process; rounds alternate which goes first. Per model: the median wall times, their ratio with a 95%
paired bootstrap interval, and each tool's peak resident memory (VmHWM of its own process, polled), beside the issue's bound of 400 MB + 3x the model's bytes. Models: the corpus (fetched) and the
zoo's ResNet-50 and U-Net (built), at their default shapes.

    python -m benchmarks.tool_time --corpus .cache/corpus --rounds 3 --json docs/tool_time.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rewriter.validation.stats import bootstrap_speedup

BIN = Path(sys.executable).parent
#: Corpus models and the dims they need (the rest of the corpus resolves its batch dim alone).
CORPUS = {"open-nsfw": [], "nudenet-320n": ["images:1x3x320x320"], "ppocrv4-det": ["x:1x3x640x640"], "ppocr-cls": ["x:1x3x48x192"]}
ZOO = ("resnet50", "unet")


def _hwm(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM, bytes; 0 once it is gone). A high-water mark that
    starts afresh at exec, unlike ``ru_maxrss``, which a forked child inherits from this (large) process."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes; VmHWM polled every 20 ms) of one command in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _hwm(proc.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {proc.returncode}: {err[-500:]}")
    return wall, peak


def models(corpus: Path, work: Path) -> dict[str, tuple[Path, list[str]]]:
    from models.zoo import build
    from rewriter.io import save_model
    from scripts.fetch_corpus import fetch

    paths = fetch(corpus)
    found = {name: (Path(paths[name]), shapes) for name, shapes in CORPUS.items() if name in paths}
    for name in ZOO:
        path = work / f"{name}.onnx"
        save_model(build(name), path)
        found[name] = (path, [])
    return found


def measure(name: str, path: Path, shapes: list[str], rounds: int, work: Path) -> dict[str, Any]:
    slim = shutil.which("onnxslim", path=str(BIN)) or shutil.which("onnxslim")
    if slim is None:
        raise SystemExit("onnxslim is not installed (pip install onnxslim)")
    shape_args = [a for s in shapes for a in ("--input-shape", s)]
    ours = [str(BIN / "onnx-bottleneck"), "--quiet", "optimize", str(path), "-o", str(work / "ours.onnx"), *shape_args]
    theirs = [slim, str(path), str(work / "slim.onnx")]
    run(ours), run(theirs)  # warm the file cache
    t_ours, t_slim, m_ours, m_slim = [], [], [], []
    for i in range(rounds):
        for cmd, times, mems in ([(ours, t_ours, m_ours), (theirs, t_slim, m_slim)][:: 1 if i % 2 == 0 else -1]):
            wall, rss = run(cmd)
            times.append(wall)
            mems.append(rss)
    ci = bootstrap_speedup(t_ours, t_slim)  # median(ours) / median(onnxslim)
    size = path.stat().st_size
    return {
        "model": name, "bytes": size, "rounds": rounds,
        "ours_median_s": sorted(t_ours)[len(t_ours) // 2], "onnxslim_median_s": sorted(t_slim)[len(t_slim) // 2],
        "ratio_ours_over_onnxslim": ci.speedup, "ci95": [ci.low, ci.high],
        "ours_peak_rss_mb": max(m_ours) / 2**20, "onnxslim_peak_rss_mb": max(m_slim) / 2**20,
        "rss_bound_mb": 400 + 3 * size / 2**20,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | size | ours (default exact, latency measured) | onnxslim | ratio [95% CI] (target <= 2) | peak RSS ours / onnxslim | bound 400 MB + 3x |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bytes'] / 2**20:.1f} MB | {r['ours_median_s']:.1f} s | {r['onnxslim_median_s']:.1f} s | "
                     f"{r['ratio_ours_over_onnxslim']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | "
                     f"{r['ours_peak_rss_mb']:.0f} / {r['onnxslim_peak_rss_mb']:.0f} MB | {r['rss_bound_mb']:.0f} MB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path(".cache/corpus"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=None, help="comma-separated subset")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tool-time-") as tmp:
        work = Path(tmp)
        todo = models(args.corpus, work)
        if args.models:
            todo = {k: v for k, v in todo.items() if k in args.models.split(",")}
        rows = []
        for name, (path, shapes) in todo.items():
            rows.append(measure(name, path, shapes, args.rounds, work))
            sys.stderr.write(f"{name}: {rows[-1]['ours_median_s']:.1f} s vs {rows[-1]['onnxslim_median_s']:.1f} s\n")
    text = table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
