"""Plans: the accepted rewrites of an ``optimize`` run, replayed elsewhere without measuring.

A plan is decided once (on the target hardware: ``optimize --save-plan plan.json``) and replayed
anywhere (``apply MODEL --plan plan.json -o OUT``). It records, in order, each kept decision's pass,
nodes and options (e.g. a factorization's rank), the constructor options of the passes, the resolved
input shapes and the sha256 of the input model file. Replaying finds each step among the pass's
``find()`` candidates on the current model (matched by pass, nodes and options), applies it with the
pass's ``apply`` and commits -- the same code path as ``optimize`` -- so the same input and plan give
the same bytes as the ``optimize`` output.

Lossy data-aware steps (fitted on calibration activations) need the same calibration data again: the plan
records a digest of the calibration feeds ``optimize`` fitted on, and replaying requires feeds with the
same digest (the same ``--feeds``/``--images``, ``--seed`` and ``--holdout-fraction``). Exact steps need no data.

A plan of ``optimize --precision int8`` whose int8 model was written also records the stage: the recipe, the
nodes kept float and the calibration digest; replaying quantizes the replayed structure the same way (one
``quantize_static`` call), so the same data gives the same bytes.

Plan file (JSON), version 1::

    {"plan_version": 1, "tool": "onnx-bottleneck", "tool_version": "0.2.0",
     "input_sha256": "...", "output_sha256": "..." | null,
     "input_shapes": {"x": [1, 3, 224, 224]},
     "pass_options": {"fuse_1x1_chain": {}},
     "calibration": null | {"source": "...", "count": 8, "sha256": "..."},
     "precision": null | {"recipe": {...}, "excluded": ["node", ...], "calibration": {"source": "...", "count": 8, "sha256": "..."}},
     "steps": [{"pass": "fuse_1x1_chain", "nodes": ["a", "b"], "options": {}, "description": "..."}]}

The JSON Schema is ``docs/plan.schema.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rewriter.contract import CalibrationData, Candidate, Pass, RewriteError
from rewriter.errors import InputError
from rewriter.io import sha256_file
from rewriter.model import Model
from rewriter.registry import available_passes, instantiate_pass, pass_class
from rewriter.trial import apply_candidate
from rewriter.version import __version__

log = logging.getLogger(__name__)

PLAN_VERSION = 1


@dataclass(frozen=True)
class PlanStep:
    """One accepted rewrite: which pass, on which nodes, with which knobs."""

    pass_name: str
    nodes: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def key(self) -> str:
        """Same identity as :attr:`rewriter.contract.Candidate.key`."""
        return json.dumps([self.pass_name, list(self.nodes), dict(self.options)], sort_keys=True)

    def label(self) -> str:
        opts = f" {json.dumps(dict(self.options), sort_keys=True)}" if self.options else ""
        return f"{self.pass_name} on {', '.join(self.nodes)}{opts}"


@dataclass(frozen=True)
class Plan:
    steps: tuple[PlanStep, ...]
    input_sha256: str | None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    pass_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_sha256: str | None = None
    #: The calibration feeds lossy steps were fitted on: ``{"source", "count", "sha256"}``, or ``None``.
    calibration: dict[str, Any] | None = None
    #: The int8 stage written (``--precision int8``): ``{"recipe", "excluded", "calibration"}``, or ``None`` (float).
    precision: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan_version": PLAN_VERSION,
            "tool": "onnx-bottleneck",
            "tool_version": __version__,
            "input_sha256": self.input_sha256,
            "output_sha256": self.output_sha256,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "pass_options": {k: dict(v) for k, v in self.pass_options.items()},
            "calibration": self.calibration,
            "precision": self.precision,
            "steps": [
                {"pass": s.pass_name, "nodes": list(s.nodes), "options": dict(s.options), "description": s.description}
                for s in self.steps
            ],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> Plan:
        def bad(what: str) -> InputError:
            return InputError(f"{where}: not a plan file ({what})")

        if not isinstance(data, dict):
            raise bad("not a JSON object")
        version = data.get("plan_version")
        if version != PLAN_VERSION:
            raise bad(f"plan_version {version!r}; this tool reads version {PLAN_VERSION}")
        steps_raw = data.get("steps")
        if not isinstance(steps_raw, list):
            raise bad("'steps' is not a list")
        steps = []
        for i, s in enumerate(steps_raw, 1):
            if (
                not isinstance(s, dict)
                or not isinstance(s.get("pass"), str)
                or not isinstance(s.get("nodes"), list)
                or not all(isinstance(n, str) for n in s["nodes"])
                or not isinstance(s.get("options", {}), dict)
            ):
                raise bad(f"step {i} needs 'pass' (string), 'nodes' (list of strings) and 'options' (object)")
            steps.append(PlanStep(s["pass"], tuple(s["nodes"]), dict(s.get("options", {})), str(s.get("description", ""))))
        shapes_raw = data.get("input_shapes", {})
        if not isinstance(shapes_raw, dict) or not all(
            isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in v) for v in shapes_raw.values()
        ):
            raise bad("'input_shapes' must map input names to lists of integers")
        pass_options = data.get("pass_options", {})
        if not isinstance(pass_options, dict) or not all(isinstance(v, dict) for v in pass_options.values()):
            raise bad("'pass_options' must map pass names to objects")
        sha = data.get("input_sha256")
        if sha is not None and not isinstance(sha, str):
            raise bad("'input_sha256' is not a string")
        out_sha = data.get("output_sha256")
        calibration = data.get("calibration")
        if calibration is not None and not (isinstance(calibration, dict) and isinstance(calibration.get("sha256"), str)):
            raise bad("'calibration' must be null or an object with a 'sha256'")
        precision = data.get("precision")
        if precision is not None and not (
            isinstance(precision, dict) and isinstance(precision.get("recipe"), dict)
            and isinstance(precision.get("excluded"), list) and all(isinstance(n, str) for n in precision["excluded"])
            and isinstance(precision.get("calibration"), dict) and isinstance(precision["calibration"].get("sha256"), str)
        ):
            raise bad("'precision' must be null or an object with 'recipe', 'excluded' (node names) and 'calibration' (with a 'sha256')")
        return cls(
            tuple(steps), sha, {k: tuple(v) for k, v in shapes_raw.items()}, {k: dict(v) for k, v in pass_options.items()},
            out_sha if isinstance(out_sha, str) else None, calibration, precision,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: no such plan file")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{p}: not a plan file (invalid JSON: {exc})") from None
        return cls.from_dict(data, str(p))

    def save(self, path: str | os.PathLike[str]) -> None:
        from rewriter.report import write_json

        write_json(self.to_dict(), path)


def feeds_digest(feeds: Sequence[Mapping[str, np.ndarray]]) -> str:
    """sha256 over a list of feeds (input names, dtypes, shapes and bytes, in order)."""
    digest = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            arr = np.ascontiguousarray(feed[name])
            digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            digest.update(arr.tobytes())
    return digest.hexdigest()


def _uses_calibration(feeds: Any) -> bool:
    """The pipeline hands lossy passes calibration activations only for real (not synthetic) feeds."""
    return feeds is not None and not getattr(feeds, "synthetic", False) and bool(feeds.calibration)


def plan_from_result(
    result: Any,
    *,
    input_sha256: str | None,
    pass_options: Mapping[str, Mapping[str, Any]] | None = None,
    output_sha256: str | None = None,
    feeds: Any = None,
) -> Plan:
    """The plan of an :class:`~rewriter.pipeline.OptimizeResult`: its kept decisions, in order.

    ``feeds``: the :class:`~rewriter.validation.feeds.FeedSet` the run used; recorded (as a digest) when
    a kept step is lossy and was fitted on its calibration part.
    """
    kept = [d for d in result.decisions if d.kept]
    steps = tuple(
        PlanStep(d.candidate.pass_name, tuple(d.candidate.nodes), dict(d.candidate.options), d.candidate.description)
        for d in kept
    )
    used = {s.pass_name for s in steps}
    opts = {k: dict(v) for k, v in (pass_options or {}).items() if k in used}
    calibration = None
    if any(not d.exact for d in kept) and _uses_calibration(feeds):
        calibration = {"source": feeds.source, "count": len(feeds.calibration), "sha256": feeds_digest(feeds.calibration)}
    stage = getattr(result, "precision", None)
    precision = None
    if stage is not None and stage.kept and stage.search is not None and _uses_calibration(feeds):
        precision = {"recipe": dict(stage.recipe), "excluded": list(stage.search.excluded),
                     "calibration": {"source": feeds.source, "count": len(feeds.calibration), "sha256": feeds_digest(feeds.calibration)}}
    return Plan(steps, input_sha256, dict(result.input_shapes), opts, output_sha256, calibration, precision)


@dataclass
class ApplyResult:
    """Result of :func:`apply_plan`: the rewritten model and the candidates replayed, in order."""

    model: onnx.ModelProto
    applied: list[Candidate]
    input_sha256: str
    sha256_matches: bool


def _source_sha256(source: str | os.PathLike[str] | onnx.ModelProto) -> str:
    if isinstance(source, onnx.ModelProto):
        return hashlib.sha256(source.SerializeToString()).hexdigest()
    return sha256_file(source)


def apply_plan(
    source: str | os.PathLike[str] | onnx.ModelProto,
    plan: Plan | str | os.PathLike[str],
    *,
    force: bool = False,
    available: Mapping[str, type[Pass]] | None = None,
    max_model_bytes: int | None = None,
    feeds: Any = None,
) -> ApplyResult:
    """Replay a plan on a model (path or proto), without judging; the source is not modified.

    The model's sha256 (of the file, or of the serialized proto) must match the plan's unless ``force``.
    A step whose candidate the pass no longer finds raises :class:`InputError` naming the step. A plan
    with calibrated lossy steps needs ``feeds`` (a ``FeedSet``) whose calibration part has the recorded
    digest.
    """
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    sha = _source_sha256(source)
    matches = plan.input_sha256 is None or plan.input_sha256 == sha
    if not matches:
        if not force:
            raise InputError(
                f"the model's sha256 {sha[:12]}... differs from the plan's {str(plan.input_sha256)[:12]}...: "
                "the plan was made for another model (pass --force to replay it anyway)"
            )
        log.warning("model sha256 differs from the plan's; replaying anyway (--force)")
    # A plan with no step needs no shapes either (it writes what optimize wrote: the model as given).
    model = Model.from_source(source, plan.input_shapes or None, max_bytes=max_model_bytes, defer_unresolved=not plan.steps)
    calibration = None if plan.calibration is None else _plan_calibration(model, plan.calibration, feeds, force)
    table = dict(available) if available is not None else available_passes()
    instances: dict[str, Pass] = {}
    applied: list[Candidate] = []
    for i, step in enumerate(plan.steps, 1):
        where = f"plan step {i} ({step.label()})"
        if step.pass_name not in instances:
            try:
                cls = pass_class(step.pass_name, table)
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
            instances[step.pass_name] = instantiate_pass(cls, plan.pass_options.get(step.pass_name, {}))
            if instances[step.pass_name].data_aware:
                instances[step.pass_name].use_calibration(calibration)
        p = instances[step.pass_name]
        try:
            found = [c for c in p.find(model) if isinstance(c, Candidate) and c.key == step.key]
        except Exception as exc:
            raise InputError(f"{where}: {p.name}.find raised {type(exc).__name__}: {exc}") from None
        if not found:
            raise InputError(f"{where}: the pass finds no such rewrite in this model")
        try:
            model = apply_candidate(p, model, found[0])
        except RewriteError as exc:
            raise InputError(f"{where}: cannot be applied: {exc}") from None
        applied.append(found[0])
        log.info("replayed %s", step.label())
    written = model.proto if applied else model.as_given()  # as optimize writes it
    if plan.precision is not None:
        written = _replay_precision(written, plan.precision, feeds, force)
    return ApplyResult(written, applied, sha, matches)


def _replay_precision(model: onnx.ModelProto, recorded: Mapping[str, Any], feeds: Any, force: bool) -> onnx.ModelProto:
    """The plan's int8 stage on the replayed structure: the same recipe, calibration (checked by digest) and
    nodes kept float, so the same bytes as optimize wrote."""
    from rewriter.precision.int8 import replay
    from rewriter.precision.stage import recipe_options

    cal = recorded["calibration"]
    what = f"{cal.get('count', '?')} calibration feed(s) from {cal.get('source', '?')}"
    if not _uses_calibration(feeds):
        raise InputError(f"the plan's int8 stage was calibrated on {what}; give the same data (--feeds, --images or "
                         "--data-loader-script, and --seed and --holdout-fraction)")
    if feeds_digest(feeds.calibration) != cal["sha256"]:
        if not force:
            raise InputError(f"the calibration feeds differ from the ones the plan's int8 stage was calibrated on ({what}); "
                             "give the same data, --seed and --holdout-fraction (or --force to calibrate on these)")
        log.warning("calibration feeds differ from the plan's; int8 ranges will differ (--force)")
    log.info("replaying the int8 stage: %d node(s) kept float", len(recorded["excluded"]))
    return replay(model, feeds.calibration, recorded["excluded"], recipe_options(recorded["recipe"]))



def _plan_calibration(model: Model, recorded: Mapping[str, Any], feeds: Any, force: bool) -> CalibrationData:
    """The calibration service for the plan's data-aware steps, on ``feeds`` (checked against the digest recorded)."""
    what = f"{recorded.get('count', '?')} calibration feed(s) from {recorded.get('source', '?')}"
    if not _uses_calibration(feeds):
        raise InputError(f"the plan's lossy steps were fitted on {what}; give the same data (--feeds or --images, and --seed and --holdout-fraction)")
    digest = feeds_digest(feeds.calibration)
    if digest != recorded["sha256"]:
        if not force:
            raise InputError(
                f"the calibration feeds differ from the ones the plan was fitted on ({what}); "
                "give the same data, --seed and --holdout-fraction (or --force to fit on these)"
            )
        log.warning("calibration feeds differ from the plan's; the lossy steps will fit differently (--force)")
    from rewriter.validation.calibration import Calibration

    return Calibration(model, feeds.calibration)
