#!/usr/bin/env python3
"""The zoo benchmark (``make bench-zoo``): every model we have, as it comes, through ONE ``optimize-many`` job.

The models: the corpus (``scripts/fetch_corpus.py``: open-nsfw, nudenet-320n, ppocrv4-det, ppocr-cls) and
every builder (``models/zoo.py`` with its symbolic batch dim ``N``, ``models/sample.py``,
``models/repvgg.py``), each with its dynamic dims. The job's settings are one config file,
``benchmarks/zoo.toml`` (the input shapes the dynamic inputs need, per model where two models share an
input name); everything else is the exact default. The job is the CLI in a child process:

    onnx-bottleneck optimize-many MODELS... --config benchmarks/zoo.toml --out-dir WORK/out [--ray-address local] [--jobs N]

Writes the "Zoo job" section of ``docs/bench.md`` (between its markers; the rest of the file is left as
it is, and ``make bench`` keeps the section) -- the per-model outcomes, the job's wall time and models
per hour -- and ``docs/bench_zoo.json`` (the job's summary, paths made relative).

    python -m benchmarks.zoo --corpus .cache/corpus [--ray-address local] [--jobs N] [--work build/bench-zoo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "zoo.toml"
START, END = "<!-- bench-zoo:start -->", "<!-- bench-zoo:end -->"


# -- the models ----------------------------------------------------------------------------------------------
def build_models(folder: Path) -> list[Path]:
    """Every builder model, written to ``folder`` (the zoo's batch dim left symbolic, as exported)."""
    from models.repvgg import build_repvgg
    from models.sample import build_sample
    from models.zoo import BUILDERS, build
    from rewriter.io import save_model

    folder.mkdir(parents=True, exist_ok=True)
    protos = {"sample": build_sample, "repvgg": build_repvgg} | {name: (lambda n=name: build(n)) for name in BUILDERS}
    paths = []
    for name, make in protos.items():
        path = folder / f"{name}.onnx"
        save_model(make(), path)
        paths.append(path)
    return paths


def corpus_models(corpus: Path) -> list[Path]:
    from scripts.fetch_corpus import fetch

    return list(fetch(corpus).values())


# -- the job ------------------------------------------------------------------------------------------------
def run_job(models: list[Path], out: Path, config: Path, ray_address: str | None, jobs: int | None, log: Path) -> tuple[int, float]:
    """``optimize-many`` over ``models`` in a child process: its exit code and wall time (start-up included)."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "rewriter.cli", "optimize-many", *map(str, models), "--config", str(config), "--out-dir", str(out)]
    if ray_address:
        cmd += ["--ray-address", ray_address]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False).returncode
    return code, time.perf_counter() - start


# -- the section ----------------------------------------------------------------------------------------------
def _relative(text: str, places: dict[str, str]) -> str:
    for path, label in places.items():
        text = text.replace(path, label)
    return text


def _speedup(row: dict[str, Any]) -> str:
    if row.get("speedup") is None:
        return "-" if row["status"] != "ok" else "1 (no change)" if not row["kept"] else "not measured"
    low, high = row["speedup_ci"]
    return f"{row['speedup']:.2f}x [{low:.2f}, {high:.2f}]"


def _shapes(row: dict[str, Any]) -> str:
    settings = row.get("settings") or {}
    given = ", ".join(f"`{k}:{'x'.join(map(str, v))}`" for k, v in settings.get("input_shapes", {}).items())
    tables = ", ".join(f'`[models."{t}"]`' for t in settings.get("tables", []))
    defaulted = ", ".join(f"`{n['input']}` batch {n['declared'] or '?'} -> 1" for n in settings.get("input_shape_notes", []))
    return (given or "-") + (f" (from {tables})" if tables else "") + (f"; defaulted: {defaulted}" if defaulted else "")


def render(summary: dict[str, Any], wall: float, code: int, meta: dict[str, str]) -> str:
    rows = summary["models"]
    counts = summary["counts"]
    mode = f"a local pool of {summary['workers']} worker process(es)" if summary["mode"] == "local" else f"Ray, up to {summary['workers']} task(s) in flight"
    lines = [
        START,
        "## Zoo job: every model, as it comes, in one `optimize-many`",
        "",
        f"Generated by `make bench-zoo` (`python -m benchmarks.zoo --corpus .cache/corpus{meta['args']}`) on {meta['date']}: "
        f"the {len(rows)} models of the corpus and the builders (models/zoo.py with its symbolic batch dim, sample, repvgg), "
        "each with its dynamic dims, through ONE job with the settings of "
        "[`benchmarks/zoo.toml`](../benchmarks/zoo.toml): the input shapes the dynamic inputs need, the two PaddleOCR "
        "models' `x` per model; exact passes and every other option at its default (latency gating on, 1 thread per timed session).",
        "",
        f"* Machine: {meta['machine']}; {mode} (the latency A/B of every job holds one machine-wide lock).",
        f"* Versions: {meta['versions']}.",
        f"* **Job wall time {wall:.0f} s** ({wall / 60:.1f} min, the CLI's start-up included) for {len(rows)} models: "
        f"**{len(rows) / wall * 3600:.0f} models per hour**; exit code {code}; "
        f"{counts['ok']} ok, {counts['gate-failed']} gate-failed, {counts['error']} error.",
        "",
        "| model | status | input shapes (given; defaulted) | kept | rolled back | not tried | GMACs before -> after | end-to-end speedup [95% CI] | job s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        macs = "-" if r.get("macs_before") is None else f"{r['macs_before'] / 1e9:.2f} -> {r['macs_after'] / 1e9:.2f}"
        status = r["status"] if not r.get("error") else f"{r['status']}: {r['error']}".replace("|", "/")
        lines.append(f"| {r['name']} | {status} | {_shapes(r)} | {r['kept']} | {r['rolled_back']} | {r['not_tried']} | {macs} | "
                     f"{_speedup(r)} | {r['seconds']:.1f} |")
    lines += ["", "Per-model settings, reports and outputs: `summary.json` of the job (kept as "
              "[`docs/bench_zoo.json`](bench_zoo.json), paths made relative). `kept` counts every kept rewrite (BN folds "
              "included, which onnxruntime does at load itself). This table is about the job -- every model through one "
              "command, its wall time and rate; for speedups read the tables above: here the workers share the machine's "
              "cores while one of them times, so the end-to-end intervals are wider than those `make bench` measures one "
              "model at a time.", END]
    return "\n".join(lines) + "\n"


def splice(text: str, section: str) -> str:
    """``text`` with its zoo section replaced by ``section`` (appended when it has none)."""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        return head + section.rstrip("\n") + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + section


def kept_section(text: str) -> str | None:
    """The zoo section of a bench.md text, or None (``make bench`` rewrites the file and keeps it)."""
    if START in text and END in text:
        return START + text.split(START, 1)[1].split(END, 1)[0] + END + "\n"
    return None


def _meta(args: argparse.Namespace) -> dict[str, str]:
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = [f"python {platform.python_version()}"]
    for dist in ("onnx-bottleneck", "onnxruntime", "onnx", "numpy"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} not installed")
    extra = (f" --ray-address {args.ray_address}" if args.ray_address else "") + (f" --jobs {args.jobs}" if args.jobs else "")
    return {"date": date.today().isoformat(), "machine": f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}",
            "versions": ", ".join(versions), "args": extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / ".cache" / "corpus", help="folder of the corpus models (fetched if missing)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "bench-zoo", help="builder models, the job's outputs and its log")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--ray-address", default=None, help="run the job on Ray (e.g. local; needs the ray extra)")
    parser.add_argument("--jobs", type=int, default=None, help="models at once (default: optimize-many's)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench", help="OUT.md gets the section, OUT_zoo.json the summary")
    parser.add_argument("--rerender", action="store_true", help="only render the section again from OUT_zoo.json")
    args = parser.parse_args(argv)
    md, saved = args.out.with_suffix(".md"), args.out.with_name(args.out.name + "_zoo.json")
    if args.rerender:
        summary = json.loads(saved.read_text())
        md.write_text(splice(md.read_text(), render(summary, summary["bench"]["wall_s"], summary["bench"]["exit_code"], _meta(args))))
        return 0
    args.work = args.work.resolve()
    models = [p.resolve() for p in corpus_models(args.corpus) + build_models(args.work / "models")]
    out = args.work / "out"
    code, wall = run_job(models, out, args.config.resolve(), args.ray_address, args.jobs, args.work / "job.log")
    summary_path = out / "summary.json"
    if code not in (0, 1) or not summary_path.is_file():
        print((args.work / "job.log").read_text()[-4000:], file=sys.stderr)
        return code or 2
    places = {str(out): "out", str(args.work / "models"): "models", str(args.corpus.resolve()): "corpus", str(args.corpus): "corpus", str(ROOT): "."}
    summary = json.loads(_relative(summary_path.read_text(), places))
    for row in summary["models"]:
        row.pop("host", None)  # this machine's name says nothing to a reader
    summary["bench"] = {"wall_s": round(wall, 1), "models_per_hour": round(len(summary["models"]) / wall * 3600, 1), "exit_code": code}
    md.write_text(splice(md.read_text() if md.exists() else "", render(summary, wall, code, _meta(args))))
    saved.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(summary['models'])} models in {wall:.0f} s ({len(summary['models']) / wall * 3600:.0f}/h): {summary['counts']}; wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
