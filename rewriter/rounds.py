"""An exact pass's round proven together: numerics once, latency once, bisected only where it is slower;
and :func:`settled`, the whole-model comparison a pass or a round is judged on.

:func:`prove_round` applies every candidate of an exact pass's round in turn and checks the result's
numerics once (:class:`RoundProof`). :func:`settle_round` then judges the round's latency as a group: the
whole model with the round against the model before it, at every deployment profile. Where the group is
not shown slower, every rewrite of it is kept on that one measurement; where it is, the round is split in
halves and each half judged the same way, on the model the halves before it left (bisection), down to the
single rewrites that are slower, which are rolled back and named. A round whose kept part differs from the
proven whole has its numerics checked again on what is kept.

Group judgement needs every rewrite of the round to lower MACs or the node count (a rewrite that lowers
neither must be shown faster alone: :func:`~rewriter.validation.judge.speculative`); otherwise, or without
latency measurement, the search proves the round's rewrites one by one (:mod:`rewriter.search`).

In a run of exact passes only, numerics and latency are judged once, on the whole result
(:attr:`Judge.deferred`): a round is then applied and kept, and the pipeline checks the result end to end,
searching again round by round where it fails (:func:`rewriter.pipeline.optimize`).

Cost: one whole-model timing per round instead of one region timing per rewrite, plus ``2 log2(n)`` per
slower rewrite found. A round after which onnxruntime runs the very same graph (it folds and fuses the same
way itself: :mod:`~rewriter.validation.deployed`) is not timed at all: its latency is unchanged by
construction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rewriter.contract import Candidate, Pass
from rewriter.decision import Decision
from rewriter.deadline import Deadline
from rewriter.model import Model
from rewriter.outcome import Outcome
from rewriter.trial import apply_candidates
from rewriter.validation.deployment import DeploymentProfile
from rewriter.validation.judge import DEFERRED, Judge, ProfileLatency, Verdict
from rewriter.validation.latency import LatencyComparison, pooled
from rewriter.validation.numerics import OutputStats

log = logging.getLogger(__name__)

#: Extra whole-model measurements, pooled with the first, when its interval and its point estimate disagree.
CONFIRMATIONS = 2


def settled(judge: Judge, base: Model, model: Model, threshold: float, exact: bool,
            first: LatencyComparison | None = None, profile: DeploymentProfile | None = None) -> LatencyComparison:
    """The whole-model comparison a pass is kept or undone on, at ``profile`` (default: the primary one).
    Where the interval leaves the call open while the point estimate takes a side (a noisy machine), more
    pairs are measured and pooled, up to ``CONFIRMATIONS`` times and while the judge's deadline has time
    left: one unlucky measurement must not undo a whole search. ``first``: a measurement of this very pair
    already taken (it is not repeated)."""
    lat = first if first is not None else judge.model_latency(base.proto, model.proto, profile)
    for _ in range(CONFIRMATIONS):
        ci = lat.ci
        open_call = (not ci.slower(threshold) and ci.speedup < threshold) if exact else (not ci.faster(threshold) and ci.speedup > threshold)
        if not open_call or judge.deadline.over():
            break
        log.info("whole-model speedup %s is not settled; measuring more pairs", ci)
        lat = pooled(lat, judge.model_latency(base.proto, model.proto, profile), seed=judge.config.timing.seed)
    return lat



@dataclass(frozen=True)
class RoundProof:
    """An exact pass's round proven together: every candidate applied in turn (each to the model the one
    before made, as the one-by-one path does while it keeps them all), and the numerics of the result."""

    numerics: dict[str, OutputStats]
    order: tuple[str, ...]  # candidate keys, in the order applied
    #: The candidates applied, in order; the model holding them all.
    applied: tuple[Candidate, ...] = ()
    model: Model | None = None
    #: Whether every rewrite lowered MACs or the number of compute nodes as it was applied.
    reducing: bool = False
    #: The names of the nodes each rewrite made, by candidate key.
    made: dict[str, frozenset[str]] = field(default_factory=dict)

    def covers(self, kept: Sequence[str], key: str) -> bool:
        """Whether the one-by-one path, having kept ``kept`` this round, is about to build the next model of
        the proof (so far it built the same ones)."""
        n = len(kept)
        return n < len(self.order) and self.order[n] == key and tuple(kept) == self.order[:n]


def prove_round(p: Pass, model: Model, todo: Sequence[Candidate], judge: Judge, deadline: Deadline | None = None) -> RoundProof | None:
    """Apply every candidate of an exact pass's round in turn (skipping those whose nodes an earlier one
    consumed) and check the result's numerics once. ``None`` when the result fails the exact budget, a
    rewrite raises, the search's ``deadline`` passes, there is nothing to share (fewer than two
    candidates), or -- with latency measured -- a rewrite lowers neither MACs nor nodes (each is then timed
    first, alone): they are then proven alone. With :attr:`Judge.deferred` the numerics are left to the whole
    result (the proof's are empty)."""
    if not p.exact or len(todo) < 2 or judge.reference_error() is not None:
        return None
    if deadline is not None and deadline.search_over():
        return None
    try:
        done = apply_candidates(p, model, todo, None if deadline is None else deadline.search_over)
        if len(done.candidates) < 2:
            return None
        if not done.reducing and judge.config.latency:
            log.info("%s: the round's rewrites lower neither MACs nor nodes: each is timed first, alone", p.name)
            return None  # most are refused on latency, before any numerics run (Judge.judge)
        stats = {} if judge.deferred else judge.numerics(done.model.proto)  # deferred: judged on the whole result
    except Exception as exc:  # the one-by-one path records which rewrite fails, and why
        log.info("%s: round of %d not proven together (%s: %s); proving each alone", p.name, len(todo), type(exc).__name__, exc)
        return None
    failures = judge.config.budget.failures(stats, exact=True) if stats else []
    if failures:
        log.info("%s: round of %d rewrites fails together (%s); proving each alone", p.name, len(done.candidates), "; ".join(failures))
        return None
    log.info("%s: %d rewrites %s together", p.name, len(done.candidates), "applied" if judge.deferred else "proven exact")
    return RoundProof(stats, tuple(c.key for c in done.candidates), done.candidates, done.model, done.reducing, done.made)


def new_nodes(before: Model, after: Model) -> frozenset[str]:
    """The names of the nodes ``after`` has and ``before`` has not: what a rewrite made."""
    old = {n.name for n in before.proto.graph.node}
    return frozenset(n.name for n in after.proto.graph.node if n.name not in old)


@dataclass(frozen=True)
class GroupVerdict:
    """The latency verdict on one group of a round: the candidates, the comparison at each profile (primary
    first), and the profile it is slower at (``None``: not shown slower anywhere)."""

    candidates: tuple[Candidate, ...]
    profiles: tuple[ProfileLatency, ...]
    slower_at: str | None
    #: onnxruntime runs the same graph with the group as without it: latency equal by construction, not timed.
    same_deployed: bool = False
    #: Latency was measured at all (off: the run has no latency gate).
    measured: bool = True
    #: Numerics and latency are judged later, on the whole result end to end (:attr:`Judge.deferred`).
    deferred: bool = False
    #: Rewrites that lower neither MACs nor nodes, timed together on the union of their regions (they must be
    #: shown faster; their numerics are judged with the whole result): :func:`settle_speculative`.
    speculative: bool = False

    @property
    def latency(self) -> LatencyComparison | None:
        return self.profiles[0].latency if self.profiles else None


@dataclass(frozen=True)
class SettledRound:
    """A round judged as a group: the model it leaves, its numerics, and the verdicts of the groups it was
    settled in (each candidate in exactly one; ``slower_at`` set on the single rewrites rolled back)."""

    model: Model
    numerics: dict[str, OutputStats]
    groups: tuple[GroupVerdict, ...]
    #: The names of the nodes each kept rewrite made, by candidate key.
    made: dict[str, frozenset[str]]
    #: Seconds the latency judgement (and any re-proof of numerics) took.
    seconds: float = 0.0


class _Bisection:
    """Judges groups of a round against the model before them, splitting the slower ones."""

    def __init__(self, p: Pass, judge: Judge, made: dict[str, frozenset[str]]) -> None:
        self.p, self.judge = p, judge
        self.made = dict(made)
        self.groups: list[GroupVerdict] = []

    def time(self, base: Model, group: Model) -> tuple[tuple[ProfileLatency, ...], str | None]:
        """The group against ``base`` at each profile (stopping at the first it is slower at), and that profile."""
        cfg = self.judge.config
        measured: list[ProfileLatency] = []
        for profile in cfg.deployments:
            lat = settled(self.judge, base, group, cfg.exact_min_speedup, True, None, profile)
            measured.append(ProfileLatency(profile, lat, "round"))
            if lat.ci.slower(cfg.exact_min_speedup):
                return tuple(measured), profile.label
        return tuple(measured), None

    def settle(self, base: Model, cands: Sequence[Candidate], group: Model | None = None) -> Model:
        """Keep what of ``cands`` (applied on ``base`` in order) is not shown slower; the model left."""
        if group is None:
            done = apply_candidates(self.p, base, cands)
            self.made.update(done.made)
            group = done.model
        elif self.judge.same_deployed(base.proto, group.proto):  # the whole round: what onnxruntime does anyway?
            log.info("%s: the round's %d rewrites leave onnxruntime's deployed graph as it was; not timed", self.p.name, len(cands))
            self.groups.append(GroupVerdict(tuple(cands), (), None, same_deployed=True))
            return group
        profiles, slower_at = self.time(base, group)
        if slower_at is None or len(cands) == 1:
            self.groups.append(GroupVerdict(tuple(cands), profiles, slower_at))
            return group if slower_at is None else base
        half = len(cands) // 2
        log.info("%s: a group of %d rewrites is slower (%s); bisecting", self.p.name, len(cands), profiles[-1].latency.ci)
        return self.settle(self.settle(base, cands[:half]), cands[half:])


def settle_round(p: Pass, model: Model, proof: RoundProof, judge: Judge, deadline: Deadline) -> SettledRound | None:
    """Judge a proven round's latency as a group, bisecting where it is slower (see the module docstring).
    Without latency measurement the proven round is kept as it is (its numerics are the whole judgement).
    ``None`` when the round cannot be judged as a group (a rewrite that lowers neither MACs nor the node
    count, no time left) or a rewrite raises while re-applied: the search then proves the round's rewrites
    one by one."""
    if proof.model is None or not deadline.fits():
        return None
    if not judge.config.latency or judge.deferred:
        group = GroupVerdict(proof.applied, (), None, measured=False, deferred=judge.config.latency)
        return SettledRound(proof.model, proof.numerics, (group,), dict(proof.made))
    if not proof.reducing:
        return None
    began = time.perf_counter()
    bisection = _Bisection(p, judge, proof.made)
    try:
        final = bisection.settle(model, proof.applied, proof.model)
    except Exception as exc:
        log.info("%s: round not settled as a group (%s: %s); proving each alone", p.name, type(exc).__name__, exc)
        return None
    numerics = proof.numerics
    if final is not proof.model and final is not model:
        numerics = judge.numerics(final.proto)  # what is kept is not what was proven: prove it
        failures = judge.config.budget.failures(numerics, exact=True)
        if failures:
            log.info("%s: the round's kept part fails the exact budget (%s); proving each alone", p.name, "; ".join(failures))
            return None
    return SettledRound(final, numerics, tuple(bisection.groups), bisection.made, time.perf_counter() - began)


def settle_speculative(p: Pass, model: Model, todo: Sequence[Candidate], judge: Judge, deadline: Deadline) -> SettledRound | None:
    """In a run proven on its result (:attr:`Judge.deferred`), a round of exact rewrites that each lower neither MACs
    nor nodes, timed as ONE group: all applied, the union of their regions timed before and after at each profile.
    Shown faster everywhere: all kept (their numerics judged with the whole result); not: all rolled back, on
    that one timing -- what one-by-one timing would mostly do at one timing each. ``None`` (the round is judged
    one by one) outside a deferred run, for fewer than two, when some rewrite lowers MACs or nodes, or when
    the union cannot be extracted as a region."""
    if not (judge.deferred and judge.config.latency and p.exact and len(todo) >= 2) or not deadline.fits():
        return None
    began = time.perf_counter()
    try:
        done = apply_candidates(p, model, todo, deadline.search_over)
        if len(done.candidates) < 2 or done.speculative != frozenset(c.key for c in done.candidates):
            return None
        nodes = tuple(dict.fromkeys(n for c in done.candidates for n in c.nodes))
        union = Candidate(p.name, nodes, f"{len(done.candidates)} rewrites together", done.candidates[0].cost)
        measured: list[ProfileLatency] = []
        slower_at = None
        for profile in judge.config.deployments:
            lat = judge.region_latency(model, done.model, union, profile)
            measured.append(ProfileLatency(profile, lat, "subgraph"))
            if not lat.ci.faster(judge.config.lossy_min_speedup):
                slower_at = profile.label
                break
    except Exception as exc:  # noqa: BLE001 -- each is then timed alone, and a fault named
        log.info("%s: round not timed as a group (%s: %s); each alone", p.name, type(exc).__name__, exc)
        return None
    group = GroupVerdict(done.candidates, tuple(measured), slower_at, measured=True, speculative=True)
    log.info("%s: %d rewrites that lower neither MACs nor nodes, timed together: %s", p.name, len(done.candidates), measured[-1].latency.ci)
    kept = done.model if slower_at is None else model
    return SettledRound(kept, {}, (group,), dict(done.made) if slower_at is None else {}, time.perf_counter() - began)


def _speculative_decision(cand: Candidate, group: GroupVerdict, seconds: float) -> Decision:
    lat, size = group.profiles[-1].latency, len(group.candidates)
    many = "".join(f"; {p.profile.label}: {p.latency.ci}" for p in group.profiles[1:])
    if group.slower_at is not None:
        where = f" at {group.slower_at}" if len(group.profiles) > 1 or group.profiles[0].profile.label != group.slower_at else ""
        reason = f"lowers neither MACs nor node count, and no speedup shown with its round of {size} (subgraph speedup {lat.ci}{where})"
        verdict = Verdict(False, reason, {}, group.profiles[0].latency, "subgraph", seconds=seconds, outcome=Outcome.LATENCY)
        return Decision(cand, True, Outcome.LATENCY, reason, verdict)
    reason = f"exact, shown faster with its round of {size} (subgraph speedup {group.profiles[0].latency.ci}{many}); numerics {DEFERRED}"
    return Decision(cand, True, Outcome.KEPT, reason, Verdict(True, reason, {}, group.profiles[0].latency, "subgraph", seconds=seconds))


def round_decision(cand: Candidate, group: GroupVerdict, settled_round: SettledRound, round_size: int) -> Decision:
    """The decision on one rewrite of a round judged as a group: kept on its group's measurement, or -- a
    single rewrite shown slower -- rolled back; the group's time shared among its rewrites."""
    lat, many = group.latency, len(group.profiles) > 1
    seconds = settled_round.seconds / max(1, round_size)
    if group.speculative:
        return _speculative_decision(cand, group, seconds)
    if not group.measured:
        reason = (f"exact (with its round of {round_size}): numerics and latency {DEFERRED}" if group.deferred
                  else "numerics proven with its round (latency not measured)")
        verdict = Verdict(True, reason, settled_round.numerics, seconds=seconds, latency_scope="deferred" if group.deferred else None)
        return Decision(cand, True, Outcome.KEPT, reason, verdict)
    if group.same_deployed:
        reason = (f"exact (numerics proven with its round of {round_size}); latency unchanged by construction: onnxruntime's "
                  "optimizer runs the same graph with the round as without it (not timed)")
        return Decision(cand, True, Outcome.KEPT, reason, Verdict(True, reason, settled_round.numerics, seconds=seconds))
    others = "".join(f"; {p.profile.label}: {p.latency.ci}" for p in group.profiles[1:])
    if group.slower_at is not None:
        where = f" at {group.slower_at}" if many else ""
        reason = f"slower: round speedup {group.profiles[-1].latency.ci}{where} (found by bisecting a round of {round_size})"
        verdict = Verdict(False, reason, settled_round.numerics, lat, "round", seconds=seconds, outcome=Outcome.LATENCY,
                          profiles=group.profiles if many else ())
        return Decision(cand, True, Outcome.LATENCY, reason, verdict)
    size = len(group.candidates)
    reason = (f"exact (numerics and latency proven with its round: {size} of {round_size} rewrites together), "
              f"round speedup {lat.ci}{others}")
    verdict = Verdict(True, reason, settled_round.numerics, lat, "round", seconds=seconds, profiles=group.profiles if many else ())
    return Decision(cand, True, Outcome.KEPT, reason, verdict)
