"""A model zoo's per-model settings: which options each model of an ``optimize-many`` job runs with.

The models of a zoo name their inputs differently, need different input shapes, and are judged on different
data and metrics. Two things let one job hold them all:

* ``--input-shape NAME:DIMS`` (and ``input-shape`` at the top of a config file) applies to every model that
  has an input ``NAME``; in a zoo job it is a usage error only when no model has one. (``optimize`` on one
  model keeps the strict rule: a shape for an input the model lacks is an error.)
* ``[models."PATTERN"]`` tables of the config file hold the settings of the models whose file stem or file
  name matches PATTERN, a stem or a glob (``[models."ppocr*"]``, matched case-sensitively). Their keys are
  option names, as at the top of the file (:data:`MODEL_KEYS`), and ``[models."PATTERN".pass-options.NAME]``
  tables. A table's settings win over the job's (the flags and the top-level keys), since it names the
  model; tables apply in file order, a later one winning; input shapes merge by input name. A table that
  sets ``feeds`` or ``images`` replaces the job's feed source. A shape a table gives must name an input of at
  least one model the table matches; a table that matches no model of the job is logged and skipped.

:func:`plan_models` reads each model's declared inputs (an unreadable model gets the shapes its tables
give and no others; its job then says why it cannot be loaded), checks the names, and returns per model
its options and the record of its settings that ``summary.json`` keeps (:meth:`ModelPlan.settings`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import onnx

from rewriter.config import MODELS_TABLE, PASS_OPTIONS_TABLE, RewriterConfig
from rewriter.errors import InputError
from rewriter.io import PROTOBUF_LIMIT
from rewriter.job import OptimizeOptions
from rewriter.shapes import Shape, graph_inputs, parse_input_shapes

log = logging.getLogger(__name__)

__all__ = ["MODEL_KEYS", "ModelPlan", "ModelSettings", "declared_inputs", "model_settings", "plan_for", "plan_models"]

#: The keys of a ``[models."PATTERN"]`` table: config key -> (OptimizeOptions field, kind of value).
MODEL_KEYS: dict[str, tuple[str, str]] = {
    "input-shape": ("input_shapes", "shapes"),
    "feeds": ("feeds", "paths"),
    "images": ("images", "path"),
    "image-spec": ("image_spec", "str"),
    "num-feeds": ("num_feeds", "count"),
    "seed": ("seed", "int"),
    "passes": ("passes", "list"),
    "max-error": ("max_error", "list"),
    "rtol": ("rtol", "float"),
    "atol": ("atol", "float"),
    "metric": ("metric", "metric"),
    "max-metric-drop": ("max_metric_drop", "float"),
    "min-metric": ("min_metric", "float"),
    "time-budget": ("time_budget", "float"),
    "target-speedup": ("target_speedup", "float"),
}


@dataclass(frozen=True)
class ModelSettings:
    """One ``[models."PATTERN"]`` table: the option values it sets, by :class:`OptimizeOptions` field name."""

    pattern: str
    #: Field values (input shapes and pass options apart), paths already resolved.
    values: dict[str, Any] = field(default_factory=dict)
    input_shapes: dict[str, Shape] = field(default_factory=dict)
    pass_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def matches(self, model: str | os.PathLike[str]) -> bool:
        """Whether the table is for ``model``: its file stem or its file name matches the pattern."""
        p = Path(model)
        return fnmatchcase(p.stem, self.pattern) or fnmatchcase(p.name, self.pattern)

    @property
    def label(self) -> str:
        return f'[{MODELS_TABLE}."{self.pattern}"]'


# -- reading the tables ---------------------------------------------------------------------------------
def model_settings(cfg: RewriterConfig) -> list[ModelSettings]:
    """The config's ``[models."PATTERN"]`` tables, checked, in file order (:class:`InputError` naming the
    file, the table and the key)."""
    return [_table(cfg, pattern, table) for pattern, table in cfg.models.items()]


def _table(cfg: RewriterConfig, pattern: str, table: Mapping[str, Any]) -> ModelSettings:
    where = f'{cfg.path}: [{MODELS_TABLE}."{pattern}"]'
    if not pattern.strip():
        raise InputError(f"{where}: the pattern is empty; name a file stem or a glob")
    values: dict[str, Any] = {}
    shapes: dict[str, Shape] = {}
    pass_options: dict[str, dict[str, Any]] = {}
    for key, value in table.items():
        if key == PASS_OPTIONS_TABLE:
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise InputError(f"{where}: {PASS_OPTIONS_TABLE!r} must be a table of tables ([{MODELS_TABLE}.\"{pattern}\".{PASS_OPTIONS_TABLE}.NAME])")
            pass_options = {name: {str(k).replace("-", "_"): v for k, v in opts.items()} for name, opts in value.items()}
            continue
        if key not in MODEL_KEYS:
            raise InputError(f"{where}: unknown key {key!r}; a model's table takes {', '.join(sorted(MODEL_KEYS))} "
                             f"and [{PASS_OPTIONS_TABLE}.NAME] tables")
        name, kind = MODEL_KEYS[key]
        checked = _value(cfg, f"{where}: key {key!r}", kind, value)
        if kind == "shapes":
            try:
                shapes = parse_input_shapes(checked)
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
        else:
            values[name] = checked
    return ModelSettings(pattern, values, shapes, pass_options)


def _value(cfg: RewriterConfig, where: str, kind: str, value: Any) -> Any:
    """A table value checked against its kind and normalised (paths resolved against the file's folder)."""
    if kind in ("shapes", "paths", "list"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise InputError(f"{where}: expected a string or a list of strings, got {value!r}")
        if kind == "paths":
            return tuple(_path(cfg, v) for v in items)
        return items if kind == "shapes" else ",".join(items)
    if kind in ("int", "count", "float"):
        number = (int,) if kind != "float" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            raise InputError(f"{where}: expected {'an integer' if kind != 'float' else 'a number'}, got {value!r}")
        if kind == "count" and value < 1:
            raise InputError(f"{where}: {value!r} is out of range (>= 1)")
        return float(value) if kind == "float" else value
    if not isinstance(value, str):
        raise InputError(f"{where}: expected a string, got {value!r}")
    if kind == "path":
        return _path(cfg, value)
    if kind == "metric":
        module, sep, attr = value.rpartition(":")
        return f"{_path(cfg, module)}:{attr}" if sep and module.endswith(".py") else value
    return value


def _path(cfg: RewriterConfig, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else cfg.path.parent / p)


# -- one model's options ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelPlan:
    """What one model runs with: its options, the tables that set them, and what those tables changed."""

    options: OptimizeOptions
    #: The patterns of the tables that matched the model, in the order applied.
    tables: tuple[str, ...] = ()
    #: The option values the tables set (field name -> value; input shapes apart).
    overrides: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """The summary's record: ``tables``, ``input_shapes`` (the shapes given for the model's inputs, by the
        flags, the top-level keys and its tables) and ``options`` (what its tables set)."""
        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {
            "tables": list(self.tables),
            "input_shapes": {k: list(v) for k, v in self.options.input_shapes.items()},
            "options": {k: ({n: dict(o) for n, o in v.items()} if k == "pass_options" else plain(v)) for k, v in self.overrides.items()},
        }


def plan_for(model: str | os.PathLike[str], options: OptimizeOptions, settings: Sequence[ModelSettings]) -> ModelPlan:
    """The options of one model: the job's, with every matching table applied in order (no names checked)."""
    values: dict[str, Any] = {}
    shapes = dict(options.input_shapes)
    pass_options = {k: dict(v) for k, v in options.pass_options.items()}
    tables: list[str] = []
    for s in settings:
        if not s.matches(model):
            continue
        tables.append(s.pattern)
        if "feeds" in s.values or "images" in s.values:  # a table's feed source replaces the job's
            values.update(feeds=(), images=None, image_spec=None)
        values.update(s.values)
        shapes.update(s.input_shapes)
        for name, opts in s.pass_options.items():
            pass_options[name] = {**pass_options.get(name, {}), **opts}
    if not tables:
        return ModelPlan(options)
    overrides = {k: v for k, v in values.items() if getattr(options, k) != v}
    if pass_options != options.pass_options:
        overrides["pass_options"] = pass_options
    return ModelPlan(replace(options, **values, input_shapes=shapes, pass_options=pass_options), tuple(tables), overrides)


# -- a zoo job: every model's options, the names checked ------------------------------------------------
def declared_inputs(path: str | os.PathLike[str], max_bytes: int | None = None) -> list[str] | None:
    """The names of a model file's inputs (initializers excluded), or None when it cannot be read (the
    model's own job says why)."""
    p = Path(path)
    try:
        size = p.stat().st_size if p.is_file() else 0
        if size == 0 or size > PROTOBUF_LIMIT or (max_bytes is not None and size > max_bytes):
            return None
        return [vi.name for vi in graph_inputs(onnx.ModelProto.FromString(p.read_bytes()))]
    except Exception:  # anything unreadable: its job's loader words the error
        return None


def plan_models(
    models: Sequence[str], options: OptimizeOptions, settings: Sequence[ModelSettings] = (), *, max_bytes: int | None = None,
) -> list[ModelPlan]:
    """Each model's :class:`ModelPlan`, its input shapes cut down to the inputs it has.

    A shape name no model has is a usage error (:class:`InputError`): a job-wide one when no model of the job
    has that input, a table's when none of the models the table matches has it. When a model that could hold
    the name cannot be read, it is a warning instead.
    """
    inputs = [declared_inputs(m, max_bytes) for m in models]
    _check_names("--input-shape", options.input_shapes, list(range(len(models))), inputs, f"any of the {len(models)} model(s)")
    for s in settings:
        matched = [i for i, m in enumerate(models) if s.matches(m)]
        if not matched:
            log.warning("%s matches none of the %d model(s); its settings are not used", s.label, len(models))
            continue
        _check_names(f"{s.label} input-shape", s.input_shapes, matched, inputs, f"the {len(matched)} model(s) it matches")
    plans = []
    for model, names in zip(models, inputs):
        plan = plan_for(model, options, settings)
        given = plan.options.input_shapes
        if names is None:  # unreadable: only what its own tables give
            mine = {k: v for s in settings if s.matches(model) for k, v in s.input_shapes.items()}
        else:
            mine = {k: v for k, v in given.items() if k in names}
        plans.append(replace(plan, options=replace(plan.options, input_shapes=mine)))
    return plans


def _check_names(what: str, shapes: Mapping[str, Shape], among: Sequence[int], inputs: Sequence[list[str] | None], whose: str) -> None:
    known = sorted({n for i in among for n in (inputs[i] or ())})
    unread = [i for i in among if inputs[i] is None]
    for name in shapes:
        if any(name in (inputs[i] or ()) for i in among):
            continue
        listed = known if len(known) <= 12 else known[:12] + ["..."]
        message = f"{what} names {name!r}, which is not an input of {whose} (their inputs: {listed})"
        if unread:
            log.warning("%s; %d of them could not be read", message, len(unread))
            continue
        raise InputError(message)
