"""Which passes exist: the built-in tuple in ``passes.ALL_PASSES`` plus third-party passes registered under
the entry-point group ``onnx_rewriter.passes`` (each entry point names a :class:`~rewriter.contract.Pass`
subclass). Nothing registers itself on import.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from importlib.metadata import entry_points

from rewriter.contract import Pass
from rewriter.errors import InputError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnx_rewriter.passes"


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


def resolve_passes(selection: str | Sequence[str | Pass] | None) -> list[Pass]:
    """Pass instances from names (``"a,b"`` or a list), instances, or ``None`` for the defaults."""
    if selection is None:
        return default_passes()
    items: Iterable[str | Pass] = (
        [s.strip() for s in selection.split(",") if s.strip()] if isinstance(selection, str) else selection
    )
    table = None
    out: list[Pass] = []
    for item in items:
        if isinstance(item, Pass):
            out.append(item)
            continue
        if table is None:
            table = available_passes()
        if item not in table:
            raise InputError(f"unknown pass {item!r}; known passes: {', '.join(sorted(table))}")
        out.append(table[item]())
    if not out:
        raise InputError("no passes selected")
    return out
