"""Fork -> apply -> (judge) -> commit, written once.

:func:`apply_candidate` applies one candidate to a fork of a model version and commits it: the unguarded
step every caller shares (plans, rounds proven together, screening, :func:`~rewriter.pipeline.apply_pass`).
:func:`try_candidate` adds the judge: the guarded step of the search, which never lets a faulty pass or
a failed validation end the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from rewriter.contract import Candidate, Pass, RewriteError
from rewriter.decision import Decision
from rewriter.model import Model
from rewriter.outcome import Outcome
from rewriter.validation.judge import Judge
from rewriter.validation.numerics import OutputStats

log = logging.getLogger(__name__)


def apply_candidate(p: Pass, model: Model, candidate: Candidate) -> Model:
    """``model`` with ``candidate`` applied: a fork edited by the pass, then committed (dead nodes dropped,
    sorted, shapes inferred afresh). ``model`` is untouched. Raises what the pass raises
    (:class:`RewriteError` when the candidate is stale)."""
    trial = model.fork()
    p.apply(trial, candidate)
    return trial.commit()


@dataclass(frozen=True)
class Applied:
    """Several candidates applied to one fork, committed once (:func:`apply_candidates`)."""

    model: Model
    #: The candidates applied, in order (those whose nodes an earlier one consumed are left out).
    candidates: tuple[Candidate, ...]
    #: The names of the nodes each candidate made, by candidate key.
    made: dict[str, frozenset[str]]
    #: Whether each candidate lowered MACs or the number of compute nodes (see ``speculative`` in the judge).
    reducing: bool
    #: The keys of the candidates that lowered neither (each must be shown faster).
    speculative: frozenset[str] = frozenset()


def apply_candidates(p: Pass, model: Model, candidates: Sequence[Candidate], stop: Callable[[], bool] | None = None) -> Applied:
    """``model`` with ``candidates`` applied in turn to ONE fork, committed once: one export and one shape
    inference for the lot instead of one per candidate (what an exact round proven together costs). A
    candidate sharing a node with an earlier one is skipped (it was consumed). Raises what the pass raises, and
    :class:`RewriteError` when ``stop()`` turns true between two candidates."""
    fork = model.fork()
    graph = fork.graph
    consumed: set[str] = set()
    applied: list[Candidate] = []
    made: dict[str, frozenset[str]] = {}
    speculative: set[str] = set()
    for cand in candidates:
        if consumed.intersection(cand.nodes) or any(fork.node(n) is None for n in cand.nodes):
            continue
        if stop is not None and stop():
            raise RewriteError("stopped: no time left")
        known = len(graph.nodes)
        p.apply(fork, cand)
        new = graph.nodes[known:]
        made[cand.key] = frozenset(n.name for n in new)
        added = sum(1 for n in new if n.op != "Constant")
        if not (cand.cost.macs_after < cand.cost.macs_before or added < len(cand.nodes)):
            speculative.add(cand.key)
        consumed.update(cand.nodes)
        applied.append(cand)
    return Applied(fork.commit(), tuple(applied), made, not speculative, frozenset(speculative))


@dataclass(frozen=True)
class Trial:
    """The outcome of :func:`try_candidate`: the new accepted model when kept (else ``None``), the decision,
    and the seconds it took."""

    model: Model | None
    decision: Decision
    seconds: float


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


def try_candidate(
    p: Pass,
    accepted: Model,
    candidate: Candidate,
    judge: Judge,
    proven: Mapping[str, OutputStats] | None = None,
) -> Trial:
    """Apply ``candidate`` to a fork of ``accepted`` and judge it (numerics against the original model,
    latency against ``accepted``). A stale candidate, a pass that raises and a validation that fails are
    decisions, never exceptions. ``proven``: see :meth:`Judge.judge`."""
    began = time.perf_counter()

    def done(model: Model | None, decision: Decision) -> Trial:
        return Trial(model, decision, time.perf_counter() - began)

    try:
        committed = apply_candidate(p, accepted, candidate)
    except RewriteError as exc:
        return done(None, Decision(candidate, p.exact, Outcome.STALE, f"stale: {exc}"))
    except Exception as exc:  # a faulty pass must never end the run
        log.warning("%s raised on %s: %s", p.name, candidate.nodes, exc)
        return done(None, Decision(candidate, p.exact, Outcome.RAISED, f"rewrite raised {type(exc).__name__}: {exc}"))
    try:
        verdict = judge.judge(accepted, committed, candidate, p.exact, proven)
    except Exception as exc:
        log.warning("validation of %s on %s failed: %s", p.name, candidate.nodes, exc)
        return done(None, Decision(candidate, p.exact, Outcome.VALIDATION_FAILED,
                                   f"validation failed: {type(exc).__name__}: {_first_line(exc)}"))
    decision = Decision(candidate, p.exact, verdict.outcome, verdict.reason, verdict)
    return done(committed if verdict.keep else None, decision)
