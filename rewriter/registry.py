"""Which passes exist: the built-in tuple in ``passes.ALL_PASSES`` plus third-party passes registered under
the entry-point group ``onnx_bottleneck.passes`` (each entry point names a :class:`~rewriter.contract.Pass`
subclass). Nothing registers itself on import.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from rewriter.contract import Pass
from rewriter.errors import InputError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnx_bottleneck.passes"


def builtin_passes() -> tuple[type[Pass], ...]:
    from passes import ALL_PASSES  # the default pipeline wiring: the one place rewriter imports passes

    return ALL_PASSES


def plugin_passes() -> tuple[type[Pass], ...]:
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not break the tool
            log.warning("cannot load pass plugin %s (%s): %s", ep.name, ep.value, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            log.warning("pass plugin %s (%s) is not a Pass subclass; ignored", ep.name, ep.value)
            continue
        found.append(cls)
    return tuple(found)


def available_passes() -> dict[str, type[Pass]]:
    """Every known pass by name; built-ins win a name clash."""
    table: dict[str, type[Pass]] = {}
    for cls in plugin_passes() + builtin_passes():
        table[cls.name] = cls
    return table


def default_passes() -> list[Pass]:
    """The passes ``optimize`` runs with no selection: the exact built-ins, in registry order."""
    return [cls() for cls in builtin_passes() if cls.exact]


def pass_class(name: str, available: Mapping[str, type[Pass]] | None = None) -> type[Pass]:
    """The pass class registered as ``name`` (among ``available``, default: :func:`available_passes`).

    The one place a pass name is resolved: an unknown name is an :class:`InputError` listing the known ones.
    """
    table = available_passes() if available is None else available
    if name not in table:
        raise InputError(f"unknown pass {name!r}; known passes: {', '.join(sorted(table))}")
    return table[name]


def instantiate_pass(cls: type[Pass], options: Mapping[str, Any]) -> Pass:
    """``cls(**options)``, with a usage error naming the option when the pass does not take it."""
    if not options:
        return cls()
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        sig = None
    accepted = [] if sig is None else [
        n for n, prm in sig.parameters.items() if prm.kind in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY)
    ]
    takes_any = sig is not None and any(prm.kind is prm.VAR_KEYWORD for prm in sig.parameters.values())
    for key in options:
        if not takes_any and key not in accepted:
            known = f"its options: {', '.join(accepted)}" if accepted else "it takes no options"
            raise InputError(f"pass {cls.name!r} has no option {key!r} ({known})")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise InputError(f"pass {cls.name!r}: bad options {dict(options)}: {exc}") from None


def resolve_pass(
    name: str, options: Mapping[str, Any] | None = None, *, available: Mapping[str, type[Pass]] | None = None
) -> Pass:
    """The pass ``name`` built with its keyword ``options``."""
    return instantiate_pass(pass_class(name, available), options or {})


def resolve_passes(
    selection: str | Sequence[str | Pass] | None,
    pass_options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    available: Mapping[str, type[Pass]] | None = None,
) -> list[Pass]:
    """Pass instances from names (``"a,b"`` or a list), instances, or ``None`` for the exact built-ins (the
    exact ones among ``available`` when given); each named pass is built with its ``pass_options``."""
    options = pass_options or {}
    if selection is None:
        classes = [c for c in (builtin_passes() if available is None else available.values()) if c.exact]
        return [instantiate_pass(c, options.get(c.name, {})) for c in classes]
    items: Iterable[str | Pass] = (
        [s.strip() for s in selection.split(",") if s.strip()] if isinstance(selection, str) else selection
    )
    table = available
    resolved: list[type[Pass] | Pass] = []
    for item in items:
        if isinstance(item, Pass):
            resolved.append(item)
            continue
        if not item:
            continue
        if table is None:
            table = available_passes()
        resolved.append(pass_class(item, table))  # every name first, then the options
    if not resolved:
        raise InputError("no passes selected")
    return [r if isinstance(r, Pass) else instantiate_pass(r, options.get(r.name, {})) for r in resolved]
