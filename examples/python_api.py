"""onnx-bottleneck from Python: optimize the sample model, read the decisions, save the report, a plan and
an HTML page, then replay the plan and check it reproduces the optimized model byte for byte.

Run it from a checkout (``models``, the sample-model builders, lives at the repository root)::

    python examples/python_api.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for models.sample

import rewriter  # noqa: E402
from models.sample import build_sample  # noqa: E402
from rewriter.gate import gate_failures  # noqa: E402
from rewriter.html_report import profile_layers, write_html  # noqa: E402
from rewriter.plan import apply_plan, plan_from_result  # noqa: E402
from rewriter.report import build_report, write_json  # noqa: E402
from rewriter.validation import TimingOptions, ValidationConfig  # noqa: E402


def main(out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "sample.onnx"
    onnx.save_model(build_sample(seed=0), str(model_path))

    # Short timing runs keep the example quick; the defaults measure longer.
    config = ValidationConfig(timing=TimingOptions(min_pairs=6, max_pairs=12, time_budget_s=1.0))
    result = rewriter.optimize(str(model_path), passes=["fuse_1x1_chain"], config=config)
    for d in result.decisions:
        latency = d.verdict.latency.ci if d.verdict is not None and d.verdict.latency is not None else "not timed"
        print(f"{'kept       ' if d.kept else 'rolled back'} {d.candidate.description}: {latency} ({d.reason})")

    failures = gate_failures(result, config)
    if failures:
        print("gate failed:", "; ".join(failures))
        return 1

    output = out_dir / "sample.opt.onnx"
    rewriter.save_model(result.model, output)
    input_sha, output_sha = rewriter.sha256_file(model_path), rewriter.sha256_file(output)
    report = build_report(
        result, input_path=str(model_path), input_sha256=input_sha, output_path=str(output), output_sha256=output_sha,
        provider="cpu", threads=1, gate=failures,
    )
    write_json(report, out_dir / "report.json")
    write_html(out_dir / "report.html", report, layers=profile_layers(result))
    plan = plan_from_result(result, input_sha256=input_sha, output_sha256=output_sha)
    plan.save(out_dir / "plan.json")

    # Replay the plan (no measuring): the same input and plan give the same bytes.
    replayed = apply_plan(model_path, plan)
    same = replayed.model.SerializeToString() == output.read_bytes()
    totals = report["totals"]
    print(f"MACs {totals['macs_before']:,} -> {totals['macs_after']:,}; end-to-end speedup "
          f"{result.final_latency.ci if result.final_latency else 'not measured'}")
    print(f"plan replayed {len(replayed.applied)} rewrite(s); identical output: {same}")
    print(f"wrote {output}, report.json, report.html and plan.json in {out_dir}")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory() as tmp:
        sys.exit(main(Path(tmp)))
