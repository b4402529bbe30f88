#!/usr/bin/env python3
"""Side by side: our optimize (exact; exact then bottleneck) against onnxslim, onnx-simplifier and
onnxruntime's own offline optimizer, on the corpus, the sample models and the classic-architecture zoo.

For every model and tool:

* **tool cost** -- the tool runs as a child process; wall time and the child's peak RSS (``os.wait4``);
* **latency** -- the tool's output against the original, both in onnxruntime deploy sessions (CPU EP,
  1 intra-op thread, ``ORT_ENABLE_ALL`` on both sides), interleaved pairs, the ratio of medians with a 95%
  paired-bootstrap CI (:func:`rewriter.validation.latency.time_pairs`);
* **error** -- max abs error and cosine against the original run with graph optimizations disabled, on
  natural-image validation feeds (:mod:`benchmarks.images`).

The tools:

* ``ours-exact``: ``rewriter.optimize`` with the default exact passes, guarded as the CLI runs it
  (numerics on the validation feeds, latency per rewrite and per pass);
* ``ours-lossy``: the ``bottleneck`` pass on ``ours-exact``'s output, fitted on calibration crops of other
  photographs, under the budget ``--budget`` with the search capped by ``--lossy-cap`` seconds (the
  trained corpus models and ResNet-50 get ``--lossy-cap-large``); its wall time is the search alone;
* ``onnxslim`` and ``onnxsim`` (onnx-simplifier): their CLIs with default options;
* ``ort-extended``: onnxruntime's session with ``optimized_model_filepath`` at ``ORT_ENABLE_EXTENDED``
  (the saved model holds ORT-internal fused ops; it is loaded back with onnxruntime to time it).

Each model also gets an A/A control: the original timed against a second session of itself, the same
way. Its interval shows how far from 1 a ratio lands with no change at all on this machine.

Writes ``OUT.md`` (the table) and ``OUT.json`` (everything measured).

    python -m benchmarks.bench [--models open-nsfw,resnet50] [--quick] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx

from benchmarks.images import image_feeds, imagenet_spec
from benchmarks.zoo import kept_section
from rewriter.validation.feeds import FeedSet, ImageSpec

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOOLS = ("ours-exact", "ours-lossy", "onnxslim", "onnxsim", "ort-extended")
DEFAULT_BUDGET = "cosine>=0.999,top1-drop<=0.01"


@dataclass(frozen=True)
class BenchModel:
    name: str
    origin: str  # corpus | sample | zoo
    spec: ImageSpec
    input_shapes: tuple[str, ...] = ()
    weights: str = "random"
    #: The lossy search gets the long cap (trained models, where its result means something, and the
    #: ResNet-50 of the 120 s target).
    long_search: bool = False


MODELS = (
    BenchModel("open-nsfw", "corpus", ImageSpec(224, 224, "NHWC", "BGR", (104.0, 117.0, 123.0)), weights="trained", long_search=True),
    BenchModel("nudenet-320n", "corpus", ImageSpec(320, 320, "NCHW", "RGB", scale=1.0 / 255.0), ("images:1x3x320x320",), "trained", True),
    BenchModel("ppocrv4-det", "corpus", imagenet_spec(640, 640), ("x:1x3x640x640",), "trained", True),
    BenchModel("ppocr-cls", "corpus", ImageSpec(48, 192, "NCHW", "RGB", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0 / 255.0), ("x:1x3x48x192",), "trained"),
    BenchModel("sample", "sample", imagenet_spec(112, 112)),
    BenchModel("repvgg", "sample", imagenet_spec(96, 96)),
    BenchModel("resnet18", "zoo", imagenet_spec(224, 224)),
    BenchModel("resnet50", "zoo", imagenet_spec(224, 224), long_search=True),
    BenchModel("googlenet", "zoo", imagenet_spec(224, 224)),
    BenchModel("squeezenet1_1", "zoo", imagenet_spec(224, 224)),
    BenchModel("mobilenetv2", "zoo", imagenet_spec(224, 224)),
    BenchModel("vgg16", "zoo", imagenet_spec(224, 224)),
    # A dense-prediction net: output mask [1, 1, 256, 384] (cosine only; top-1 is for N x C class scores).
    BenchModel("unet", "zoo", imagenet_spec(256, 384)),
)
QUICK_MODELS = ("ppocr-cls", "sample", "repvgg", "squeezenet1_1")
#: The models of the "full lossy search <= 120 s for a ResNet-50-size model" target.
RESNET50_SIZE = ("open-nsfw", "resnet50")


# -- child processes: wall time and peak RSS ----------------------------------------------------------


@dataclass
class ChildRun:
    wall_s: float
    peak_rss: int  # bytes
    returncode: int
    timed_out: bool
    stderr_tail: str


#: A tiny launcher between us and the tool. Linux carries a process's RSS high-water mark across fork and
#: exec, so a tool forked straight from this (large) process would report our RSS as its own peak. The
#: launcher (a bare interpreter, a few MB) forks the tool, waits for it with ``wait4`` and writes the
#: tool's own peak RSS and wall time.
_LAUNCHER = """
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(out, "w") as fh:
    json.dump({"wall_s": wall, "maxrss": usage.ru_maxrss, "returncode": os.waitstatus_to_exitcode(status)}, fh)
"""


def run_child(cmd: list[str], timeout_s: float) -> ChildRun:
    """Run ``cmd`` (absolute executable path first): its wall time and peak resident set size (the tool's
    process and the descendants it waited for), measured by :data:`_LAUNCHER`."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "run.json"
        err_path = Path(tmp) / "stderr"
        start = time.perf_counter()
        with open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(report), *cmd], cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            try:
                proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                timed_out = True
        wall = time.perf_counter() - start
        tail = err_path.read_bytes().decode(errors="replace")[-2000:]
        if report.is_file():
            data = json.loads(report.read_text())
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
            return ChildRun(data["wall_s"], int(data["maxrss"]) * scale, int(data["returncode"]), False, tail)
    return ChildRun(wall, 0, proc.returncode if not timed_out else -9, timed_out, tail)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# -- the worker: our pipeline and onnxruntime's offline optimizer, run inside the child ---------------


def _result_summary(result: Any, seconds: float) -> dict[str, Any]:
    decisions = result.decisions
    return {
        "seconds": round(seconds, 2),
        "candidates": len(decisions),
        "kept": len(result.kept),
        "kept_by_pass": dict(Counter(d.candidate.pass_name for d in result.kept)),
        "not_kept": dict(Counter(d.outcome.value for d in decisions if not d.kept)),
        "judge_seconds": round(sum(d.verdict.seconds for d in decisions if d.verdict is not None), 2),
        "skips": dict(Counter(s.reason[:80] for p in result.passes for s in p.skips).most_common(4)),
        "reverted": [f"{p.name}: {p.reverted}" for p in result.passes if p.reverted],
        "macs_before": result.before.total_macs,
        "macs_after": result.after.total_macs,
        "kept_examples": [d.candidate.description for d in result.kept[:3]],
        "pipeline_final_latency": None if result.final_latency is None else str(result.final_latency.ci),
    }


def worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench worker")
    parser.add_argument("kind", choices=("ours-exact", "ours-lossy", "ort-extended", "noop"))
    parser.add_argument("--model")
    parser.add_argument("--out")
    parser.add_argument("--val")
    parser.add_argument("--cal")
    parser.add_argument("--source", default="")
    parser.add_argument("--shape", action="append", default=[])
    parser.add_argument("--budget", default=DEFAULT_BUDGET)
    parser.add_argument("--cap", type=float, default=120.0)
    parser.add_argument("--summary")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    if args.kind == "noop":  # the baseline: what importing the tool costs
        import onnx_graphsurgeon  # noqa: F401

        import rewriter  # noqa: F401
        from passes.bottleneck import Bottleneck  # noqa: F401
        return 0
    if args.kind == "ort-extended":
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = args.out
        ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
        return 0
    summary: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        from rewriter.io import save_model
        from rewriter.model import Model
        from rewriter.pipeline import optimize
        from rewriter.shapes import parse_input_shapes
        from rewriter.validation.feeds import input_specs, load_array_feeds
        from rewriter.validation.judge import ValidationConfig
        from rewriter.validation.numerics import Budget

        model = Model.from_source(args.model, parse_input_shapes(args.shape))
        specs = input_specs(model.proto, model.input_shapes)
        feeds = FeedSet(validation=load_array_feeds(args.val, specs), calibration=load_array_feeds(args.cal, specs), source=args.source)
        if args.kind == "ours-exact":
            result = optimize(model, feeds=feeds)
        else:
            from passes.bottleneck import Bottleneck

            config = ValidationConfig(budget=Budget.parse(args.budget))
            result = optimize(model, passes=[Bottleneck()], feeds=feeds, config=config, time_budget_s=args.cap or None)
        save_model(result.model, args.out)
        summary = _result_summary(result, time.perf_counter() - start)
        code = 0
    except Exception as exc:  # recorded in the table; the bench goes on
        summary = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                   "seconds": round(time.perf_counter() - start, 2)}
        code = 1
    Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    return code


# -- measuring a tool's output --------------------------------------------------------------------------


def _compute_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type != "Constant")


def _histogram(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node)


def _op_diff(before: Counter, after: Counter, limit: int = 5) -> str:
    keys = sorted(set(before) | set(after), key=lambda k: -abs(before.get(k, 0) - after.get(k, 0)))
    parts = [f"{k} {before.get(k, 0)}->{after.get(k, 0)}" for k in keys if before.get(k, 0) != after.get(k, 0)]
    return ", ".join(parts[:limit]) + (" ..." if len(parts) > limit else "") if parts else "no op changes"


def _numerics(reference: list[dict], path: Path, feeds: FeedSet) -> dict[str, Any]:
    from rewriter.validation.numerics import compare_outputs
    from rewriter.validation.runtime import reference_session, run_feeds

    outputs = run_feeds(reference_session(str(path)), feeds.validation)
    stats = compare_outputs(reference, outputs)
    return {
        "max_abs_error": max(s.max_abs for s in stats.values()),
        "cosine": min(s.cosine for s in stats.values()),
        "top1": min((s.top1 for s in stats.values() if s.top1 is not None), default=None),
        "nonfinite_mismatch": sum(s.nonfinite_mismatch for s in stats.values()),
    }


def _latency(base_session: Any, path: Path, feeds: FeedSet, timing: Any) -> dict[str, Any]:
    """``path`` against the original's deploy session; a path, as a tool may write weights beside the model."""
    from rewriter.validation.latency import time_pairs
    from rewriter.validation.runtime import RuntimeOptions, deploy_session

    lat = time_pairs(base_session, deploy_session(str(path), RuntimeOptions(threads=1, optimization="all")), feeds.validation[0], timing)
    return {"speedup": lat.ci.speedup, "ci95": [lat.ci.low, lat.ci.high], "pairs": lat.ci.pairs,
            "base_ms": lat.base_median_s * 1e3, "tool_ms": lat.candidate_median_s * 1e3}


def _macs(path: Path, shapes: tuple[str, ...]) -> int | None:
    from rewriter.analysis import analyze
    from rewriter.model import Model
    from rewriter.shapes import parse_input_shapes

    try:
        return analyze(Model.from_source(path, parse_input_shapes(shapes))).total_macs
    except Exception:  # ORT-internal ops, unreadable output: the column says n/a
        return None


# -- why a row is not faster ------------------------------------------------------------------------------


def _verdict(lat: dict[str, Any], aa: tuple[float, float] | None) -> str:
    """``faster`` / ``slower`` only beyond both 1 and the A/A control's interval; else ``same``."""
    low, high = lat["ci95"]
    if low > max(1.0, aa[1] if aa else 1.0):
        return "faster"
    if high < min(1.0, aa[0] if aa else 1.0):
        return "slower"
    return "same"


def _note(row: dict[str, Any], aa: tuple[float, float] | None) -> str:
    """Why a row is not faster (empty when it is)."""
    tool, s = row["tool"], row.get("summary") or {}
    diff = row.get("op_changes", "")
    lat = row.get("latency")
    if row.get("error"):
        return f"error: {row['error']}"
    if row.get("unchanged"):
        if tool.startswith("ours"):
            why = ", ".join(f"{n} {k}" for k, n in s.get("not_kept", {}).items()) or "no candidate found"
            skips = "; ".join(list(s.get("skips", {}))[:2])
            return f"output is the input: {s.get('candidates', 0)} candidates ({why})" + (f"; skips: {skips}" if skips and not s.get("candidates") else "")
        return "output graph is the input graph"
    if lat is None:
        return ""
    verdict = _verdict(lat, aa)
    if verdict == "faster":
        return ""
    slower = verdict == "slower"
    low, high = lat["ci95"]
    if slower:
        head = "slower"
    elif low > 1.0:
        head = f"CI above 1 but not above the A/A control's upper end {aa[1]:.3f}: not told apart from no change" if aa else "?"
    elif high < 1.0:
        head = f"CI below 1 but not below the A/A control's lower end {aa[0]:.3f}: not told apart from no change" if aa else "?"
    else:
        head = "not shown faster (CI includes 1)"
    if tool == "ours-exact":
        kept = ", ".join(f"{p} x{n}" for p, n in s.get("kept_by_pass", {}).items())
        if set(s.get("kept_by_pass", {})) <= {"fold_batchnorm"}:
            return (f"{head}: kept {kept}; ORT_ENABLE_ALL folds BN into Conv at load, so offline folding saves load work, "
                    f"not run time{'' if not slower else ' (each fold was judged not slower beyond the 1% margin)'}")
        return f"{head}: kept {kept}; {diff}"
    if tool == "ours-lossy":
        if not s.get("kept"):
            why = ", ".join(f"{n} {k}" for k, n in s.get("not_kept", {}).items())
            return f"{head}: no factorization kept ({why})"
        return f"{head}: kept {s['kept']} factorizations; {diff}"
    tail = "; not investigated why it is slower" if slower else ""
    if tool == "ort-extended":
        return f"{head}: ORT's EXTENDED fusions saved offline ({diff}); ORT_ENABLE_ALL does the same at load{tail}"
    if diff == "no op changes":
        return f"{head}: no op changes{tail}"
    return f"{head}: {diff}; ORT_ENABLE_ALL does these fusions/foldings at load itself{tail}"


# -- one model -------------------------------------------------------------------------------------------


@dataclass
class Settings:
    corpus: Path
    work: Path
    budget: str
    lossy_cap: float
    lossy_cap_large: float
    calibration: int
    validation: int
    timing: Any
    tool_timeout: float


@dataclass
class ModelResult:
    name: str
    origin: str
    weights: str
    size_bytes: int = 0
    macs: int | None = None
    nodes: int = 0
    input: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def _materialize(bm: BenchModel, s: Settings) -> Path:
    if bm.origin == "corpus":
        from scripts.fetch_corpus import fetch

        return fetch(s.corpus)[bm.name]
    from rewriter.io import save_model

    if bm.origin == "sample":
        from models.repvgg import build_repvgg
        from models.sample import build_sample

        proto = {"sample": build_sample, "repvgg": build_repvgg}[bm.name]()
    else:
        from models.zoo import build

        proto = build(bm.name)
    path = s.work / "models" / f"{bm.name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(proto, path)
    return path


def _save_feeds(feeds: list[dict[str, np.ndarray]], path: Path) -> None:
    np.savez(path, **{name: np.stack([f[name] for f in feeds]) for name in feeds[0]})


def _tool_cmd(tool: str, src: Path, out: Path, bm: BenchModel, s: Settings, files: dict[str, Path], source: str) -> list[str] | str:
    py = [sys.executable, "-m", "benchmarks.bench", "_worker"]
    shapes = [a for shape in bm.input_shapes for a in ("--shape", shape)]
    feeds = ["--val", str(files["val"]), "--cal", str(files["cal"]), "--source", source, "--summary", str(files[tool])]
    if tool == "ours-exact":
        return py + ["ours-exact", "--model", str(src), "--out", str(out)] + shapes + feeds
    if tool == "ours-lossy":
        cap = s.lossy_cap_large if bm.long_search else s.lossy_cap
        return py + ["ours-lossy", "--model", str(src), "--out", str(out), "--budget", s.budget, "--cap", str(cap)] + shapes + feeds
    if tool == "ort-extended":
        return py + ["ort-extended", "--model", str(src), "--out", str(out)]
    exe = shutil.which(tool, path=str(BIN)) or shutil.which(tool)
    if exe is None:
        return "not installed (pip install 'onnx-bottleneck[bench]')"
    return [exe, str(src), str(out)]


def bench_model(bm: BenchModel, s: Settings, baseline_rss: int) -> ModelResult:
    from rewriter.model import Model
    from rewriter.shapes import parse_input_shapes
    from rewriter.validation.feeds import input_specs
    from rewriter.validation.runtime import RuntimeOptions, deploy_session, reference_session, run_feeds

    res = ModelResult(bm.name, bm.origin, bm.weights)
    try:
        path = _materialize(bm, s)
    except (Exception, SystemExit) as exc:
        res.error = f"could not get the model: {exc}"
        return res
    original = onnx.load(path)
    res.size_bytes = path.stat().st_size
    res.nodes = _compute_nodes(original)
    res.macs = _macs(path, bm.input_shapes)
    model = Model.from_source(original, parse_input_shapes(bm.input_shapes))
    (spec_in,) = input_specs(model.proto, model.input_shapes)
    res.input = f"{spec_in.name} {'x'.join(map(str, spec_in.shape))}"
    feeds = image_feeds(bm.spec, spec_in.name, calibration=s.calibration, validation=s.validation)
    del model
    folder = s.work / bm.name
    folder.mkdir(parents=True, exist_ok=True)
    files = {"val": folder / "val.npz", "cal": folder / "cal.npz"} | {t: folder / f"{t}.summary.json" for t in TOOLS}
    _save_feeds(feeds.validation, files["val"])
    _save_feeds(feeds.calibration, files["cal"])
    original_bytes = path.read_bytes()
    reference = run_feeds(reference_session(str(path)), feeds.validation)
    base_session = deploy_session(str(path), RuntimeOptions(threads=1, optimization="all"))
    before_hist = _histogram(original)
    # A/A control: the original against a second session of itself.
    control = {"model": bm.name, "tool": "original (A/A)", "nodes": res.nodes, "macs": res.macs,
               "latency": _latency(base_session, path, feeds, s.timing), "max_abs_error": 0.0, "cosine": 1.0,
               "note": "A/A control: nothing changed; the interval is this machine's noise"}
    res.rows.append(control)
    outputs: dict[str, Path] = {}
    for tool in TOOLS:
        row: dict[str, Any] = {"model": bm.name, "tool": tool}
        res.rows.append(row)
        files[tool].unlink(missing_ok=True)
        out = folder / f"{tool}.onnx"
        out.unlink(missing_ok=True)
        src = outputs.get("ours-exact", path) if tool == "ours-lossy" else path
        if tool == "ours-lossy":
            row["input"] = "ours-exact output" if src != path else "original (ours-exact failed)"
        cmd = _tool_cmd(tool, src, out, bm, s, files, feeds.source)
        if isinstance(cmd, str):
            row["error"] = cmd
            continue
        timeout = s.tool_timeout + (s.lossy_cap_large if tool == "ours-lossy" else 0)
        log.info("%s: %s", bm.name, tool)
        child = run_child(cmd, timeout)
        row.update(wall_s=round(child.wall_s, 2), peak_rss_mb=round(child.peak_rss / 2**20, 1),
                   rss_over_size=round(child.peak_rss / res.size_bytes, 2),
                   rss_over_baseline_over_size=round(max(0, child.peak_rss - baseline_rss) / res.size_bytes, 2))
        if files[tool].is_file():
            row["summary"] = json.loads(files[tool].read_text())
            if "error" in row["summary"]:
                row["error"] = row["summary"]["error"]
        if child.timed_out:
            row["error"] = f"timed out after {timeout:.0f} s"
        elif child.returncode != 0 and "error" not in row:
            row["error"] = f"exit code {child.returncode}: {_last_line(child.stderr_tail)}"
        if "error" in row or not out.is_file():
            row.setdefault("error", "wrote no model")
            continue
        outputs[tool] = out
        try:
            proto_bytes = out.read_bytes()
            tool_model = onnx.load_model_from_string(proto_bytes)
            row["nodes"] = _compute_nodes(tool_model)
            after_hist = _histogram(tool_model)
            diff = _op_diff(before_hist, after_hist)
            row["op_changes"] = diff
            row["macs"] = _macs(out, bm.input_shapes) if not any(k.startswith("com.") for k in after_hist) else None
            unchanged_src = src.read_bytes() if tool == "ours-lossy" else original_bytes
            row["unchanged"] = proto_bytes == unchanged_src or (after_hist == _histogram(onnx.load_model_from_string(unchanged_src))
                                                                 and tool.startswith("ours") and not (row.get("summary") or {}).get("kept"))
            row.update(_numerics(reference, out, feeds))
            if row["unchanged"]:
                row["latency"] = None  # the same graph: nothing to time
            else:
                row["latency"] = _latency(base_session, out, feeds, s.timing)
        except Exception as exc:
            row["error"] = f"measuring failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    annotate(res)
    return res


def _aa_interval(res: ModelResult) -> tuple[float, float] | None:
    control = next((r for r in res.rows if r["tool"] == "original (A/A)"), None)
    lat = None if control is None else control.get("latency")
    return None if lat is None else (lat["ci95"][0], lat["ci95"][1])


def annotate(res: ModelResult) -> None:
    """Each tool row's note, judged against 1 and against the model's A/A control."""
    aa = _aa_interval(res)
    for row in res.rows:
        if row["tool"] in TOOLS:
            row["note"] = _note(row, aa)


# -- report ----------------------------------------------------------------------------------------------


def _fmt_ci(lat: dict[str, Any] | None, unchanged: bool = False) -> str:
    if lat is None:
        return "1 (unchanged)" if unchanged else "-"
    return f"{lat['speedup']:.3f}x [{lat['ci95'][0]:.3f}, {lat['ci95'][1]:.3f}]"


def _fmt_err(row: dict[str, Any]) -> tuple[str, str]:
    if "max_abs_error" not in row:
        return "-", "-"
    return f"{row['max_abs_error']:.2e}", f"{row['cosine']:.6f}"


def _short(row: dict[str, Any], aa: tuple[float, float] | None = None) -> str:
    if row.get("error"):
        return "error" if "not installed" not in row["error"] else "n/a"
    lat = row.get("latency")
    if lat is None:
        return "1 (no change)" if row.get("unchanged") or "max_abs_error" in row else "-"
    verdict = "same" if row.get("tool", "").startswith("original") else _verdict(lat, aa)
    mark = {"faster": " **faster**", "slower": " slower", "same": ""}[verdict]
    return f"{lat['speedup']:.2f}x [{lat['ci95'][0]:.2f}, {lat['ci95'][1]:.2f}]{mark}"


def _targets(results: list[ModelResult], meta: dict[str, Any]) -> dict[str, Any]:
    exact_vs_slim, lossy, rss = [], [], []
    for r in results:
        by = {row["tool"]: row for row in r.rows}
        ours, slim = by.get("ours-exact", {}), by.get("onnxslim", {})
        if "wall_s" in ours and "wall_s" in slim and not slim.get("error"):
            judge = (ours.get("summary") or {}).get("judge_seconds")
            exact_vs_slim.append({"model": r.name, "ours_s": ours["wall_s"], "onnxslim_s": slim["wall_s"],
                                  "ratio": round(ours["wall_s"] / slim["wall_s"], 2), "ours_judging_s": judge,
                                  "meets": ours["wall_s"] <= 2 * slim["wall_s"]})
        lrow = by.get("ours-lossy", {})
        if "wall_s" in lrow:
            s = lrow.get("summary") or {}
            not_tried = s.get("not_kept", {}).get("not_tried_time", 0)
            lossy.append({"model": r.name, "size_mb": round(r.size_bytes / 2**20, 1), "macs": r.macs, "wall_s": lrow["wall_s"],
                          "candidates": s.get("candidates"), "kept": s.get("kept"), "not_tried_time_cap": not_tried,
                          "error": lrow.get("error"), "resnet50_size": r.name in RESNET50_SIZE})
        for tool in ("ours-exact", "ours-lossy"):
            row = by.get(tool, {})
            if "peak_rss_mb" in row:
                rss.append({"model": r.name, "tool": tool, "size_mb": round(r.size_bytes / 2**20, 1), "peak_rss_mb": row["peak_rss_mb"],
                            "ratio": row["rss_over_size"], "ratio_over_baseline": row["rss_over_baseline_over_size"],
                            "meets": row["rss_over_size"] <= 3.0, "meets_over_baseline": row["rss_over_baseline_over_size"] <= 3.0})
    return {"exact_vs_onnxslim": exact_vs_slim, "lossy_search": lossy, "peak_rss": rss}


def _cap(seconds: float) -> str:
    return f"{seconds:g} s" if seconds else "none"


def render(results: list[ModelResult], meta: dict[str, Any], targets: dict[str, Any]) -> str:
    out = [
        f"# Benchmarks: onnx-bottleneck against onnxslim, onnx-simplifier and onnxruntime's offline optimizer",
        "",
        f"Generated by `make bench` (`python -m benchmarks.bench {meta['args']}`) on {meta['date']}.",
        "",
        f"* Machine: {meta['machine']}; load average {meta['load_start']} at the start, {meta['load_end']} at the end "
        f"(a shared machine: the interleaved pairs cancel drift that hits both sides, not noise).",
        f"* Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.",
        f"* Latency: {meta['setting']}. Each model's **A/A control** times the original against a second session of "
        "itself: a tool's output is called **faster** (or slower) only when its interval lies beyond both 1 and the "
        "A/A interval.",
        f"* Error: against the original model under onnxruntime with graph optimizations disabled, on {meta['validation']} "
        f"validation crops of scikit-image photographs (max abs error and the lowest cosine over outputs).",
        f"* `ours-lossy`: the `bottleneck` pass on `ours-exact`'s output, budget `{meta['budget']}`, fitted on "
        f"{meta['calibration']} calibration crops of *other* photographs; search cap {_cap(meta['lossy_cap_large'])} for "
        f"{', '.join(meta['long_search_models'])} and {_cap(meta['lossy_cap'])} for the rest; its wall time is the "
        f"search alone (add `ours-exact`'s for end to end).",
        "* Tool wall time and peak RSS: each tool is a child process (Python start-up and imports included; one run each). "
        f"Importing our tool alone peaks at {meta['baseline_rss_mb']:.0f} MB RSS.",
        "* Random-weight models (sample, repvgg, the zoo) are for structure and latency only: their flat weight "
        "spectra make every low-rank factorization lose accuracy, so the lossy pass rightly keeps little there.",
        "",
        "## Summary: speedup of each tool's output over the original (95% CI)",
        "",
        "| model | weights | size MB | GMACs | A/A control | ours exact | ours lossy (cosine) | onnxslim | onnx-simplifier | ORT extended |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            out.append(f"| {r.name} | {r.weights} | - | - | {r.error} | | | | | |")
            continue
        by = {row["tool"]: row for row in r.rows}
        lossy = by.get("ours-lossy", {})
        aa = _aa_interval(r)
        lossy_cell = _short(lossy, aa) + (f" ({lossy['cosine']:.4f})" if "cosine" in lossy and not lossy.get("error") else "")
        macs = f"{r.macs / 1e9:.2f}" if r.macs else "-"
        out.append(f"| {r.name} | {r.weights} | {r.size_bytes / 2**20:.1f} | {macs} | {_short(by.get('original (A/A)', {}))} | "
                   f"{_short(by.get('ours-exact', {}), aa)} | {lossy_cell} | "
                   f"{_short(by.get('onnxslim', {}), aa)} | {_short(by.get('onnxsim', {}), aa)} | {_short(by.get('ort-extended', {}), aa)} |")
    out += ["", "## Tool-speed targets", ""]
    ev = targets["exact_vs_onnxslim"]
    met = sum(e["meets"] for e in ev)
    out += [f"**Exact pipeline <= 2x onnxslim's wall time**: met on {met} of {len(ev)} models.", "",
            "| model | ours exact s | of which judging s | onnxslim s | ratio |", "|---|---|---|---|---|"]
    out += [f"| {e['model']} | {e['ours_s']:.1f} | {e['ours_judging_s'] if e['ours_judging_s'] is not None else '-'} | {e['onnxslim_s']:.1f} | "
            f"{e['ratio']:.1f}x{'' if e['meets'] else ' (missed)'} |" for e in ev]
    out += ["", f"**Full guarded lossy search <= 120 s for a ResNet-50-size model** (cap {_cap(meta['lossy_cap_large'])}; met only "
            "when it finished within 120 s with no candidate left untried):", "",
            "| model | size MB | GMACs | search wall s | candidates judged | kept | not tried (cap) | met |", "|---|---|---|---|---|---|---|---|"]
    for e in targets["lossy_search"]:
        if not e["resnet50_size"]:
            continue
        judged = None if e["candidates"] is None else e["candidates"] - (e["not_tried_time_cap"] or 0)
        out.append(f"| {e['model']} | {e['size_mb']} | {(e['macs'] or 0) / 1e9:.2f} | {e['wall_s']:.1f} | {judged if judged is not None else '-'} | "
                   f"{e['kept'] if e['kept'] is not None else e['error']} | {e['not_tried_time_cap']} | "
                   f"{'yes' if e['wall_s'] <= 120 and not e['not_tried_time_cap'] and not e['error'] else 'no'} |")
    rs = targets["peak_rss"]
    out += ["", f"**Peak RSS <= 3x the model's size**: met on {sum(e['meets'] for e in rs)} of {len(rs)} runs counting the whole "
            f"process, {sum(e['meets_over_baseline'] for e in rs)} of {len(rs)} counting only what lies above the "
            f"{meta['baseline_rss_mb']:.0f} MB of the interpreter and imports.", "",
            "| model | tool | size MB | peak RSS MB | x size | (RSS - baseline) / size |", "|---|---|---|---|---|---|"]
    out += [f"| {e['model']} | {e['tool']} | {e['size_mb']} | {e['peak_rss_mb']:.0f} | {e['ratio']:.1f} | {e['ratio_over_baseline']:.1f} |" for e in rs]
    out += ["", "## Full table", "",
            "Compute nodes exclude `Constant` nodes. A note says why a row is not faster (CI including 1, or below it).", "",
            "| model | tool | wall s | peak RSS MB (x size) | compute nodes | GMACs | speedup [95% CI] | max abs err | cosine | note |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.error:
            out.append(f"| {r.name} | - | - | - | - | - | - | - | - | {r.error} |")
            continue
        for row in r.rows:
            wall = f"{row['wall_s']:.1f}" if "wall_s" in row else "-"
            rss = f"{row['peak_rss_mb']:.0f} ({row['rss_over_size']:.1f})" if "peak_rss_mb" in row else "-"
            nodes = f"{r.nodes} -> {row['nodes']}" if "nodes" in row else "-"
            macs = f"{row['macs'] / 1e9:.3f}" if row.get("macs") else "-"
            err, cos = _fmt_err(row)
            note = row.get("note", "").replace("|", "/")
            out.append(f"| {r.name} | {row['tool']} | {wall} | {rss} | {nodes} | {macs} | {_fmt_ci(row.get('latency'), row.get('unchanged', False))} | "
                       f"{err} | {cos} | {note} |")
    return "\n".join(out) + "\n"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("onnx-bottleneck", "onnxruntime", "onnx", "numpy", "onnxslim", "onnxsim", "scikit-image"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def write(results: list[ModelResult], meta: dict[str, Any], out: Path) -> str:
    targets = _targets(results, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "targets": targets, "models": [r.__dict__ for r in results]}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    text = render(results, meta, targets)
    md = out.with_suffix(".md")
    zoo_section = kept_section(md.read_text()) if md.exists() else None  # make bench-zoo's section stays
    md.write_text(text + ("\n" + zoo_section if zoo_section else ""))
    return text


def rerender(source: Path, out: Path) -> int:
    payload = json.loads(source.read_text())
    results = [ModelResult(**m) for m in payload["models"]]
    for r in results:
        annotate(r)
    sys.stdout.write(write(results, payload["meta"], out))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help=f"comma-separated subset of: {', '.join(m.name for m in MODELS)}")
    parser.add_argument("--quick", action="store_true", help=f"small models ({', '.join(QUICK_MODELS)}), fewer pairs and feeds, short caps; "
                        "writes build/bench-quick.* unless --out is given")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default docs/bench): OUT.md and OUT.json")
    parser.add_argument("--corpus", type=Path, default=Path(".cache/corpus"))
    parser.add_argument("--work", type=Path, default=Path(".cache/bench"), help="tool outputs and built models (not committed)")
    parser.add_argument("--budget", default=DEFAULT_BUDGET, help="numerics budget of the lossy run")
    parser.add_argument("--lossy-cap", type=float, default=None, help="seconds for the bottleneck search (default 45; quick 15; 0: no cap)")
    parser.add_argument("--lossy-cap-large", type=float, default=None,
                        help="the same for the trained corpus models and resnet50 (default 120; quick 30)")
    parser.add_argument("--pairs", type=int, default=None, help="most interleaved pairs per latency comparison (default 60; quick 15)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="measure nothing: re-write OUT.md (and the notes in OUT.json) from a JSON file this script wrote")
    args = parser.parse_args(argv)
    if args.render is not None:
        return rerender(args.render, args.out or args.render.with_suffix(""))
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from rewriter.validation.latency import TimingOptions

    names = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else [m.name for m in MODELS])
    known = {m.name: m for m in MODELS}
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(known)}")
    out = args.out or Path("build/bench-quick" if args.quick else "docs/bench")
    pairs = args.pairs or (15 if args.quick else 60)
    timing = TimingOptions(warmup=10, min_pairs=min(pairs, 8 if args.quick else 20), max_pairs=pairs,
                           time_budget_s=4.0 if args.quick else 12.0, min_sample_s=0.01)
    settings = Settings(
        corpus=args.corpus, work=args.work, budget=args.budget,
        lossy_cap=args.lossy_cap if args.lossy_cap is not None else (15.0 if args.quick else 45.0),
        lossy_cap_large=args.lossy_cap_large if args.lossy_cap_large is not None else (30.0 if args.quick else 120.0),
        calibration=8 if args.quick else 16, validation=4 if args.quick else 8, timing=timing, tool_timeout=1800.0,
    )
    settings.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_start = os.getloadavg()
    baseline = run_child([sys.executable, "-m", "benchmarks.bench", "_worker", "noop"], 300)
    results = []
    for name in names:
        t0 = time.perf_counter()
        try:
            results.append(bench_model(known[name], settings, baseline.peak_rss))
        except Exception as exc:  # one model's failure is a row of the table, not the end of the bench
            log.exception("%s failed", name)
            bm = known[name]
            results.append(ModelResult(bm.name, bm.origin, bm.weights, error=f"bench failed: {type(exc).__name__}: {exc}"[:300]))
        log.info("%s done in %.0f s", name, time.perf_counter() - t0)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "args": " ".join(argv),
        "machine": _machine(),
        "load_start": " / ".join(f"{v:.1f}" for v in load_start),
        "load_end": " / ".join(f"{v:.1f}" for v in os.getloadavg()),
        "versions": _versions(),
        "setting": (f"CPU EP, 1 intra-op thread, ORT_ENABLE_ALL on both sides, interleaved pairs ({timing.min_pairs}-{timing.max_pairs}, "
                    f"each sample >= {timing.min_sample_s * 1e3:g} ms of repeated runs), ratio of medians with a 95% paired-bootstrap CI"),
        "budget": settings.budget,
        "lossy_cap": settings.lossy_cap,
        "lossy_cap_large": settings.lossy_cap_large,
        "long_search_models": [m.name for m in MODELS if m.long_search],
        "calibration": settings.calibration,
        "validation": settings.validation,
        "baseline_rss_mb": baseline.peak_rss / 2**20,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    sys.stdout.write(write(results, meta, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
