"""onnxruntime sessions with stated options.

Two flavours are used everywhere:

* *reference* sessions -- graph optimizations disabled, CPU: what numerics are judged with, so that a
  rewrite is proven exact on its own, not through onnxruntime's fusions;
* *deploy* sessions -- ``ORT_ENABLE_ALL`` (the level users ship with), a fixed number of intra-op threads
  and the chosen provider: what latency is measured with, on both sides of every comparison.

Reference sessions use onnxruntime's default thread count (every core) unless a caller passes
``threads`` or runs inside :func:`reference_threads` -- what a job sharing the machine with others does.
*Evaluation* sessions (:func:`eval_session`) are deploy sessions built for throughput rather than timing:
the deploy options with the reference sessions' thread count -- for a lossy rewrite's numerics and task
metric, which are judged as deployed but need not run on one core.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import onnx

from rewriter.errors import InputError

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class RuntimeOptions:
    """How deploy sessions are built. Defaults favour stable timings: CPU, one intra-op thread."""

    provider: str = "cpu"
    threads: int = 1
    optimization: str = "all"  # all | extended | basic | disabled

    def providers(self) -> list[str]:
        import onnxruntime as ort

        if self.provider not in PROVIDERS:
            raise InputError(f"unknown provider {self.provider!r}; choose from {sorted(PROVIDERS)}")
        wanted = PROVIDERS[self.provider]
        if wanted not in ort.get_available_providers():
            raise InputError(
                f"provider {self.provider!r} is not available in this onnxruntime build "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        return [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]


def _level(name: str):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if name not in levels:
        raise InputError(f"unknown optimization level {name!r}; choose from {sorted(levels)}")
    return levels[name]


def session_options(threads: int, optimization: str, *, profile_prefix: str | None = None):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = _level(optimization)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def deploy_session_options(options: RuntimeOptions):  # type: ignore[no-untyped-def]
    """The session options of a deploy session built with ``options``."""
    return session_options(options.threads, options.optimization)


#: Models at least this big reach onnxruntime through a temporary file rather than bytes: the serialized copy is
#: freed before the session is built (a session of a 100 MB model holds about 1.7x its size; with the bytes still
#: alive the peak would be one model more), at the cost of one write.
FILE_PAYLOAD_BYTES = 32 * 2**20


class _Shared:
    """The protos a :func:`shared_payloads` block serializes once, and what each became (bytes or a file)."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.allowed: dict[int, onnx.ModelProto] = {}
        self.made: dict[int, Future[bytes | str]] = {}
        self.lock = threading.Lock()

    def get(self, model: onnx.ModelProto, *, make: bool = True) -> bytes | str | None:
        """The payload of an allowed ``model`` (serialized by the first thread to ask), else ``None``; without
        ``make``, only one already made."""
        with self.lock:
            if self.allowed.get(id(model)) is not model:
                return None
            task, mine = self.made.get(id(model)), False
            if task is None:
                if not make:
                    return None
                task, mine = Future(), True
                self.made[id(model)] = task
        if mine:
            try:
                task.set_result(_serialized(model, os.path.join(self.tmp, f"model-{id(model)}.onnx")))
            except BaseException as exc:
                task.set_exception(exc)
        if not make and (not task.done() or task.exception() is not None):
            return None
        return task.result()


def _serialized(model: onnx.ModelProto, path: str) -> bytes | str:
    """``model`` serialized: the bytes, or -- from :data:`FILE_PAYLOAD_BYTES` on -- written to ``path`` (the
    bytes freed before the session is built) and the path."""
    data = model.SerializeToString()  # (asking a big proto its ByteSize first costs as much again)
    if len(data) < FILE_PAYLOAD_BYTES:
        return data
    with open(path, "wb") as fh:
        fh.write(data)
    return path


_SHARED: ContextVar[_Shared | None] = ContextVar("rewriter_shared_payloads", default=None)


@contextmanager
def shared_payloads(*models: onnx.ModelProto) -> Iterator[None]:
    """Within this block, each of ``models`` -- and each one given to :func:`share` -- is serialized once, for
    every session built from it (a big one written to a temporary file, removed when the block ends). A run's
    original and result are built into several sessions (reference, numerics, deployed graph, timing); each
    serialization of a 100 MB model costs a fifth of a second. The protos must not be edited meanwhile: the
    versions of a run are not. Inside another such block, the outer one is used (its files last as long as it)."""
    if _SHARED.get() is not None:
        for model in models:
            share(model)
        yield
        return
    with tempfile.TemporaryDirectory(prefix="onnx-bottleneck-shared-") as tmp:
        shared = _Shared(tmp)
        token = _SHARED.set(shared)
        try:
            for model in models:
                share(model)
            yield
        finally:
            _SHARED.reset(token)


def shared_file(model: onnx.ModelProto) -> str | None:
    """The file ``model`` was written to for its sessions in the enclosing :func:`shared_payloads` block (a big
    model that was built into a session), else ``None`` -- what :func:`rewriter.io.save_model` can copy."""
    shared = _SHARED.get()
    made = shared.get(model, make=False) if shared is not None else None
    return made if isinstance(made, str) else None


def share(model: onnx.ModelProto) -> None:
    """Serialize ``model`` once for the sessions of the enclosing :func:`shared_payloads` block (none: no-op)."""
    shared = _SHARED.get()
    if shared is not None:
        with shared.lock:
            shared.allowed[id(model)] = model


@contextmanager
def payload(model: onnx.ModelProto | bytes | str) -> Iterator[bytes | str]:
    """What an ``InferenceSession`` is built from: a path or bytes as given, a shared proto's payload
    (:func:`shared_payloads`), a small proto serialized, a big one written to a temporary file (removed when
    the block ends; onnxruntime has read it by then)."""
    if not isinstance(model, onnx.ModelProto):
        yield model
        return
    shared = _SHARED.get()
    made = shared.get(model) if shared is not None else None
    if made is not None:
        yield made
        return
    with tempfile.TemporaryDirectory(prefix="onnx-bottleneck-session-") as tmp:
        yield _serialized(model, os.path.join(tmp, "model.onnx"))


_REFERENCE_THREADS: ContextVar[int] = ContextVar("rewriter_reference_threads", default=0)


@contextmanager
def reference_threads(threads: int) -> Iterator[None]:
    """Within this block (this thread or task), reference sessions built without an explicit ``threads``
    use at most ``threads`` intra-op threads (0: onnxruntime's default)."""
    token = _REFERENCE_THREADS.set(max(0, int(threads)))
    try:
        yield
    finally:
        _REFERENCE_THREADS.reset(token)


def reference_session(model: onnx.ModelProto | bytes | str, threads: int | None = None):  # type: ignore[no-untyped-def]
    """CPU session with every graph optimization disabled (``threads``: 0 is onnxruntime's default;
    ``None``, the default, takes the value set by :func:`reference_threads`, else 0)."""
    import onnxruntime as ort

    if threads is None:
        threads = _REFERENCE_THREADS.get()
    try:
        so = session_options(threads, "disabled")
        so.enable_cpu_mem_arena = False  # numerics, not timing: each run's memory goes back (no arena kept per session)
        with payload(model) as source:
            return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InputError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


_ARENA_LOCK = threading.Lock()
_arena: bool | None = None  # whether the process-wide CPU arena is registered (None: not asked yet)


def shared_cpu_arena() -> bool:
    """Register, once per process, the CPU arena every deploy session shares (``session.use_env_allocators``);
    whether there is one. A timing holds two sessions and runs them in turn: with an arena each, both keep their
    activations' peak (PP-OCRv4 det at 640x640: 266 MB for the pair); with one shared, the pair needs about one
    (158 MB), at the same speed (the arena is the same allocator; it grows by what is asked rather than to powers
    of two). It is never shrunk: it holds what the largest run needed until the process ends."""
    import onnxruntime as ort

    global _arena
    with _ARENA_LOCK:
        if _arena is None:
            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # (max, kSameAsRequested, defaults)
                _arena = True
            except Exception as exc:  # an onnxruntime without it (or one registered already by the host): own arenas
                log.info("no shared CPU arena (%s); each deploy session keeps its own", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                _arena = False
        return _arena


def deploy_session(model: onnx.ModelProto | bytes | str, options: RuntimeOptions, *, profile_prefix: str | None = None):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    try:
        so = session_options(options.threads, options.optimization, profile_prefix=profile_prefix)
        if options.provider == "cpu" and shared_cpu_arena():
            so.add_session_config_entry("session.use_env_allocators", "1")
        with payload(model) as source:
            return ort.InferenceSession(source, so, providers=options.providers())
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


def eval_session(model: onnx.ModelProto | bytes | str, options: RuntimeOptions):  # type: ignore[no-untyped-def]
    """A deploy session (``options``' provider and optimization level) with the thread count of reference
    sessions (every core, or what :func:`reference_threads` allows): numerics as deployed, computed fast."""
    from dataclasses import replace

    return deploy_session(model, replace(options, threads=_REFERENCE_THREADS.get()))


def run_feeds(session, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:  # type: ignore[no-untyped-def]
    """Outputs by name for each feed."""
    names = [o.name for o in session.get_outputs()]
    results = []
    for feed in feeds:
        values = session.run(names, dict(feed))
        results.append(dict(zip(names, values)))
    return results
