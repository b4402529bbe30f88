"""Output comparison and numerics budgets.

Per output (by name), over all judging feeds, with ``r`` the reference and ``c`` the candidate:

* ``max_abs  = max |c - r|``;  ``mean_abs = mean |c - r|``
* ``max_rel  = max |c - r| / max(|r|, 1e-12)``
* ``cosine   = <c, r> / (|c| |r|)`` on the flattened values (1 when both are all zero)
* ``snr_db   = 10 log10(sum r^2 / sum (c - r)^2)`` (inf when equal)
* ``allclose_ratio = max |c - r| / (atol + rtol |r|)``: the exact gate holds when it is <= 1
* for class-score outputs (rank 2, N x C with C >= 2): ``top1``, the fraction of rows whose argmax
  agrees, and ``top5``, the fraction whose reference top-1 class is among the candidate's top 5.

NaN/Inf policy: where the reference is NaN or +-Inf the candidate must hold the same value; a non-finite
candidate value where the reference is finite is a failure (counted in ``nonfinite_mismatch``). The
statistics above are taken over positions finite in both.

The exact gate of a float16 model (its weights mostly float16, e.g. made by onnxruntime's
``convert_float_to_float16``) is wider -- see :meth:`Budget.exact_tolerances`: with ``eps = 2^-10`` (float16's
machine epsilon) and ``k = 8``, ``rtol = max(rtol, k eps)`` and, per output, ``atol = max(atol, k eps rms(r))``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from rewriter.analysis import weights_dtype
from rewriter.errors import InputError

EXACT_RTOL = 1e-4
EXACT_ATOL = 1e-5
#: The budget of a lossy rewrite when the user states none.
DEFAULT_LOSSY_BUDGET = "cosine>=0.999,top1-drop<=0.01"
#: float16's machine epsilon: the gap between 1 and the next float16 (twice its unit roundoff 2^-11).
FP16_EPS = 2.0**-10
#: How many float16 epsilons an exact rewrite of a float16 model may move its outputs by (relative to an
#: element, or to the output's RMS): see :meth:`Budget.exact_tolerances`.
FP16_EXACT_EPS = 8


@dataclass(frozen=True)
class OutputStats:
    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    snr_db: float
    allclose_ratio: float
    nonfinite_mismatch: int
    elements: int
    top1: float | None = None
    top5: float | None = None

    def value(self, metric: str) -> float | None:
        if metric == "top1_drop":
            return None if self.top1 is None else 1.0 - self.top1
        if metric == "top5_drop":
            return None if self.top5 is None else 1.0 - self.top5
        return getattr(self, metric)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: non-finite floats become ``None`` (an ``snr_db`` of ``None`` with ``max_abs`` 0 means equal)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def topk_hits(ref: np.ndarray, cand: np.ndarray, k: int) -> int:
    """Rows (of N x C scores) whose reference top-1 class is among the candidate's top ``k``."""
    ref_top = np.argmax(ref, axis=1)
    cand_top = np.argsort(-cand, axis=1, kind="stable")[:, :k]
    return int(np.sum(np.any(cand_top == ref_top[:, None], axis=1)))


@dataclass(frozen=True)
class OutputPartial:
    """Sufficient statistics of one output over some feeds; ``a.merge(b)`` covers both sets.

    :func:`partial_stats` computes them for a list of feeds and :meth:`finish` turns them into
    :class:`OutputStats`; :func:`compare_arrays` is the two in one step, and the sharded numerics
    (:mod:`rewriter.validation.sharded`) merge the partials of shards before finishing, so both paths
    give the same statistics (maxima and counts exactly; sums up to float rounding).
    """

    name: str
    elements: int = 0
    nonfinite_mismatch: int = 0
    #: Positions finite on both sides (the statistics below are over these).
    count: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    max_allclose: float = 0.0
    sum_abs: float = 0.0
    dot: float = 0.0
    sum_ref2: float = 0.0
    sum_cand2: float = 0.0
    sum_err2: float = 0.0
    ref_nonzero: bool = False
    #: Class-score rows (every array N x C with C >= 2, the same C), or ``None`` when not class scores.
    classes: int | None = None
    rows: int = 0
    top1_hits: int = 0
    top5_hits: int = 0
    #: False once some array was not N x C class scores (then top-k does not apply to the whole set).
    scores: bool = True

    def merge(self, other: OutputPartial) -> OutputPartial:
        if other.name != self.name:
            raise ValueError(f"cannot merge statistics of outputs {self.name!r} and {other.name!r}")
        if self.classes is not None and other.classes is not None and self.classes != other.classes:
            raise ValueError(f"output {self.name!r}: {self.classes} classes in one shard, {other.classes} in another")
        return OutputPartial(
            self.name,
            self.elements + other.elements,
            self.nonfinite_mismatch + other.nonfinite_mismatch,
            self.count + other.count,
            max(self.max_abs, other.max_abs),
            max(self.max_rel, other.max_rel),
            max(self.max_allclose, other.max_allclose),
            self.sum_abs + other.sum_abs,
            self.dot + other.dot,
            self.sum_ref2 + other.sum_ref2,
            self.sum_cand2 + other.sum_cand2,
            self.sum_err2 + other.sum_err2,
            self.ref_nonzero or other.ref_nonzero,
            self.classes if self.classes is not None else other.classes,
            self.rows + other.rows,
            self.top1_hits + other.top1_hits,
            self.top5_hits + other.top5_hits,
            self.scores and other.scores,
        )

    def finish(self) -> OutputStats:
        """The statistics (see the module's docstring) from the sums."""
        n = self.count
        nr, nc = math.sqrt(self.sum_ref2), math.sqrt(self.sum_cand2)
        cosine = 1.0 if nr == 0 and nc == 0 else (self.dot / (nr * nc) if nr and nc else 0.0)
        err = self.sum_err2
        snr_db = math.inf if err == 0 else (10 * math.log10(self.sum_ref2 / err) if self.ref_nonzero else -math.inf)
        top1 = top5 = None
        if self.scores and self.classes is not None:
            # Class scores with no rows at all: top-k applies but is undefined (NaN).
            top1 = self.top1_hits / self.rows if self.rows else math.nan
            if self.classes > 5:
                top5 = self.top5_hits / self.rows if self.rows else math.nan
        return OutputStats(
            self.name,
            self.max_abs if n else 0.0,
            self.sum_abs / n if n else 0.0,
            self.max_rel if n else 0.0,
            cosine,
            snr_db,
            self.max_allclose if n else 0.0,
            self.nonfinite_mismatch,
            self.elements,
            top1,
            top5,
        )


def partial_stats(
    name: str,
    refs: Sequence[np.ndarray],
    cands: Sequence[np.ndarray],
    *,
    rtol: float = EXACT_RTOL,
    atol: float = EXACT_ATOL,
) -> OutputPartial:
    """Sufficient statistics of one output over these feeds (each pair must have the same shape): one feed's
    at a time, merged (small temporaries: a 640x640 map over 8 feeds is not copied whole in float64)."""
    for r, c in zip(refs, cands):
        if r.shape != c.shape:
            raise ValueError(f"output {name!r}: shape {c.shape} differs from the reference's {r.shape}")
    total = OutputPartial(name)
    scores = all(np.ndim(x) == 2 and np.shape(x)[1] >= 2 for x in refs)
    for r, c in zip(refs, cands):
        total = total.merge(_pair_stats(name, np.asarray(r), np.asarray(c), scores, rtol, atol))
    return replace(total, scores=scores) if refs else total


def _pair_stats(name: str, ref: np.ndarray, cand: np.ndarray, scores: bool, rtol: float, atol: float) -> OutputPartial:
    """:func:`partial_stats` of one feed's output (``scores``: every feed's output is N x C class scores)."""
    r = np.asarray(ref, np.float64).ravel()
    c = np.asarray(cand, np.float64).ravel()
    ref_finite, cand_finite = np.isfinite(r), np.isfinite(c)
    same_nonfinite = (~ref_finite) & ((c == r) | (np.isnan(c) & np.isnan(r)))
    mismatch = int(np.sum((~ref_finite & ~same_nonfinite) | (ref_finite & ~cand_finite)))
    both = ref_finite & cand_finite
    rf, cf = (r, c) if both.all() else (r[both], c[both])
    diff = np.abs(cf - rf)
    any_values = bool(diff.size)
    abs_ref = np.abs(rf)
    classes = rows = hits1 = hits5 = 0
    if scores:
        classes, rows = int(ref.shape[1]), int(ref.shape[0])
        hits1 = topk_hits(ref, cand, 1)
        hits5 = topk_hits(ref, cand, 5) if classes > 5 else 0
    return OutputPartial(
        name,
        elements=int(r.size),
        nonfinite_mismatch=mismatch,
        count=int(diff.size),
        max_abs=float(diff.max()) if any_values else 0.0,
        max_rel=float((diff / np.maximum(abs_ref, 1e-12)).max()) if any_values else 0.0,
        max_allclose=float((diff / (atol + rtol * abs_ref)).max()) if any_values else 0.0,
        sum_abs=float(np.sum(diff)),
        dot=float(np.dot(rf, cf)),
        sum_ref2=float(np.dot(rf, rf)),
        sum_cand2=float(np.dot(cf, cf)),
        sum_err2=float(np.dot(diff, diff)),
        ref_nonzero=bool(np.any(rf)),
        classes=classes if scores else None,
        rows=rows,
        top1_hits=hits1,
        top5_hits=hits5,
        scores=scores,
    )


def compare_arrays(
    name: str,
    refs: Sequence[np.ndarray],
    cands: Sequence[np.ndarray],
    *,
    rtol: float = EXACT_RTOL,
    atol: float = EXACT_ATOL,
) -> OutputStats:
    """Statistics of one output over all feeds (each pair must have the same shape)."""
    return partial_stats(name, refs, cands, rtol=rtol, atol=atol).finish()


def compare_outputs(
    reference: Sequence[Mapping[str, np.ndarray]],
    candidate: Sequence[Mapping[str, np.ndarray]],
    *,
    rtol: float = EXACT_RTOL,
    atol: float = EXACT_ATOL,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, OutputStats]:
    """Per-output statistics; both sides are lists of ``{output name: array}``, one per feed.
    ``tolerances``: ``(rtol, atol)`` of the allclose ratio per output name, where it differs from ``rtol``/``atol``."""
    if len(reference) != len(candidate):
        raise ValueError("reference and candidate were run on different numbers of feeds")
    names = list(reference[0]) if reference else []
    out = {}
    for name in names:
        if any(name not in c for c in candidate):
            raise ValueError(f"candidate has no output named {name!r}")
        r_tol, a_tol = (tolerances or {}).get(name, (rtol, atol))
        out[name] = compare_arrays(name, [r[name] for r in reference], [c[name] for c in candidate], rtol=r_tol, atol=a_tol)
    return out


def rms(arrays: Sequence[np.ndarray]) -> float:
    """Root mean square of the finite values of ``arrays`` (0 when there are none)."""
    values = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays]) if arrays else np.zeros(0)
    values = values[np.isfinite(values)]
    return float(np.sqrt(np.mean(values**2))) if values.size else 0.0


_METRICS = {"max_abs": "<=", "mean_abs": "<=", "max_rel": "<=", "cosine": ">=", "snr_db": ">=",
            "top1": ">=", "top5": ">=", "top1_drop": "<=", "top5_drop": "<="}
_BOUND_RE = re.compile(r"^\s*([a-zA-Z0-9_-]+)\s*(?:@\s*(.+?))?\s*(<=|>=)\s*([-+0-9.eE]+|inf)\s*$")


@dataclass(frozen=True)
class Bound:
    """One budget term: ``metric op value``, for one output or (``output=None``) for every output."""

    metric: str
    op: str
    value: float
    output: str | None = None

    def holds(self, measured: float) -> bool:
        return measured <= self.value if self.op == "<=" else measured >= self.value

    def __str__(self) -> str:
        where = f"@{self.output}" if self.output else ""
        return f"{self.metric.replace('_', '-')}{where}{self.op}{self.value:g}"


def parse_bounds(text: str) -> tuple[Bound, ...]:
    """Parse ``cosine>=0.999,top1-drop<=0.01,max-abs@logits<=1e-3``."""
    bounds = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _BOUND_RE.match(part)
        if not m:
            raise InputError(f"--max-error term {part!r}: expected METRIC[@OUTPUT](<=|>=)VALUE, e.g. cosine>=0.999")
        metric, output, op = m.group(1).replace("-", "_").lower(), m.group(2), m.group(3)
        try:
            value = float(m.group(4))
        except ValueError:
            raise InputError(f"--max-error term {part!r}: {m.group(4)!r} is not a number") from None
        if metric not in _METRICS:
            raise InputError(f"--max-error term {part!r}: unknown metric {metric!r} (known: {', '.join(sorted(_METRICS))})")
        if op != _METRICS[metric]:
            raise InputError(f"--max-error term {part!r}: {metric} is bounded with {_METRICS[metric]}")
        bounds.append(Bound(metric, op, value, output))
    if not bounds:
        raise InputError("--max-error is empty")
    return tuple(bounds)


@dataclass(frozen=True)
class Budget:
    """What outputs may move by.

    The exact gate (``rtol``/``atol`` elementwise, as in ``numpy.allclose``) applies to exact rewrites;
    ``bounds`` apply to lossy ones. Non-finite mismatches fail both. ``weights``: the floating-point type
    the model's weights are stored in (:meth:`for_model`); ``"float16"`` widens the exact gate to what
    float16 rounding needs (:meth:`exact_tolerances`).
    """

    bounds: tuple[Bound, ...] = field(default_factory=lambda: parse_bounds(DEFAULT_LOSSY_BUDGET))
    rtol: float = EXACT_RTOL
    atol: float = EXACT_ATOL
    weights: str = "float32"

    @classmethod
    def parse(cls, text: str | None, rtol: float = EXACT_RTOL, atol: float = EXACT_ATOL) -> Budget:
        return cls(parse_bounds(text or DEFAULT_LOSSY_BUDGET), rtol, atol)

    def for_model(self, proto: onnx.ModelProto) -> Budget:
        """This budget for rewrites of ``proto``: with ``weights="float16"`` when its weights are mostly
        float16 (:func:`rewriter.analysis.weights_dtype`), else this very budget."""
        return replace(self, weights="float16") if weights_dtype(proto) == "float16" else self

    @property
    def fp16(self) -> bool:
        return self.weights == "float16"

    def exact_tolerances(self, reference: Sequence[np.ndarray]) -> tuple[float, float]:
        """``(rtol, atol)`` of the exact gate for one output whose reference values (over the feeds) are
        ``reference``: this budget's own for float32 weights. For float16 weights, with ``eps = 2^-10``
        (:data:`FP16_EPS`) and ``k = 8`` (:data:`FP16_EXACT_EPS`)::

            rtol = max(self.rtol, k eps)                  # 0.0078
            atol = max(self.atol, k eps rms(reference))

        Why: a float16 output differs in whole float16 steps, up to ``eps |r|`` each, so a gate under one step
        refuses any change at all. An exact rewrite moves no value mathematically, only where float16 rounds:
        its stored weights (each by up to ``eps/2`` relative) and the intermediate tensors it removes; those
        relative perturbations of order ``eps`` pass through the layers after it and add up over the rewrites
        kept (``sqrt(m)`` for ``m`` independent ones). Near zero an output is a sum of terms that cancel, and
        its rounding error follows the size of the terms, not of the result: hence ``atol`` scales with the
        output's RMS. ``k = 8`` passes the 36 exact rewrites of ppocr-cls converted to float16 (about 1 eps at
        its output, 6 eps on its logits) while an error of a rewrite's math (order 1 relative) still fails by
        far; the float16 conversion itself moves those logits by about 8 eps."""
        if not self.fp16:
            return self.rtol, self.atol
        tol = FP16_EXACT_EPS * FP16_EPS
        return max(self.rtol, tol), max(self.atol, tol * rms(reference))

    def compare(self, reference: Sequence[Mapping[str, np.ndarray]], candidate: Sequence[Mapping[str, np.ndarray]]) -> dict[str, OutputStats]:
        """:func:`compare_outputs` with the exact gate's tolerances of each output (:meth:`exact_tolerances`)."""
        if not self.fp16:
            return compare_outputs(reference, candidate, rtol=self.rtol, atol=self.atol)
        names = list(reference[0]) if reference else []
        tolerances = {name: self.exact_tolerances([r[name] for r in reference]) for name in names}
        return compare_outputs(reference, candidate, tolerances=tolerances)

    def _exact_text(self) -> str:
        if not self.fp16:
            return f"allclose(rtol={self.rtol:g}, atol={self.atol:g})"
        tol = FP16_EXACT_EPS * FP16_EPS
        return (f"allclose(rtol={max(self.rtol, tol):g}, atol=max({self.atol:g}, {tol:g}*rms(output))) "
                f"(float16 weights: {FP16_EXACT_EPS} x eps16)")

    def describe(self, exact: bool) -> str:
        return self._exact_text() if exact else ",".join(str(b) for b in self.bounds)

    def failures(self, stats: Mapping[str, OutputStats], exact: bool) -> list[str]:
        """Human-readable failures, each naming the output; empty when within budget."""
        problems = []
        names = set(stats)
        for b in self.bounds:
            if b.output is not None and b.output not in names:
                raise InputError(f"--max-error names output {b.output!r}, which the model does not have ({sorted(names)})")
        for name, s in stats.items():
            if s.nonfinite_mismatch:
                problems.append(f"output {name!r}: {s.nonfinite_mismatch} NaN/Inf values where the reference differs")
            if exact:
                if s.allclose_ratio > 1.0:
                    problems.append(
                        f"output {name!r}: max abs error {s.max_abs:.3g} exceeds {self._exact_text()} by {s.allclose_ratio:.3g}x"
                    )
                continue
            for b in self.bounds:
                if b.output not in (None, name):
                    continue
                measured = s.value(b.metric)
                if measured is None:
                    if b.output is not None:
                        problems.append(f"output {name!r}: {b.metric} does not apply (not a class-score output)")
                    continue
                if not b.holds(measured):
                    problems.append(f"output {name!r}: {b.metric.replace('_', '-')} = {measured:.6g} violates {b}")
        return problems


def spread_error(reference: Sequence[Mapping[str, np.ndarray]], candidate: Sequence[Mapping[str, np.ndarray]]) -> float:
    """One number for how far ``candidate`` strays from ``reference`` over a set of feeds, relative to how
    much the reference itself varies across them: per tensor ``t``,
    ``e_t^2 = sum (c - r)^2 / sum (r - mean_feeds(r))^2`` (the mean over feeds when every feed gives the same
    shape, else 0), and the result is ``sqrt(mean_t e_t^2)``. Squared errors of independent small rewrites
    add up, so it is the unit a lossy search's error predictions are made in. Non-finite positions are
    ignored; a tensor that does not vary at all is measured against its own magnitude."""
    total = 0.0
    names = list(reference[0]) if reference else []
    for name in names:
        refs = [np.asarray(r[name], np.float64) for r in reference]
        cands = [np.asarray(c[name], np.float64) for c in candidate]
        same = all(r.shape == refs[0].shape for r in refs)
        mean = np.mean(refs, axis=0) if same else 0.0
        num = den = 0.0
        for r, c in zip(refs, cands):
            ok = np.isfinite(r) & np.isfinite(c)
            num += float(np.sum((c - r)[ok] ** 2))
            den += float(np.sum(((r - mean) if same else r)[ok] ** 2))
        if den <= 0:
            den = max(sum(float(np.sum(r[np.isfinite(r)] ** 2)) for r in refs), 1e-30)
        total += num / den
    return math.sqrt(total / max(1, len(names)))
