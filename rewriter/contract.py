"""The pass contract.

A pass looks at a :class:`~rewriter.model.Model` and yields, for each place it could rewrite, either a
:class:`Candidate` (what it would change and what that saves) or a :class:`Skip` (why it declines).
Applying one candidate edits a forked model's graph in place. Passes know nothing of onnxruntime,
latency or budgets: judging a rewrite is the pipeline's job.

Rules every ``apply`` follows:

* the tensors the region hands to the rest of the graph keep their names (so the pipeline can compare
  the region before and after, and nothing downstream has to be rewired);
* new nodes get fresh names (so stale candidates are detected by name);
* constant arrays are never modified in place -- new values go into new initializers.

Passes written in the pattern / check / rewrite style derive from :class:`PatternPass`, which turns
those three steps into ``find`` and ``apply``.

Services a pass needs beyond the model are handed to it explicitly. A *data-aware* pass (``data_aware``)
fits to activations on calibration feeds: before a run the caller gives it a :class:`CalibrationData`
(or ``None`` when there is no calibration data) through :meth:`Pass.use_calibration`. The protocol is all
the pass sees of it; ``rewriter.validation.calibration.Calibration`` implements it.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.model import Model


class RewriteError(Exception):
    """A candidate can no longer be applied (the graph changed since it was found), or applying it failed."""


@dataclass(frozen=True)
class Cost:
    """Estimated multiply-accumulates and parameters of the touched nodes, before and after."""

    macs_before: int
    macs_after: int
    params_before: int
    params_after: int

    @property
    def macs_saved(self) -> int:
        return self.macs_before - self.macs_after

    def rise_reason(self, *, allow_equal: bool) -> str | None:
        """Why a fusion should not be applied on MACs alone (shapes unknown, or MACs would rise), or None."""
        if self.macs_before == 0:
            return "output shapes unknown; cannot tell whether fusing lowers MACs"
        if self.macs_after > self.macs_before or (not allow_equal and self.macs_after == self.macs_before):
            return f"fusing would raise MACs from {self.macs_before} to {self.macs_after}"
        return None


@dataclass(frozen=True)
class Candidate:
    """One possible rewrite."""

    pass_name: str
    nodes: tuple[str, ...]
    description: str
    cost: Cost
    #: Knobs of lossy passes (e.g. ``{"rank": 32}``); JSON-serialisable.
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Order of trial, highest first (e.g. MACs saved per unit of estimated error); default: MACs saved.
    priority: float | None = None
    #: Candidates that are variants of one rewrite (e.g. one conv at several ranks) share a family;
    #: ``level`` orders them by aggressiveness. The pipeline tries a family's variants together, the most
    #: aggressive first, and once one fails numerics skips those at the same or a higher level.
    family: str | None = None
    level: float = 0.0
    #: The pass's own estimate of the relative error this rewrite adds (lossy passes), comparable between
    #: variants of one family: the pipeline scales a family's measured error by it (see ``screen``).
    error: float | None = None
    #: Estimates of one kind are on one scale (the bottleneck pass: one per mode); screening rescales each
    #: kind by what it measures before trusting estimates across kinds.
    kind: str = ""

    @property
    def key(self) -> str:
        """Identity of a candidate across re-finds: pass, nodes and options."""
        return json.dumps([self.pass_name, list(self.nodes), dict(self.options)], sort_keys=True)


@dataclass(frozen=True)
class Skip:
    """A place a pass looked at and declined, with the reason."""

    pass_name: str
    nodes: tuple[str, ...]
    reason: str


T = TypeVar("T")


@runtime_checkable
class CalibrationData(Protocol):
    """Activations of the model on calibration feeds: what a data-aware pass may ask for.

    Tensors are asked for by name, of a given model version (the original, or a fork or commit of it);
    the service runs the model and never shows the pass onnxruntime. What a pass derives from activations
    is cached here too, so that later versions, and other candidates, reuse it:

    * :meth:`memo` -- per model version and key (kept for the current version and the original);
    * :meth:`lasting` -- across versions, keyed by a :meth:`lineage` (a digest of everything upstream of a
      tensor: two versions with the same lineage give the tensor the same values).
    """

    @property
    def original(self) -> Model:
        """The model the calibration feeds were first run through: the reference a fit reproduces."""

    @property
    def feeds(self) -> Sequence[Mapping[str, np.ndarray]]:
        """The calibration feeds, ``{input name: array}`` each."""

    def moments(self, model: Model, names: Sequence[str], flops_per_feed: float = 5e7) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per tensor ``x`` ``[N, C, ...]`` of ``model``: the channel mean ``E[x]`` ``[C]`` and the uncentred
        second moment ``E[x x^T]`` ``[C, C]`` over every feed and position (large maps subsampled on an even
        spatial grid of about ``flops_per_feed / C^2`` positions per feed)."""

    def map(self, model: Model, names: Sequence[str], fn: Callable[[int, dict[str, np.ndarray]], T]) -> list[T]:
        """``[fn(k, {name: tensor on feed k}) for every feed k]`` in one run of ``model``; the tensors are not
        kept (samples drawn from every feed without holding whole activations)."""

    def memo(self, model: Model, key: str, compute: Callable[[], T], *, while_current: bool = False) -> T:
        """``compute()`` once per model version and ``key``; ``while_current``: dropped as soon as another
        version is worked on, even for the original."""

    def cached(self, model: Model, key: str) -> bool:
        """Whether :meth:`memo` holds ``key`` for this version."""

    def lasting(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per ``key`` across versions (least recently used entries dropped beyond a size)."""

    def has_lasting(self, key: str) -> bool:
        """Whether :meth:`lasting` holds ``key``."""

    def lineage(self, model: Model, tensor: str) -> str:
        """A digest of the names, ops and inputs of every node upstream of ``tensor`` in ``model``."""


class Pass(abc.ABC):
    """Base of every pass. Subclasses set ``name``, ``summary`` and ``exact``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    #: Exact passes keep outputs equal up to float rounding; lossy ones need a numerics budget.
    exact: ClassVar[bool]
    #: Data-aware passes fit to activations on calibration feeds: callers hand them the calibration
    #: service through :meth:`use_calibration` before a run. Others never get it.
    data_aware: ClassVar[bool] = False
    #: The calibration service handed over by :meth:`use_calibration`; ``None``: none given (weight-only fits).
    calibration: CalibrationData | None = None

    def use_calibration(self, calibration: CalibrationData | None) -> None:
        """Hand this data-aware pass the calibration data for the run that follows (``None``: there is none,
        or it was withdrawn). Default: kept as ``self.calibration``."""
        self.calibration = calibration

    @abc.abstractmethod
    def find(self, model: Model) -> Iterator[Candidate | Skip]:
        """Yield a candidate or a skip for every place this pass could act. Must not edit ``model``."""

    @abc.abstractmethod
    def apply(self, model: Model, candidate: Candidate) -> None:
        """Apply one candidate to ``model.graph`` (a fork). Raise :class:`RewriteError` if it is stale."""

    def refresh(self, model: Model, candidate: Candidate) -> Candidate | None:
        """A candidate whose nodes an earlier rewrite of *this pass* replaced, re-expressed against
        ``model`` (e.g. a more aggressive variant replacing a milder one already kept), or ``None`` when
        it no longer applies. Default: ``None``."""
        return None

    def prefetch(self, model: Model, candidates: list[Candidate]) -> None:
        """Called before several of ``candidates`` are applied, each alone, to forks of ``model``: a
        data-aware pass can gather the calibration data they need in one run. Default: nothing."""

    def __repr__(self) -> str:
        return f"<pass {self.name} ({'exact' if self.exact else 'lossy'})>"


M = TypeVar("M")


# -- pattern passes: rule sets and the one-rule case ------------------------------------------------
#
# Passes written in the pattern / check / rewrite style derive from :class:`PatternPass` (one pattern,
# the pass is its own rule) or :class:`RuleSetPass` (a set of :class:`Rule` objects tried in order at
# each node); both turn those three steps into ``find`` and ``apply``.


class Rule(abc.ABC, Generic[M]):
    """One rewrite pattern in three separate steps (onnxscript's ``RewriteRule``).

    * ``match(model, node)``: the structure around an anchor node, or ``None`` if it is not this pattern;
    * ``check(model, match)``: ``None`` when every precondition holds, else the reason it does not;
    * ``rewrite(model, match)``: edit the graph.

    ``describe`` and ``cost`` give the candidate's text and estimated savings; ``nodes`` the touched nodes.
    ``label`` names the rule in the skip reasons of a pass with several rules ("" for none).
    """

    label: ClassVar[str] = ""

    @abc.abstractmethod
    def match(self, model: Model, node: gs.Node) -> M | None: ...

    @abc.abstractmethod
    def check(self, model: Model, match: M) -> str | None: ...

    @abc.abstractmethod
    def rewrite(self, model: Model, match: M) -> None: ...

    @abc.abstractmethod
    def nodes(self, match: M) -> tuple[gs.Node, ...]: ...

    @abc.abstractmethod
    def describe(self, model: Model, match: M) -> str: ...

    @abc.abstractmethod
    def cost(self, model: Model, match: M) -> Cost: ...

    def anchor(self, candidate: Candidate) -> str:
        """The node name ``match`` is called on when re-matching a candidate (its first node by default)."""
        return candidate.nodes[0]


class RuleSetPass(Pass):
    """A pass made of a set of rules (onnxscript's ``RewriteRuleSet``), which turns them into ``find`` and
    ``apply``.

    ``find`` visits every node and tries the rules in order: a rule that matches but fails its check
    yields a :class:`Skip` (its reason prefixed by the rule's label, if any; a reason already reported at
    this node is not repeated) and the next rule is tried; the first rule whose check passes yields the
    node's :class:`Candidate` and ends the search there. ``apply`` recovers the rule that made a
    candidate by re-matching each rule at its anchor (:meth:`recover`).
    """

    @abc.abstractmethod
    def rules(self) -> tuple[Rule[Any], ...]:
        """The rules, in the order they are tried at each node."""

    def _reason(self, rule: Rule[Any], reason: str) -> str:
        return f"{rule.label}: {reason}" if rule.label else reason

    def find(self, model: Model) -> Iterator[Candidate | Skip]:
        rules = self.rules()
        for node in list(model.graph.nodes):
            reasons: set[str] = set()
            for rule in rules:
                m = rule.match(model, node)
                if m is None:
                    continue
                names = tuple(n.name for n in rule.nodes(m))
                reason = rule.check(model, m)
                if reason is not None:
                    if reason not in reasons:
                        reasons.add(reason)
                        yield Skip(self.name, names, self._reason(rule, reason))
                    continue
                yield Candidate(self.name, names, rule.describe(model, m), rule.cost(model, m))
                break

    def recover(self, model: Model, candidate: Candidate) -> tuple[Rule[Any], Any] | None:
        """The first rule, and its match, that matches at the candidate's anchor with the candidate's
        nodes; ``None`` when no rule does any more (the candidate is stale)."""
        for rule in self.rules():
            node = model.node(rule.anchor(candidate))
            if node is None:
                continue
            m = rule.match(model, node)
            if m is not None and tuple(n.name for n in rule.nodes(m)) == candidate.nodes:
                return rule, m
        return None

    def apply(self, model: Model, candidate: Candidate) -> None:
        found = self.recover(model, candidate)
        if found is None:
            raise RewriteError(f"{self.name}: pattern at {candidate.nodes} no longer matches")
        rule, m = found
        reason = rule.check(model, m)
        if reason is not None:
            raise RewriteError(f"{self.name}: {self._reason(rule, reason)}")
        rule.rewrite(model, m)


class PatternPass(RuleSetPass, Rule[M]):
    """A pass with a single pattern: the pass is its own (one) rule, written as the three steps of
    :class:`Rule` (``match`` / ``check`` / ``rewrite``, with ``nodes``, ``describe`` and ``cost``)."""

    def rules(self) -> tuple[Rule[Any], ...]:
        return (self,)
