"""Functions a user hands the tool by name: a task metric (``--metric``), a data loader
(``--data-loader-script``). Any failure to import one is a usage error naming the flag."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from rewriter.errors import InputError


def import_function(spec: str, flag: str, default: str | None = None) -> Callable[..., Any]:
    """The function ``module:function`` (the module may be a path to a ``.py`` file). With a ``default``
    function name, a bare ``file.py`` names that function of the file."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep and default is not None and spec.endswith(".py"):
        module_name, sep, attr = spec, ":", default
    if not sep or not module_name or not attr:
        raise InputError(f"{flag} {spec!r}: expected module:function" + (" or file.py" if default else ""))
    try:
        if module_name.endswith(".py"):
            loc = importlib.util.spec_from_file_location(f"_rewriter_user_{attr}", module_name)
            if loc is None or loc.loader is None:
                raise ImportError(module_name)
            module = importlib.util.module_from_spec(loc)
            loc.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:  # user code: any failure is a usage error
        raise InputError(f"{flag} {spec!r}: cannot import {module_name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise InputError(f"{flag} {spec!r}: {attr!r} is not a function of {module_name!r}")
    return fn
