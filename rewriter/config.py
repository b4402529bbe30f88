"""Config files (``--config rewriter.toml``) and pass options.

A config file is TOML. Its top-level keys are the command-line option names without the leading dashes
(``input-shape``, ``max-error``, ``threads``, ``latency = false`` for ``--no-latency``); a key given on
the command line wins over the file, the file wins over the built-in default. Each pass's keyword options
live in their own table, ``[pass-options.NAME]`` (``passes`` itself is the ``--passes`` selection, so it
cannot also be a table). Paths in the file are relative to the file's folder.

Example::

    passes = ["fold_batchnorm", "fuse_1x1_chain"]
    input-shape = ["x:1x3x224x224"]
    max-error = "cosine>=0.999"
    threads = 1                    # or several deployment profiles, the first primary:
    # profile = ["threads=1,batch=1", "threads=2,batch=8"]
    report = "build/report.json"

    [pass-options.bottleneck]
    rank-fractions = [0.25, 0.5]   # keyword arguments of the pass's constructor (dashes become underscores)

A zoo job (``optimize-many``) may also give settings per model, in ``[models."STEM-OR-GLOB"]`` tables (see
:mod:`rewriter.zoo`); ``optimize`` applies the tables that match its one model, other commands ignore them.

Errors are :class:`~rewriter.errors.InputError` (exit code 2) naming the file and the key.

:func:`load_config` and :func:`build_passes` are the library part; :func:`command_defaults` maps a
loaded config onto a command's options for the CLI (click's ``default_map``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewriter.contract import Pass
from rewriter.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

log = logging.getLogger(__name__)

#: The table of per-pass keyword options.
PASS_OPTIONS_TABLE = "pass-options"
#: The table of per-model settings of a zoo job (``[models."ppocr*"]``; read by :mod:`rewriter.zoo`).
MODELS_TABLE = "models"


@dataclass(frozen=True)
class RewriterConfig:
    """A loaded config file: option values by option name, and keyword options per pass."""

    path: Path
    options: dict[str, Any] = field(default_factory=dict)
    pass_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``[models.PATTERN]`` tables by pattern, in file order, as written (checked by :func:`rewriter.zoo.model_settings`).
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_config(path: str | os.PathLike[str]) -> RewriterConfig:
    """Parse a TOML config file. Keys are checked against a command later (:func:`command_defaults`)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: config file not found" if not p.exists() else f"{p}: config is not a regular file")
    try:
        with open(p, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{p}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read config: {exc}") from None
    pass_options: dict[str, dict[str, Any]] = {}
    raw_passes = data.pop(PASS_OPTIONS_TABLE, {})
    if not isinstance(raw_passes, dict):
        raise InputError(f"{p}: {PASS_OPTIONS_TABLE!r} must be a table of tables ([{PASS_OPTIONS_TABLE}.NAME])")
    for name, opts in raw_passes.items():
        if not isinstance(opts, dict):
            raise InputError(f"{p}: [{PASS_OPTIONS_TABLE}.{name}] must be a table of keyword options")
        pass_options[name] = {str(k).replace("-", "_"): v for k, v in opts.items()}  # keyword names
    models = data.pop(MODELS_TABLE, {})
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise InputError(f"{p}: {MODELS_TABLE!r} must be a table of tables ([{MODELS_TABLE}.\"STEM-OR-GLOB\"])")
    for key, value in data.items():
        if isinstance(value, dict):
            hint = f"; per-pass options go in [{PASS_OPTIONS_TABLE}.NAME]" if key == "passes" else ""
            raise InputError(f"{p}: unknown table [{key}]{hint}")
    return RewriterConfig(p, dict(data), pass_options, dict(models))


# -- passes with options -----------------------------------------------------------------------------
def build_passes(
    selection: str | Sequence[str] | None,
    pass_options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    available: Mapping[str, type[Pass]] | None = None,
) -> list[Pass]:
    """Pass instances for a selection (names, ``"a,b"``, or ``None`` for the exact built-ins), each built
    with its options from ``pass_options``. Options for a pass that does not exist are an error; options
    for a known pass that is not selected are ignored (logged)."""
    from rewriter.registry import available_passes, pass_class, resolve_passes

    table = dict(available) if available is not None else available_passes()
    options = {k: dict(v) for k, v in (pass_options or {}).items()}
    for name in options:
        try:
            pass_class(name, table)
        except InputError as exc:
            raise InputError(f"[{PASS_OPTIONS_TABLE}.{name}]: {exc}") from None
    selected = resolve_passes(selection, options, available=available if selection is None else table)
    chosen = {p.name for p in selected}
    for name in options:
        if name not in chosen:
            log.info("options for pass %s ignored: the pass is not selected", name)
    return selected


# -- the CLI side: a config's values as a command's defaults -----------------------------------------
def option_key(param: Any) -> str | None:
    """The config key of a click option: its first long flag without the dashes (``--max-error``)."""
    for opt in getattr(param, "opts", ()):
        if opt.startswith("--"):
            return opt[2:]
    return None


def _kind(param: Any) -> str:
    """``bool``, ``int``, ``float``, ``path`` or ``str``: from typer's type descriptor (typer >= 0.20) or
    click's parameter type (older typer)."""
    if getattr(param, "is_flag", False) or getattr(param, "is_bool_flag", False):
        return "bool"
    descriptor = getattr(param, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    if annotation is not None:
        args = getattr(annotation, "__args__", None)
        base = args[0] if getattr(annotation, "__origin__", None) in (list, tuple) and args else annotation
        if base is bool:
            return "bool"
        if base is int:
            return "int"
        if base is float:
            return "float"
        if isinstance(base, type) and issubclass(base, os.PathLike):
            return "path"
        return "str"
    name = str(getattr(getattr(param, "type", None), "name", "")).lower()
    for key, kind in (("bool", "bool"), ("integer", "int"), ("float", "float"), ("path", "path")):
        if key in name:
            return kind
    return "str"


def _bounds(param: Any) -> tuple[Any, Any]:
    lo, hi = getattr(param, "min", None), getattr(param, "max", None)
    ptype = getattr(param, "type", None)
    return (lo if lo is not None else getattr(ptype, "min", None)), (hi if hi is not None else getattr(ptype, "max", None))


def _check_value(cfg: RewriterConfig, key: str, param: Any, value: Any) -> Any:
    """Check a config value's TOML type against the option and normalise it (paths, lists)."""
    where = f"{cfg.path}: key {key!r}"
    kind = _kind(param)
    if getattr(param, "multiple", False):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise InputError(f"{where}: expected a string or a list of strings, got {value!r}")
        return [_path(cfg, v) if kind == "path" else v for v in items]
    if kind == "bool":
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
            raise InputError(f"{where}: expected {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        lo, hi = _bounds(param)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise InputError(f"{where}: {value!r} is out of range ({'>= ' + str(lo) if lo is not None else ''}{', ' if lo is not None and hi is not None else ''}{'<= ' + str(hi) if hi is not None else ''})")
        return float(value) if kind == "float" else value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # e.g. passes = ["a", "b"], max-error = ["cosine>=0.999", "top1-drop<=0.01"]
    if not isinstance(value, str):
        raise InputError(f"{where}: expected a string, got {value!r}")
    return _path(cfg, value) if kind == "path" else value


def _path(cfg: RewriterConfig, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else cfg.path.parent / p)


@dataclass(frozen=True)
class CommandDefaults:
    """What a config gives one command: click's ``default_map`` and the top-level options it sets."""

    default_map: dict[str, Any]
    global_options: dict[str, Any]


def command_defaults(
    cfg: RewriterConfig,
    command_params: Sequence[Any],
    *,
    global_params: Sequence[Any] = (),
    other_keys: set[str] | frozenset[str] = frozenset(),
    self_key: str = "config",
) -> CommandDefaults:
    """Map a config onto a command's click parameters.

    A key that is an option of this command becomes its default (the command line still wins, as click
    consults ``default_map`` only when a flag is absent); a key that is one of the top-level options
    (``quiet``, ``verbose``, ``debug``) is returned in ``global_options``; a key that is an option of
    another command only is ignored, so one file can serve ``optimize`` and ``apply``; anything else is
    an error naming the key.
    """
    mine = {k: p for p in command_params if getattr(p, "opts", None) and (k := option_key(p))}
    tops = {k: p for p in global_params if getattr(p, "opts", None) and (k := option_key(p))}
    default_map: dict[str, Any] = {}
    global_options: dict[str, Any] = {}
    for key, value in cfg.options.items():
        if key == self_key:
            raise InputError(f"{cfg.path}: key {key!r}: a config file cannot name another config file")
        if key in mine:
            default_map[mine[key].name] = _check_value(cfg, key, mine[key], value)
        elif key in tops:
            global_options[tops[key].name] = _check_value(cfg, key, tops[key], value)
        elif key in other_keys:
            log.info("%s: key %r is not an option of this command; ignored", cfg.path, key)
        else:
            near = [k for k in sorted(mine) if k.replace("-", "_") == key.replace("-", "_")]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise InputError(f"{cfg.path}: unknown key {key!r}{hint}; keys are the command's option names, e.g. 'max-error'")
    return CommandDefaults(default_map, global_options)
