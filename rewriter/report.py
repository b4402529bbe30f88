"""The JSON report: a view of an :class:`~rewriter.pipeline.OptimizeResult`, and its atomic file writers.

Schema version 7 (JSON Schema: ``docs/report.schema.json``; field guide: ``docs/report.md``). Top-level
keys: ``schema_version``, ``tool``, ``environment`` (tool, onnx, onnxruntime, numpy and Python versions,
provider, threads, CPU), ``input`` / ``output`` (path, sha256), ``normalized`` (the export quirks normalized
on load, one short note each), ``input_shapes``, ``input_shape_notes``
(dims taken by default: a symbolic batch dim as 1), ``budget``, ``feeds``,
``passes`` (per pass: its options, kept, rolled back, skips with reasons, whole-model latency, whether it
was undone), ``decisions`` (per candidate: pass, nodes, description, options, MACs/params before and
after, ``decision`` (``kept`` / ``rolled_back`` / ``not_tried``), ``outcome`` (the
:class:`~rewriter.outcome.Outcome` value) and ``reason``, numerics per output, latency with its 95% CI and scope, and the
end-to-end latency of its pass), ``totals`` (ops, nodes, MACs, params before/after, final numerics,
final end-to-end speedup with CI), ``holdout`` (the held-out confirmation: split sizes, the budget on the
test split before and after backing off, what was backed off; :mod:`rewriter.holdout`), ``gate`` (passed,
failures), ``pareto`` (speedup/error points of a
sweep, or null) and ``seconds``.

Changes from version 7: ``totals.numerics_feeds`` (how many validation feeds ``final_numerics`` ran on: all
of them, or -- a run of exact passes proven on its result -- the first ``exact_feeds``).
Changes from version 6: ``search`` (what bound the search: ``bound`` -- ``complete``, ``error_budget``, ``time``
or ``target`` --, counts of candidates, judged, dominated and untried by outcome, the fraction of the error
budget the result spends, the time budget); ``totals.exact_latency`` (a run of exact passes only: ``result``
when its numerics and latency were proven once on the result, or why each round was proven after all); the
latency scope ``result`` (a decision credited with that end-to-end comparison).
Changes from version 5: ``totals.same_deployed_graph`` and each pass's ``same_deployed_graph`` (onnxruntime
runs the same graph after as before: latency unchanged by construction, not timed); ``profiles`` (the deployment profiles, primary first, each with the end-to-end
speedup and CI at it; one entry without ``--profile``); each decision's ``latency_profiles`` and each pass's
``profiles`` (the comparison at every profile measured, empty with a single profile); ``environment.batch``.
Changes from version 4: ``holdout``; the outcome ``holdout`` (kept by the search, undone because the result
broke the budget on the held-out test split).
Changes from version 3: the top-level ``normalized`` list and ``input_shape_notes``.

Changes from version 2: decisions carry ``outcome``; candidates never tried are ``decision: not_tried``
(no longer ``rolled_back``) and are counted in ``not_tried`` of their pass and of the totals.

Changes from version 1: ``gate`` and ``pareto`` are part of the report; every decision has the same
keys (``decision``, ``numerics``, ``latency``, ``end_to_end``, ``metric``, ``seconds``; empty or null
when not measured); passes carry their ``options``.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rewriter.io import check_destination, write_atomically
from rewriter.pipeline import Decision, OptimizeResult, PassRun
from rewriter.validation.deployment import DeploymentProfile
from rewriter.validation.latency import LatencyComparison
from rewriter.version import __version__

SCHEMA_VERSION = 8


@dataclass(frozen=True)
class ParetoPoint:
    """One point of a speedup-vs-error sweep (e.g. one rank of a factorization)."""

    speedup: float
    error: float
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"speedup": self.speedup, "error": self.error, "label": self.label}


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

    return {
        "tool_version": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "provider": provider,
        "threads": threads,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
    }


def _latency(lat: LatencyComparison | None, scope: str | None = None) -> dict[str, Any] | None:
    if lat is None:
        return None
    return {"scope": scope, **lat.to_dict()}


def decision_dict(d: Decision, run: PassRun | None = None) -> dict[str, Any]:
    """One candidate's record; every decision has the same keys (null or empty when not measured)."""
    c = d.candidate
    v = d.verdict
    return {
        "pass": c.pass_name,
        "exact": d.exact,
        "nodes": list(c.nodes),
        "description": c.description,
        "options": dict(c.options),
        "cost": asdict(c.cost),
        "kept": d.kept,
        "decision": d.outcome.kind,
        "outcome": d.outcome.value,
        "reason": d.reason,
        "numerics": {} if v is None else {k: s.to_dict() for k, s in v.numerics.items()},
        "latency": None if v is None else _latency(v.latency, v.latency_scope),
        "latency_profiles": [] if v is None else [p.to_dict() for p in v.profiles],
        "end_to_end": None if run is None else _latency(run.model_latency, "model"),
        "metric": None if v is None else v.metric,
        "seconds": 0.0 if v is None else round(v.seconds, 4),
        "screening": None if d.screening is None else d.screening.to_dict(),
        "superseded": d.superseded,
    }


def profiles_dict(result: OptimizeResult, threads: int, batch: int,
                  profiles: Sequence[DeploymentProfile] | None = None) -> list[dict[str, Any]]:
    """Each deployment profile of the run (``profiles``; default: the one of ``threads`` and ``batch``), primary
    first, with the end-to-end comparison at it (``latency`` null where not measured: nothing kept, or no latency)."""
    listed = list(profiles) if profiles else [DeploymentProfile(threads, batch)]
    measured = {p.profile: p.latency for p in result.profile_latency}
    if not measured and result.final_latency is not None:
        measured[listed[0]] = result.final_latency
    return [{**p.to_dict(), "primary": i == 0, "latency": _latency(measured.get(p), "model")} for i, p in enumerate(listed)]


def _pass_of_each_decision(result: OptimizeResult) -> list[PassRun | None]:
    """The run of the pass each decision belongs to: decisions are recorded pass by pass, in order, and
    each run counts its own (kept + rolled back + not tried)."""
    owners: list[PassRun | None] = []
    for run in result.passes:
        owners.extend([run] * (run.kept + run.rolled_back + run.not_tried))
    owners = owners[: len(result.decisions)] + [None] * (len(result.decisions) - len(owners))
    return [r if r is not None and r.name == d.candidate.pass_name else None for r, d in zip(owners, result.decisions)]


def build_report(
    result: OptimizeResult,
    *,
    input_path: str | None,
    input_sha256: str | None,
    output_path: str | None,
    output_sha256: str | None,
    provider: str,
    threads: int,
    batch: int = 1,
    profiles: Sequence[DeploymentProfile] | None = None,
    gate: Sequence[str] | None = None,
    pass_options: Mapping[str, Mapping[str, Any]] | None = None,
    pareto: Sequence[ParetoPoint] | None = None,
    input_shape_notes: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The report as a JSON-ready dict (schema version 7). ``gate``: the final gate's failures;
    ``input_shape_notes``: :func:`rewriter.shapes.input_shape_notes` of the run's model."""
    before, after = result.before, result.after
    options = pass_options or {}
    owners = _pass_of_each_decision(result)
    failures = list(gate or [])
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "onnx-bottleneck",
        "environment": {**environment(provider, threads), "batch": batch},
        "input": {"path": input_path, "sha256": input_sha256},
        "output": {"path": output_path, "sha256": output_sha256},
        "normalized": list(result.normalized),
        "input_shapes": {k: list(v) for k, v in result.input_shapes.items()},
        "input_shape_notes": [dict(n) for n in input_shape_notes],
        "budget": result.budget,
        "target_speedup": None if result.target_speedup is None else {"speedup": result.target_speedup, "reached": result.target_reached},
        "feeds": result.feeds,
        "passes": [
            {
                "name": r.name,
                "exact": r.exact,
                "options": dict(options.get(r.name, {})),
                "kept": r.kept,
                "rolled_back": r.rolled_back,
                "not_tried": r.not_tried,
                "reverted": r.reverted,
                "same_deployed_graph": r.same_deployed,
                "model_latency": _latency(r.model_latency, "model"),
                "profiles": [p.to_dict() for p in r.profile_latency],
                "skips": [{"nodes": list(s.nodes), "reason": s.reason} for s in r.skips],
            }
            for r in result.passes
        ],
        "decisions": [decision_dict(d, run) for d, run in zip(result.decisions, owners)],
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
            "rolled_back": len(result.rolled_back),
            "not_tried": len(result.not_tried),
            "final_numerics": {k: v.to_dict() for k, v in result.final_numerics.items()},
            "final_latency": _latency(result.final_latency, "model"),
            "same_deployed_graph": result.same_deployed,
            "exact_latency": result.exact_latency,
            "numerics_feeds": result.numerics_feeds,
        },
        "search": None if result.search is None else result.search.to_dict(),
        "profiles": profiles_dict(result, threads, batch, profiles),
        "holdout": None if result.holdout is None else result.holdout.to_dict(),
        "precision": None if result.precision is None else result.precision.to_dict(),
        "gate": {"passed": not failures, "failures": failures},
        "pareto": None if pareto is None else [p.to_dict() for p in pareto],
        "seconds": round(result.seconds, 3),
    }


def check_output_paths(*paths: str | os.PathLike[str] | None) -> None:
    """Fail early (before any work) when an output file's folder is missing or the path is a folder."""
    for path in paths:
        if path is not None:
            check_destination(path)


def write_json(data: Any, path: str | os.PathLike[str]) -> None:
    """Write JSON atomically (:func:`rewriter.io.write_atomically`: temp file in the same folder, then ``os.replace``)."""

    def write(fh: Any) -> None:
        json.dump(data, fh, indent=2, sort_keys=False, allow_nan=False, default=_json_default)
        fh.write("\n")

    write_atomically(path, write, text=True)


def write_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write a UTF-8 text file atomically."""
    write_atomically(path, lambda fh: fh.write(text), text=True)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
