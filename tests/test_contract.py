"""rewriter.contract: the rule-set base (``RuleSetPass``) and its one-rule case (``PatternPass``) on toy
rules over a tiny ONNX-text graph."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_graphsurgeon as gs
import pytest

from rewriter.contract import Candidate, Cost, PatternPass, RewriteError, Rule, RuleSetPass, Skip
from rewriter.graph import NameFactory, replace_nodes
from rewriter.model import Model
from tests.helpers import assert_same_outputs, ops, parse

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] X) => (float[2, 3] Y)
{
    A = Relu (X)
    B = Relu (A)
    Y = Neg (B)
}
"""


def toy_model() -> Model:
    return Model.from_source(parse(TEXT))


class ReluPair(Rule[tuple[gs.Node, gs.Node]]):
    """Relu -> Relu becomes ``into`` (Relu: exact; Neg makes a visible, wrong rewrite to tell rules apart)."""

    def __init__(self, label: str = "", reason: str | None = None, into: str = "Relu") -> None:
        self.label = label  # type: ignore[misc]
        self.reason = reason
        self.into = into
        self.rewrites = 0

    def match(self, model: Model, node: gs.Node) -> tuple[gs.Node, gs.Node] | None:
        if node.op != "Relu" or len(node.outputs[0].outputs) != 1:
            return None
        user = node.outputs[0].outputs[0]
        return (node, user) if user.op == "Relu" else None

    def nodes(self, match: tuple[gs.Node, gs.Node]) -> tuple[gs.Node, ...]:
        return match

    def check(self, model: Model, match: tuple[gs.Node, gs.Node]) -> str | None:
        return self.reason

    def describe(self, model: Model, match: tuple[gs.Node, gs.Node]) -> str:
        return f"{self.label or 'pair'}: {match[0].name} + {match[1].name} -> {self.into}"

    def cost(self, model: Model, match: tuple[gs.Node, gs.Node]) -> Cost:
        return Cost(2, 1, 0, 0)

    def rewrite(self, model: Model, match: tuple[gs.Node, gs.Node]) -> None:
        self.rewrites += 1
        first, second = match
        names = NameFactory(model.graph)
        node = gs.Node(self.into, name=names(f"{first.name}_{self.into.lower()}"), inputs=[first.inputs[0]],
                       outputs=list(second.outputs))
        replace_nodes(model.graph, [first, second], [node])


class LastRelu(ReluPair):
    """The same pair, anchored at its last node (the second Relu)."""

    def anchor(self, candidate: Candidate) -> str:
        return candidate.nodes[-1]

    def match(self, model: Model, node: gs.Node) -> tuple[gs.Node, gs.Node] | None:
        if node.op != "Relu" or not node.inputs[0].inputs:
            return None
        first = node.inputs[0].inputs[0]
        return (first, node) if first.op == "Relu" and len(first.outputs[0].outputs) == 1 else None


class Toys(RuleSetPass):
    name = "toys"
    summary = "toy rule set"
    exact = True

    def __init__(self, *rules: Rule[Any]) -> None:
        self._rules = rules

    def rules(self) -> Sequence[Rule[Any]]:
        return self._rules


class SinglePair(PatternPass[tuple[gs.Node, gs.Node]]):
    """The one-rule case: the pass is its own rule (borrowing ReluPair's steps)."""

    name = "single_pair"
    summary = "toy pattern pass"
    exact = True

    def __init__(self, reason: str | None = None) -> None:
        self._pair = ReluPair(reason=reason)

    def match(self, model, node):  # type: ignore[no-untyped-def]
        return self._pair.match(model, node)

    def nodes(self, match):  # type: ignore[no-untyped-def]
        return self._pair.nodes(match)

    def check(self, model, match):  # type: ignore[no-untyped-def]
        return self._pair.check(model, match)

    def describe(self, model, match):  # type: ignore[no-untyped-def]
        return self._pair.describe(model, match)

    def cost(self, model, match):  # type: ignore[no-untyped-def]
        return self._pair.cost(model, match)

    def rewrite(self, model, match):  # type: ignore[no-untyped-def]
        self._pair.rewrite(model, match)


def apply_and_commit(p: RuleSetPass, model: Model, cand: Candidate) -> Model:
    fork = model.fork()
    p.apply(fork, cand)
    return fork.commit()


# -- the one-rule case ---------------------------------------------------------------------------------


def test_pattern_pass_is_a_one_rule_set() -> None:
    p = SinglePair()
    assert list(p.rules()) == [p]
    model = toy_model()
    (cand,) = list(p.find(model))
    assert cand == Candidate("single_pair", ("Relu_0", "Relu_1"), "pair: Relu_0 + Relu_1 -> Relu", Cost(2, 1, 0, 0))
    after = apply_and_commit(p, model, cand)
    assert ops(after.proto) == {"Neg": 1, "Relu": 1}
    assert_same_outputs(model.proto, after.proto)


def test_pattern_pass_skip_and_stale_reasons_carry_no_label() -> None:
    model = toy_model()
    assert list(SinglePair("no").find(model)) == [Skip("single_pair", ("Relu_0", "Relu_1"), "no")]
    cand = Candidate("single_pair", ("Relu_0", "Relu_1"), "", Cost(2, 1, 0, 0))
    with pytest.raises(RewriteError, match=r"^single_pair: no$"):
        SinglePair("no").apply(model.fork(), cand)
    stale = Candidate("single_pair", ("Relu_1", "Neg_2"), "", Cost(2, 1, 0, 0))
    with pytest.raises(RewriteError, match="no longer matches"):
        SinglePair().apply(model.fork(), stale)


# -- several rules --------------------------------------------------------------------------------------


def test_first_passing_rule_makes_the_candidate_and_ends_the_search() -> None:
    failing, winning, later = ReluPair("a", reason="too big"), ReluPair("b", into="Neg"), ReluPair("c")
    found = list(Toys(failing, winning, later).find(toy_model()))
    assert found == [
        Skip("toys", ("Relu_0", "Relu_1"), "a: too big"),
        Candidate("toys", ("Relu_0", "Relu_1"), "b: Relu_0 + Relu_1 -> Neg", Cost(2, 1, 0, 0)),
    ]


def test_a_reason_is_reported_once_per_anchor() -> None:
    found = list(Toys(ReluPair("a", reason="same"), ReluPair("b", reason="same"), ReluPair("c", reason="other")).find(toy_model()))
    assert [s.reason for s in found if isinstance(s, Skip)] == ["a: same", "c: other"]
    assert not any(isinstance(c, Candidate) for c in found)


def test_apply_recovers_the_rule_that_made_the_candidate() -> None:
    failing, winning = ReluPair("a", reason="too big", into="Relu"), ReluPair("b", into="Neg")
    p = Toys(failing, winning)
    model = toy_model()
    (cand,) = [c for c in p.find(model) if isinstance(c, Candidate)]
    # Re-matching at the anchor: rule "a" matches the same nodes first, but its check fails there.
    with pytest.raises(RewriteError, match=r"^toys: a: too big$"):
        p.apply(model.fork(), cand)
    # Without the failing rule in front, re-matching recovers rule "b", which made the candidate.
    p2 = Toys(winning)
    rule, match = p2.recover(model, cand)  # type: ignore[misc]
    assert rule is winning and tuple(n.name for n in match) == cand.nodes
    after = apply_and_commit(p2, model, cand)
    assert winning.rewrites == 1 and ops(after.proto) == {"Neg": 2}


def test_recover_skips_rules_whose_match_differs_and_uses_each_rules_anchor() -> None:
    first, last = ReluPair("first"), LastRelu("last", into="Neg")
    p = Toys(first, last)
    model = toy_model()
    cand = Candidate("toys", ("Relu_0", "Relu_1"), "", Cost(2, 1, 0, 0))
    assert p.recover(model, cand)[0] is first  # type: ignore[index]
    # A rule anchored at the last node re-matches there.
    only_last = Toys(last)
    (found,) = list(only_last.find(model))
    assert isinstance(found, Candidate) and found.nodes == ("Relu_0", "Relu_1")
    rule, _ = only_last.recover(model, found)  # type: ignore[misc]
    assert rule is last
    assert ops(apply_and_commit(only_last, model, found).proto) == {"Neg": 2}


def test_stale_candidate_of_a_rule_set() -> None:
    p = Toys(ReluPair("a"), LastRelu("b"))
    model = toy_model()
    # Each rule finds the pair at its own anchor: two candidates for the same nodes.
    cands = [c for c in p.find(model) if isinstance(c, Candidate)]
    assert [c.nodes for c in cands] == [("Relu_0", "Relu_1")] * 2
    cand = cands[0]
    after = apply_and_commit(p, model, cand)
    assert p.recover(after, cand) is None
    with pytest.raises(RewriteError, match=r"^toys: pattern at \('Relu_0', 'Relu_1'\) no longer matches$"):
        p.apply(after.fork(), cand)
    wrong_nodes = Candidate("toys", ("Relu_0",), "", Cost(2, 1, 0, 0))
    assert p.recover(model, wrong_nodes) is None


def test_find_does_not_edit_the_model() -> None:
    model = toy_model()
    before = model.proto.SerializeToString()
    list(Toys(ReluPair("a", reason="r"), ReluPair("b")).find(model))
    assert model.proto.SerializeToString() == before
    assert [n.name for n in model.graph.nodes] == ["Relu_0", "Relu_1", "Neg_2"]


def test_rule_set_pass_needs_its_rules() -> None:
    class NoRules(RuleSetPass):
        name, summary, exact = "none", "", True

    with pytest.raises(TypeError):
        NoRules()  # type: ignore[abstract]
