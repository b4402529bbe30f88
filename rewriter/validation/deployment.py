"""Deployment profiles: the threads and batch a model will run at, which every latency verdict must pay on.

A :class:`DeploymentProfile` is one setting a user deploys at (``threads=2,batch=8``). A run judges
latency on each profile it is given, the first being the *primary* one: a rewrite is kept only where it
pays on every profile (see :class:`~rewriter.validation.judge.Judge`), and the report gives the end-to-end
speedup per profile.

The batch is the first dim of every tensor input. Feeds made at the model's resolved batch (usually 1) are
*re-batched* by taking their rows in order (:func:`rows`): ``B`` rows stacked along the first axis, the
feeds repeated from the start when there are fewer rows than ``B``. A model whose input fixes its first dim
at another value cannot run at that batch (:func:`batch_error`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from rewriter.errors import InputError
from rewriter.shapes import Shape, graph_inputs

Feed = Mapping[str, np.ndarray]

#: The most a profile may ask for: a typo (``batch=800``) should be an error, not a run that never ends.
MAX_THREADS = 1024
MAX_BATCH = 4096


@dataclass(frozen=True)
class DeploymentProfile:
    """Intra-op threads of the timed sessions, and the batch of the timed (and, for the primary profile,
    the numerics) feeds."""

    threads: int = 1
    batch: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.threads <= MAX_THREADS:
            raise InputError(f"a profile's threads must be 1..{MAX_THREADS}, not {self.threads}")
        if not 1 <= self.batch <= MAX_BATCH:
            raise InputError(f"a profile's batch must be 1..{MAX_BATCH}, not {self.batch}")

    @property
    def label(self) -> str:
        """``threads=2,batch=8``: the spelling :meth:`parse` reads."""
        return f"threads={self.threads},batch={self.batch}"

    def to_dict(self) -> dict[str, int]:
        return {"threads": self.threads, "batch": self.batch}

    @classmethod
    def parse(cls, text: str) -> DeploymentProfile:
        """``threads=T,batch=B`` (either key may be left out: 1); a one-line :class:`InputError` otherwise."""
        values = {"threads": 1, "batch": 1}
        seen: set[str] = set()
        for part in (p.strip() for p in str(text).split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in values:
                raise InputError(f"--profile {text!r}: expected threads=T,batch=B (keys threads, batch)")
            if key in seen:
                raise InputError(f"--profile {text!r}: {key} given twice")
            try:
                values[key] = int(value.strip())
            except ValueError:
                raise InputError(f"--profile {text!r}: {key} must be a whole number, not {value.strip()!r}") from None
            seen.add(key)
        if not seen:
            raise InputError(f"--profile {text!r}: expected threads=T,batch=B")
        return cls(values["threads"], values["batch"])


def profiles_from(threads: int = 1, batch: int = 1, profiles: Sequence[str] = ()) -> tuple[DeploymentProfile, ...]:
    """The run's profiles, primary first: each ``--profile`` as given, else the one ``--threads``/``--batch``
    make. Giving both is an error (which threads would the primary profile run at?); so is a profile twice."""
    if not profiles:
        return (DeploymentProfile(threads, batch),)
    if threads != 1 or batch != 1:
        raise InputError("give either --threads/--batch or --profile (the first --profile is the primary one), not both")
    parsed = tuple(DeploymentProfile.parse(p) for p in profiles)
    if len(set(parsed)) != len(parsed):
        raise InputError("the same --profile is given twice")
    return parsed


def batch_error(model: onnx.ModelProto, batch: int) -> str | None:
    """Why ``model`` cannot run at ``batch`` (an input whose first dim is fixed at another value), or ``None``."""
    for vi in graph_inputs(model):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value != batch:
            return (f"input {vi.name!r} fixes its batch dim at {dims[0].dim_value}: the model cannot run at batch {batch} "
                    f"(export it with a dynamic batch dim, or drop the profile)")
    return None


def check_batches(model: onnx.ModelProto, profiles: Sequence[DeploymentProfile]) -> None:
    """:class:`InputError` when ``model`` cannot run at one of the profiles' batches."""
    for profile in profiles:
        why = batch_error(model, profile.batch)
        if why is not None:
            flag = f"--profile {profile.label}" if len(profiles) > 1 else f"--batch {profile.batch}"
            raise InputError(f"{flag}: {why}")


def rows(feeds: Sequence[Feed], batch: int, start: int = 0) -> dict[str, np.ndarray]:
    """One feed of ``batch`` rows: the feeds' rows in order from feed ``start`` (stacked along the first axis,
    cycling from the first feed when they run out). Scalar inputs are taken from the first feed used."""
    if not feeds:
        raise ValueError("rows: no feeds")
    out: dict[str, list[np.ndarray]] = {}
    have, i = 0, start
    while have < batch:
        feed = feeds[i % len(feeds)]
        n = min(_rows_of(feed), batch - have)
        for name, value in feed.items():
            if np.ndim(value) == 0:
                out.setdefault(name, [np.asarray(value)])
            else:
                out.setdefault(name, []).append(np.asarray(value)[:n])
        have, i = have + n, i + 1
    return {name: parts[0] if parts[0].ndim == 0 else np.concatenate(parts, axis=0) for name, parts in out.items()}


def _rows_of(feed: Feed) -> int:
    counts = {int(np.shape(v)[0]) for v in feed.values() if np.ndim(v) > 0}
    if len(counts) != 1 or 0 in counts:
        raise InputError(f"feeds whose inputs disagree on the batch dim ({sorted(counts)}) cannot be re-batched")
    return counts.pop()


def rebatched(feeds: Sequence[Feed], batch: int) -> Sequence[Feed]:
    """``feeds`` as feeds of ``batch`` rows each: the same rows in order, as many feeds as it takes to use each
    row once (the last one filled up from the start). Feeds already of ``batch`` rows come back as they are
    (the very same sequence)."""
    if not feeds or all(_rows_of(f) == batch for f in feeds):
        return feeds  # type: ignore[return-value]
    total = sum(_rows_of(f) for f in feeds)
    flat = [{k: np.asarray(v)[r:r + 1] if np.ndim(v) else v for k, v in f.items()} for f in feeds for r in range(_rows_of(f))]
    return [rows(flat, batch, start) for start in range(0, total, batch)]


def shapes_at(input_shapes: Mapping[str, Shape], batch: int) -> dict[str, Shape]:
    """Resolved input shapes with the first dim set to ``batch`` (scalars as they are)."""
    return {name: (batch, *shape[1:]) if len(shape) else tuple(shape) for name, shape in input_shapes.items()}
