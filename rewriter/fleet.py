"""Many models, one guarded optimization each (``onnx-bottleneck optimize-many``).

Each model is one *job*: the same :func:`~rewriter.job.optimize_model` that ``optimize`` runs, in a
worker -- a process of a local pool (spawned, ``jobs`` of them, by default one per core), or a Ray task
that requests ``cpus_per_job`` whole CPUs of one node (by default the timing thread count). Jobs write
nothing themselves: each returns its optimized model, report and plan to the driver, which writes them
atomically into the output folder (``<stem>.onnx``, ``<stem>.report.json``, ``<stem>.plan.json``; a stem
met again gets ``-2``, ``-3``, ... in input order) and keeps ``summary.json`` up to date after every
job. Inputs are never modified; with Ray, the driver reads each model (and its external data files) and
ships the bytes, so workers need no shared storage for models.

Measuring: the numerics of a job (and any fitting) run in parallel with other jobs, each capped at its
share of the cores; latency A/B measurements are serialized per machine by a file lock
(:class:`MachineLock`, held around every :func:`~rewriter.validation.latency.time_pairs` call), so no two
jobs on one machine time at once. A job's A/B always runs inside that job, on one node.

A model that cannot be loaded, fails its gate, or crashes its worker is recorded in the summary with its
error; the others go on. :attr:`FleetResult.exit_code` is 0 when every model is ``ok``, else 1.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from rewriter.errors import InputError
from rewriter.fleet_results import ERROR, GATE_FAILED, OK, FleetResult, ModelResult, write_summary
from rewriter.job import OptimizeOptions
from rewriter.plan import Plan
from rewriter.validation.locks import MachineLock
from rewriter.zoo import ModelPlan, ModelSettings, plan_models

log = logging.getLogger(__name__)

__all__ = ["ERROR", "GATE_FAILED", "OK", "FleetResult", "ModelResult", "optimize_many", "output_names", "run_job"]

#: Environment variables that size BLAS/OpenMP thread pools in local workers (set only when unset).
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# -- one job (runs in a worker) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    index: int
    #: The model path as given (what reports and the summary show).
    input: str
    name: str
    output: str
    #: The model path (local pool) or its files by path relative to its folder, model first (Ray).
    source: str | dict[str, bytes]
    options: OptimizeOptions
    plan: bool
    #: Intra-op threads of the job's reference (numerics) sessions.
    threads: int
    log_level: int
    lock_path: str | None = None
    #: The record of the model's settings for the summary (:meth:`rewriter.zoo.ModelPlan.settings`).
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Return:
    status: str
    error: str | None = None
    report: dict[str, Any] | None = None
    #: The optimized model: its serialized skeleton and the tensor bytes taken out of it (any size).
    model: tuple[bytes, list[tuple[int, bytes]]] | None = None
    plan: Plan | None = None
    kept: int = 0
    rolled_back: int = 0
    not_tried: int = 0
    speedup: float | None = None
    speedup_ci: tuple[float, float] | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    seconds: float = 0.0
    host: str | None = None


def _pack(model: onnx.ModelProto) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Take the tensors' bytes out (in place), so that the rest serializes under protobuf's 2 GiB limit:
    the skeleton and ``(position, bytes)`` of each tensor, positions in :func:`~rewriter.io.iter_tensors` order."""
    from rewriter.io import iter_tensors

    blobs = []
    for i, tensor in enumerate(iter_tensors(model.graph)):
        if tensor.HasField("raw_data") and tensor.raw_data:
            blobs.append((i, tensor.raw_data))
            tensor.ClearField("raw_data")
    return model.SerializeToString(), blobs


def _unpack(packed: tuple[bytes, list[tuple[int, bytes]]]) -> onnx.ModelProto:
    """The model :func:`_pack` took apart, field for field."""
    from rewriter.io import iter_tensors

    skeleton, blobs = packed
    model = onnx.ModelProto.FromString(skeleton)
    by_position = dict(blobs)
    for i, tensor in enumerate(iter_tensors(model.graph)):
        if i in by_position:
            tensor.raw_data = by_position.pop(i)
    if by_position:
        raise ValueError("packed model: tensor bytes without a tensor")
    return model


@contextmanager
def _job_logging(level: int, label: str) -> Iterator[None]:
    """The driver's log level in this worker, each line naming the model."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("onnx-bottleneck: " + label.replace("%", "%%") + ": %(message)s"))
    loggers = [logging.getLogger("rewriter"), logging.getLogger("passes")]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(level)
        lg.propagate = False
    try:
        yield
    finally:
        for lg, lvl, prop in saved:
            lg.removeHandler(handler)
            lg.setLevel(lvl)
            lg.propagate = prop


def _materialize(files: Mapping[str, bytes], folder: Path) -> Path:
    """Write a shipped model's files into ``folder``; the model (first entry) path."""
    first: Path | None = None
    for rel, data in files.items():
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise InputError(f"shipped file name {rel!r} leaves the model's folder")
        target = folder.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        first = first or target
    if first is None:
        raise InputError("no model file was shipped")
    return first


def run_job(job: _Job) -> _Return:
    """One model's guarded optimization, in a worker; never raises (errors are in the return)."""
    from rewriter.errors import RewriterError
    from rewriter.job import optimize_model
    from rewriter.validation.latency import timing_lock
    from rewriter.validation.runtime import reference_threads

    start = time.perf_counter()
    host = socket.gethostname()
    scratch: Path | None = None
    try:
        with _job_logging(job.log_level, job.input), timing_lock(MachineLock(job.lock_path)), reference_threads(job.threads):
            if isinstance(job.source, str):
                src = Path(job.source)
            else:
                scratch = Path(tempfile.mkdtemp(prefix="onnx-bottleneck-job-"))
                src = _materialize(job.source, scratch)
            try:
                outcome = optimize_model(src, job.options)
            except RewriterError as exc:
                return _Return(ERROR, _local_paths(str(exc), src, job), seconds=time.perf_counter() - start, host=host)
            result = outcome.result
            lat = result.final_latency
            ret = _Return(
                OK if not outcome.gate else GATE_FAILED,
                None if not outcome.gate else "gate failed, no output written: " + "; ".join(outcome.gate),
                report=outcome.report(job.input, job.output, None),
                plan=outcome.plan(None) if job.plan and not outcome.gate else None,
                kept=len(result.kept),
                rolled_back=len(result.rolled_back),
                not_tried=len(result.not_tried),
                speedup=None if lat is None else lat.ci.speedup,
                speedup_ci=None if lat is None else (lat.ci.low, lat.ci.high),
                macs_before=result.before.total_macs,
                macs_after=result.after.total_macs,
                host=host,
            )
            if not outcome.gate:
                ret.model = _pack(result.model)
            ret.seconds = time.perf_counter() - start
            return ret
    except Exception as exc:  # a crash in one job is that model's error, never the run's
        text = str(exc).strip().splitlines()
        message = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
        log.debug("job %s failed", job.input, exc_info=True)
        return _Return(ERROR, message, seconds=time.perf_counter() - start, host=host)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _local_paths(message: str, src: Path, job: _Job) -> str:
    """An error message with a shipped copy's paths turned back into the input's."""
    if isinstance(job.source, str):
        return message
    original = Path(job.input)
    return message.replace(str(src), job.input).replace(str(src.parent), str(original.parent))


# -- the driver --------------------------------------------------------------------------------------------
def output_names(models: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Output stems: each model's file stem; a stem met again (case-insensitively) gets ``-2``, ``-3``, ...
    in input order, skipping any name already taken."""
    stems = [Path(m).stem or "model" for m in models]
    names: list[str | None] = [None] * len(stems)
    taken: set[str] = set()
    for i, stem in enumerate(stems):
        if stem.casefold() not in taken:
            names[i] = stem
            taken.add(stem.casefold())
    for i, stem in enumerate(stems):
        if names[i] is None:
            k = 2
            while f"{stem}-{k}".casefold() in taken:
                k += 1
            names[i] = f"{stem}-{k}"
            taken.add(f"{stem}-{k}".casefold())
    return [n for n in names if n is not None]


def _outputs(out_dir: Path, name: str) -> dict[str, Path]:
    return {"model": out_dir / f"{name}.onnx", "data": out_dir / f"{name}.onnx.data",
            "report": out_dir / f"{name}.report.json", "plan": out_dir / f"{name}.plan.json"}


def _check_inputs_spared(models: Sequence[str], names: Sequence[str], out_dir: Path) -> None:
    """Refuse to start when an output would replace an input model or one of its data files."""
    from rewriter.io import input_files

    targets = [out_dir / "summary.json"] + [p for n in names for p in _outputs(out_dir, n).values()]
    existing = [t for t in targets if t.exists() and not t.is_symlink()]  # a symlink is replaced, not written through
    if not existing:
        return
    inputs: list[Path] = []
    for m in models:
        p = Path(m)
        if not p.is_file():
            continue
        inputs.append(p)
        try:
            inputs += input_files(p)[1:]
        except InputError:
            pass
    for target in existing:
        for source in inputs:
            if os.path.samefile(target, source):
                raise InputError(f"{target} would overwrite the input {source}; choose another --out-dir")


def _absolute(options: OptimizeOptions) -> OptimizeOptions:
    """Paths in the options made absolute: a worker may run in another folder."""

    def absolute(p: str) -> str:
        return str(Path(p).expanduser().resolve())

    metric = options.metric
    if metric is not None:
        module, sep, attr = metric.rpartition(":")
        if sep and module.endswith(".py"):
            metric = f"{absolute(module)}:{attr}"
    return replace(
        options,
        feeds=tuple(absolute(f) for f in options.feeds),
        images=None if options.images is None else absolute(options.images),
        metric=metric,
    )


def _precheck(path: str) -> str | None:
    """The one-line error of a model path that is not a file (as the loader would word it), or None."""
    p = Path(path)
    if not p.exists():
        return f"{path}: no such file"
    if p.is_dir():
        return f"{path}: is a directory, not an ONNX model file"
    return None


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def optimize_many(
    models: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    options: OptimizeOptions | None = None,
    *,
    jobs: int | None = None,
    ray_address: str | None = None,
    cpus_per_job: int | None = None,
    save_plans: bool = False,
    on_result: Callable[[ModelResult], None] | None = None,
    per_model: Sequence[ModelSettings] = (),
) -> FleetResult:
    """One guarded optimization per model, outputs and ``summary.json`` in ``out_dir``.

    Each model runs with ``options`` and the ``per_model`` settings that match it (:mod:`rewriter.zoo`):
    an input shape applies to the models that have that input (naming an input no model has is a usage
    error); a ``[models."PATTERN"]`` table's settings win over ``options`` for the models it matches.

    Local by default: a pool of ``jobs`` spawned processes (default: one per core). With ``ray_address``
    (``auto``, ``ray://HOST:10001``, ``local``), each model is a Ray task requesting ``cpus_per_job``
    CPUs (default: the most threads of ``options``' deployment profiles), at most ``jobs`` in flight (default: twice the cluster's slots).
    Usage errors (bad options, ``out_dir`` a file, Ray missing) raise :class:`InputError` before any job
    starts; a model's own failure is in its :class:`ModelResult`. ``on_result`` is called in the calling
    process as each model finishes.
    """
    start = time.perf_counter()
    options = options or OptimizeOptions()
    if jobs is not None and jobs < 1:
        raise InputError("--jobs must be at least 1")
    if cpus_per_job is not None and cpus_per_job < 1:
        raise InputError("--cpus-per-job must be at least 1")
    if not models:
        raise InputError("no models given")
    if ray_address is not None:
        from rewriter.ray_support import import_ray

        import_ray()
    options.check()
    options.build_passes()  # unknown passes or pass options: a usage error, before any job starts
    config = options.validation_config()  # the budget and the metric
    if ray_address is None and options.latency:
        config.runtime.providers()  # (Ray nodes may have providers this machine lacks)
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: --out-dir is not a directory")
    inputs = [str(m) for m in models]
    plans = _check_plans(inputs, plan_models(inputs, options, per_model, max_bytes=options.max_model_bytes))
    plans = [replace(p, options=_absolute(p.options)) for p in plans]
    options = _absolute(options)
    names = output_names(inputs)
    _check_inputs_spared(inputs, names, folder)
    if ray_address is None:
        return _run_fleet(inputs, names, folder, options, plans, None, jobs, cpus_per_job, save_plans, on_result, start)
    from rewriter.ray_support import connect

    ray, started = connect(ray_address)
    try:
        return _run_fleet(inputs, names, folder, options, plans, ray, jobs, cpus_per_job, save_plans, on_result, start)
    finally:
        if started:
            ray.shutdown()


def _check_plans(inputs: Sequence[str], plans: list[ModelPlan]) -> list[ModelPlan]:
    """The usage errors of the options a model's tables changed, naming the model, before any job starts."""
    for model, plan in zip(inputs, plans):
        if not plan.overrides:
            continue
        try:
            plan.options.check()
            plan.options.build_passes()
            plan.options.validation_config()
        except InputError as exc:
            raise InputError(f"{model} (settings of {', '.join(plan.tables)}): {exc}") from None
    return plans


def _run_fleet(
    inputs: Sequence[str], names: Sequence[str], folder: Path, options: OptimizeOptions, plans: Sequence[ModelPlan], ray: Any,
    jobs: int | None, cpus_per_job: int | None, save_plans: bool, on_result: Callable[[ModelResult], None] | None, start: float,
) -> FleetResult:
    """Run the checked jobs (locally when ``ray`` is None) and write every output and the summary."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot create the output folder: {exc.strerror or exc}") from None
    results: list[ModelResult | None] = [None] * len(inputs)
    mode = "local" if ray is None else "ray"
    summary_path = folder / "summary.json"
    problems = [_precheck(p) for p in inputs]
    runnable = sum(p is None for p in problems)
    if ray is None:
        workers = max(1, min(jobs or _cores(), runnable or 1))
        threads = max(1, _cores() // workers)
    else:
        from rewriter.ray_support import cluster_cpus

        threads = cpus_per_job or max(p.threads for p in options.deployments())
        workers = jobs or max(1, 2 * (cluster_cpus(ray) // threads))

    def done(job: _Job, ret: _Return) -> None:
        res = _finish(job, ret, folder)
        results[job.index] = res
        finished = sum(r is not None for r in results)
        log.info("[%d/%d] %s: %s%s", finished, len(results), job.input, res.status, f" ({res.error})" if res.error else "")
        write_summary(summary_path, results, folder, mode, workers, options, time.perf_counter() - start, complete=False, inputs=inputs)
        if on_result is not None:
            on_result(res)

    level = logging.getLogger("rewriter").getEffectiveLevel()
    todo: list[_Job] = []
    for i, (path, name, problem) in enumerate(zip(inputs, names, problems)):
        job = _Job(i, path, name, str(_outputs(folder, name)["model"]), path, plans[i].options, save_plans, threads, level,
                   settings=plans[i].settings())
        if problem is not None:
            done(job, _Return(ERROR, problem))
        else:
            todo.append(job)
    write_summary(summary_path, results, folder, mode, workers, options, time.perf_counter() - start, complete=False, inputs=inputs)
    if ray is None:
        _run_local(todo, workers, threads, done)
    else:
        _run_ray(ray, todo, threads, workers, done)
    final = [r for r in results if r is not None]
    seconds = time.perf_counter() - start
    write_summary(summary_path, results, folder, mode, workers, options, seconds, complete=True, inputs=inputs)
    return FleetResult(final, folder, summary_path, mode, workers, seconds, options)


def _finish(job: _Job, ret: _Return, out_dir: Path) -> ModelResult:
    """Write a finished job's files (model, plan, report) atomically; its :class:`ModelResult`."""
    from rewriter.io import save_model, sha256_file
    from rewriter.report import write_json

    paths = _outputs(out_dir, job.name)
    status, error = ret.status, ret.error
    output = out_sha = report = plan = None
    try:
        if ret.model is not None:
            save_model(_unpack(ret.model), paths["model"], external_data=job.options.external_data)
            out_sha = sha256_file(paths["model"])
            output = str(paths["model"])
            if ret.plan is not None:
                replace(ret.plan, output_sha256=out_sha).save(paths["plan"])
                plan = str(paths["plan"])
        if ret.report is not None:
            data = ret.report
            if output is not None:
                data["output"] = {"path": output, "sha256": out_sha}
            write_json(data, paths["report"])
            report = str(paths["report"])
    except Exception as exc:
        text = str(exc).strip().splitlines()
        status, error = ERROR, f"writing the outputs failed: {text[0] if text else type(exc).__name__}"
    notes = (ret.report or {}).get("input_shape_notes", [])
    return ModelResult(
        job.input, job.name, status, error, output, out_sha, report, plan, ret.kept, ret.rolled_back, ret.not_tried,
        ret.speedup, ret.speedup_ci, ret.macs_before, ret.macs_after, ret.seconds, ret.host,
        {**job.settings, "input_shape_notes": notes} if job.settings else {},
    )


# -- local pool ----------------------------------------------------------------------------------------------
@contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    """BLAS/OpenMP thread counts for the worker processes started in this block (where the user set none)."""
    added = [v for v in _THREAD_VARS if v not in os.environ]
    for v in added:
        os.environ[v] = str(threads)
    try:
        yield
    finally:
        for v in added:
            os.environ.pop(v, None)


def _run_local(
    jobs: Sequence[_Job], workers: int, threads: int, done: Callable[[_Job, _Return], None],
    fn: Callable[[_Job], _Return] = run_job,
) -> None:
    """Jobs in a pool of spawned processes. If a worker dies (a crash in native code, the OOM killer), the
    pool breaks: the jobs it had not finished are then run again, each in a fresh process of its own, so
    that only the job that kills its process is recorded as failed."""
    if not jobs:
        return
    ctx = multiprocessing.get_context("spawn")
    broken: list[_Job] = []
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    try:
        with _thread_env(threads):  # workers start during submit
            futures: dict[Future[_Return], _Job] = {pool.submit(fn, j): j for j in jobs}
        for fut in as_completed(futures):
            job = futures[fut]
            try:
                ret = fut.result()
            except BrokenProcessPool:
                broken.append(job)
                continue
            except Exception as exc:  # e.g. a return value that cannot be pickled
                ret = _Return(ERROR, f"the worker failed: {type(exc).__name__}: {exc}")
            done(job, ret)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    for job in sorted(broken, key=lambda j: j.index):
        log.info("%s: running again in a process of its own (a worker process died)", job.input)
        solo = ProcessPoolExecutor(max_workers=1, mp_context=ctx)
        try:
            with _thread_env(threads):
                fut = solo.submit(fn, job)
            try:
                ret = fut.result()
            except BrokenProcessPool:
                ret = _Return(ERROR, "the worker process died (a crash in native code, or killed for memory)")
        finally:
            solo.shutdown(cancel_futures=True)
        done(job, ret)


# -- Ray ---------------------------------------------------------------------------------------------------
def _ship(job: _Job) -> _Job:
    """The job with its model's files read in (the model first), for a worker without shared storage."""
    from rewriter.io import input_files

    src = Path(job.input)
    max_bytes = job.options.max_model_bytes
    size = src.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise InputError(f"{job.input}: {size} bytes exceeds the limit of {max_bytes} bytes (--max-model-bytes)")
    try:
        files = input_files(src)
    except InputError:
        files = [src]  # unusable: the worker's loader says why, as it would locally
    shipped: dict[str, bytes] = {}
    for f in files:
        rel = src.name if f == src else os.path.relpath(f, src.parent)
        shipped[rel] = f.read_bytes()
    return replace(job, source=shipped)


def _run_ray(ray: Any, jobs: Sequence[_Job], cpus: int, in_flight: int, done: Callable[[_Job, _Return], None]) -> None:
    """Jobs as Ray tasks of ``cpus`` CPUs each, at most ``in_flight`` shipped at a time."""
    task = ray.remote(run_job).options(num_cpus=cpus, max_retries=1)
    queue = list(jobs)
    pending: dict[Any, _Job] = {}
    while queue or pending:
        while queue and len(pending) < in_flight:
            job = queue.pop(0)
            try:
                shipped = _ship(job)
            except (InputError, OSError) as exc:
                done(job, _Return(ERROR, str(exc) if isinstance(exc, InputError) else f"{job.input}: cannot read: {exc.strerror or exc}"))
                continue
            pending[task.remote(shipped)] = job
        if not pending:
            continue
        ready, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready[0])
        try:
            ret = ray.get(ready[0])
        except Exception as exc:  # the task's worker died, the node was lost, ...
            text = str(exc).strip().splitlines()
            ret = _Return(ERROR, f"the Ray task failed: {type(exc).__name__}: {text[0] if text else ''}")
        done(job, ret)
