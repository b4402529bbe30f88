"""What ``optimize-many`` returns and writes as ``summary.json``: one :class:`ModelResult` per input model,
the :class:`FleetResult` of the run, and the summary document (rewritten after every finished job, so a
run that is stopped leaves the models done so far on record)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rewriter.job import OptimizeOptions
from rewriter.version import __version__

SUMMARY_VERSION = 3  # 2: per-model not_tried; 3: per-model settings
OK, GATE_FAILED, ERROR = "ok", "gate-failed", "error"


@dataclass(frozen=True)
class ModelResult:
    """What happened to one input model."""

    input: str
    #: The stem of its output files in the output folder.
    name: str
    #: ``ok``, ``gate-failed`` (judged, but the final gate refused the output) or ``error``.
    status: str
    error: str | None = None
    output: str | None = None
    output_sha256: str | None = None
    report: str | None = None
    plan: str | None = None
    kept: int = 0
    rolled_back: int = 0
    #: Candidates never judged (out of time, target reached, ...).
    not_tried: int = 0
    #: End-to-end speedup of the output over the input and its 95% CI (when latency was measured).
    speedup: float | None = None
    speedup_ci: tuple[float, float] | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    seconds: float = 0.0
    #: The machine the job ran on.
    host: str | None = None
    #: Which settings the model ran with (:meth:`rewriter.zoo.ModelPlan.settings`): ``tables`` (the patterns of
    #: the config's ``[models."PATTERN"]`` tables that matched it), ``input_shapes`` (the shapes given for its
    #: inputs), ``options`` (the values its tables set) and ``input_shape_notes`` (dims taken by default, from
    #: its report).
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["speedup_ci"] = None if self.speedup_ci is None else list(self.speedup_ci)
        data["seconds"] = round(self.seconds, 3)
        return data


@dataclass
class FleetResult:
    """Every model's result, in input order, and where the summary was written."""

    models: list[ModelResult]
    out_dir: Path
    summary: Path
    mode: str
    workers: int
    seconds: float
    options: OptimizeOptions = field(default_factory=OptimizeOptions)

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.models)

    @property
    def failed(self) -> list[ModelResult]:
        return [m for m in self.models if not m.ok]

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def counts(self) -> dict[str, int]:
        return {s: sum(m.status == s for m in self.models) for s in (OK, GATE_FAILED, ERROR)} | {"total": len(self.models)}

    def to_dict(self) -> dict[str, Any]:
        return summary(self.models, self.out_dir, self.mode, self.workers, self.options, self.seconds, complete=True)


def summary(
    models: Sequence[ModelResult | None], out_dir: Path, mode: str, workers: int, options: OptimizeOptions,
    seconds: float, *, complete: bool, inputs: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``summary.json`` document; ``complete=False`` while jobs are running (pending models listed by input)."""
    rows = [m.to_dict() if m is not None else {"input": inputs[i], "status": "pending"} for i, m in enumerate(models)]
    done = [m for m in models if m is not None]
    counts = {s: sum(m.status == s for m in done) for s in (OK, GATE_FAILED, ERROR)}
    return {
        "summary_version": SUMMARY_VERSION,
        "tool": "onnx-bottleneck",
        "tool_version": __version__,
        "complete": complete,
        "mode": mode,
        "workers": workers,
        "out_dir": str(out_dir),
        "options": options.to_dict(),
        "counts": counts | {"pending": len(models) - len(done), "total": len(models)},
        "exit_code": (0 if all(m.ok for m in done) else 1) if complete else None,
        "seconds": round(seconds, 3),
        "models": rows,
    }


def write_summary(path: Path, results: Sequence[ModelResult | None], out_dir: Path, mode: str, workers: int,
                  options: OptimizeOptions, seconds: float, *, complete: bool, inputs: Sequence[str]) -> None:
    """Write the summary document atomically (``results`` in input order, ``None`` for a pending model)."""
    from rewriter.report import write_json

    write_json(summary(results, out_dir, mode, workers, options, seconds, complete=complete, inputs=inputs), path)
