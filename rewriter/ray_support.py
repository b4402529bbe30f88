"""Ray, imported only when asked for: the optional extra ``onnx-bottleneck[ray]``.

:func:`connect` joins the cluster at an address (``auto``: the one ``ray start`` runs on this machine;
``ray://HOST:10001``; ``local``: a new one-machine cluster) unless this process is already connected, in
which case that connection is used as it is. Errors are :class:`~rewriter.errors.InputError` (exit 2).
"""

from __future__ import annotations

import logging
from typing import Any

from rewriter.errors import InputError

log = logging.getLogger(__name__)

RAY_MISSING = "Ray is not installed: pip install 'onnx-bottleneck[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or :class:`InputError` with the install hint."""
    try:
        import ray
    except ImportError:
        raise InputError(RAY_MISSING) from None
    return ray


def connect(address: str | None) -> tuple[Any, bool]:
    """``(ray, started)``: ``started`` is true when this call made the connection (the caller may then
    ``ray.shutdown()`` when done); an existing connection is reused whatever ``address`` says."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except Exception as exc:  # ConnectionError, ValueError, RuntimeError, ... depending on the address
        text = str(exc).strip().splitlines()
        raise InputError(f"cannot connect to the Ray cluster at {address!r}: {text[0] if text else type(exc).__name__}") from None
    log.info("connected to the Ray cluster at %s (%s CPUs)", address, ray.cluster_resources().get("CPU", 0))
    return ray, True


def cluster_cpus(ray: Any) -> int:
    """CPUs of the whole cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
