"""The JSON report: a view of an :class:`~rewriter.pipeline.OptimizeResult`.

Schema version 1 (top-level keys): ``schema_version``, ``tool``, ``environment`` (onnxruntime version,
provider, threads, CPU), ``input`` / ``output`` (path, sha256), ``input_shapes``, ``budget``, ``feeds``,
``passes`` (per pass: kept, rolled back, skips with reasons, whole-model latency), ``decisions`` (per
candidate: pass, nodes, description, MACs/params before and after, kept, reason, numerics per output,
latency with its 95% CI and scope), ``totals`` (ops, MACs, params before/after, final numerics, final
end-to-end speedup with CI) and ``seconds``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rewriter.pipeline import Decision, OptimizeResult

SCHEMA_VERSION = 1


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(provider: str, threads: int) -> dict[str, Any]:
    import numpy
    import onnx
    import onnxruntime

    from rewriter import __version__

    return {
        "tool_version": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "provider": provider,
        "threads": threads,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
    }


def decision_dict(d: Decision) -> dict[str, Any]:
    c = d.candidate
    out: dict[str, Any] = {
        "pass": c.pass_name,
        "exact": d.exact,
        "nodes": list(c.nodes),
        "description": c.description,
        "options": dict(c.options),
        "cost": asdict(c.cost),
        "kept": d.kept,
        "reason": d.reason,
    }
    if d.verdict is not None:
        out.update(d.verdict.to_dict())
        out.pop("keep", None)
        out.pop("reason", None)
        out["reason"] = d.reason
    return out


def build_report(
    result: OptimizeResult,
    *,
    input_path: str | None,
    input_sha256: str | None,
    output_path: str | None,
    output_sha256: str | None,
    provider: str,
    threads: int,
) -> dict[str, Any]:
    before, after = result.before, result.after
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "onnx-rewriter",
        "environment": environment(provider, threads),
        "input": {"path": input_path, "sha256": input_sha256},
        "output": {"path": output_path, "sha256": output_sha256},
        "input_shapes": {k: list(v) for k, v in result.input_shapes.items()},
        "budget": result.budget,
        "feeds": result.feeds,
        "passes": [
            {
                "name": r.name,
                "exact": r.exact,
                "kept": r.kept,
                "rolled_back": r.rolled_back,
                "reverted": r.reverted,
                "model_latency": None if r.model_latency is None else r.model_latency.to_dict(),
                "skips": [{"nodes": list(s.nodes), "reason": s.reason} for s in r.skips],
            }
            for r in result.passes
        ],
        "decisions": [decision_dict(d) for d in result.decisions],
        "totals": {
            "ops_before": before.histogram,
            "ops_after": after.histogram,
            "nodes_before": sum(before.histogram.values()),
            "nodes_after": sum(after.histogram.values()),
            "macs_before": before.total_macs,
            "macs_after": after.total_macs,
            "params_before": before.total_params,
            "params_after": after.total_params,
            "kept": len(result.kept),
            "rolled_back": len(result.decisions) - len(result.kept),
            "final_numerics": {k: v.to_dict() for k, v in result.final_numerics.items()},
            "final_latency": None if result.final_latency is None else result.final_latency.to_dict(),
        },
        "seconds": round(result.seconds, 3),
    }


def write_json(data: Any, path: str | os.PathLike[str]) -> None:
    """Write JSON atomically (temp file in the same folder, then ``os.replace``)."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False, allow_nan=False, default=_json_default)
            fh.write("\n")
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
