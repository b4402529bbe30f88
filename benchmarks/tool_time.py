#!/usr/bin/env python3
"""Wall time of our tool against onnxslim on the same model, interleaved runs in fresh processes.

Ours = ``onnx-bottleneck analyze MODEL`` + ``onnx-bottleneck optimize MODEL -o OUT --no-latency`` (exact
passes, numerics validated, latency not measured); theirs = ``onnxslim MODEL OUT``. Each round runs both
(alternating which goes first); the result is the ratio of median wall times with a 95% paired bootstrap
interval.

    python benchmarks/tool_time.py --corpus .cache/corpus --rounds 7
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

from rewriter.validation.stats import bootstrap_speedup

BIN = Path(sys.executable).parent


def _wall(cmds: list[list[str]]) -> float:
    start = time.perf_counter()
    for cmd in cmds:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path(".cache/corpus"))
    parser.add_argument("--model", default="open-nsfw")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = args.corpus / f"{args.model}.onnx"
    slim = shutil.which("onnxslim", path=str(BIN)) or shutil.which("onnxslim")
    if slim is None:
        raise SystemExit("onnxslim is not installed (pip install onnxslim)")
    ours_bin = str(BIN / "onnx-bottleneck")
    with tempfile.TemporaryDirectory() as tmp:
        ours = [[ours_bin, "--quiet", "analyze", str(model)],
                [ours_bin, "--quiet", "optimize", str(model), "-o", f"{tmp}/ours.onnx", "--no-latency"]]
        theirs = [[slim, str(model), f"{tmp}/slim.onnx"]]
        _wall(ours), _wall(theirs)  # warm the file cache and imports
        t_ours, t_slim = [], []
        for i in range(args.rounds):
            if i % 2 == 0:
                t_ours.append(_wall(ours))
                t_slim.append(_wall(theirs))
            else:
                t_slim.append(_wall(theirs))
                t_ours.append(_wall(ours))
    # ratio = ours / onnxslim (bootstrap_speedup(a, b) estimates median(a)/median(b)).
    ci = bootstrap_speedup(t_ours, t_slim)
    result = {
        "model": args.model,
        "rounds": args.rounds,
        "ours_median_s": sorted(t_ours)[len(t_ours) // 2],
        "onnxslim_median_s": sorted(t_slim)[len(t_slim) // 2],
        "ratio_ours_over_onnxslim": ci.speedup,
        "ci95": [ci.low, ci.high],
        "target": "<= 2.0",
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
