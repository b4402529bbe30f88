"""Every pass of ``passes.ALL_PASSES`` against the rules of the pass contract (``rewriter/contract.py``),
through its public ``find`` / ``apply`` only, on small models where each pass has candidates:

* ``find`` does not edit the model (its proto bytes and its graph view are unchanged);
* after ``apply`` (on a fork) and commit, the tensors the region hands to the rest of the graph keep their
  names: the graph outputs, and every tensor a node outside the touched ones reads (which still reads it);
* new nodes get fresh names: no name of the old graph is reused for a different node;
* constant arrays of the input model are never modified in place: every initializer and ``Constant``
  value that still exists under its name after the rewrite holds the same array, and the input model
  itself is unchanged.

The checker must be able to fail: deliberately broken toy passes (one per rule) are caught.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from models.repvgg import build_repvgg
from models.sample import build_sample
from passes import ALL_PASSES, MergeParallelBranches
from rewriter.contract import Candidate, Cost, Pass, PatternPass
from rewriter.graph import NameFactory, const_value, constant, replace_nodes
from rewriter.model import Model
from rewriter.pipeline import apply_pass
from tests.helpers import parse

#: Candidates applied per pass and model (spread over the pass's list), to keep the test short.
MAX_APPLIED = 6

# -- models ------------------------------------------------------------------------------------------------

#: KxK -> 1x1 (fuse_kxk_1x1), 1x1 -> KxK without padding (fuse_1x1_kxk), a per-channel Mul after a conv
#: (fold_batchnorm), dense KxK convs (bottleneck).
PAIRS = """
<ir_version: 8, opset_import: ["" : 17]>
pairs (float[1, 8, 12, 12] X) => (float[1, 8, 10, 10] Y, float[1, 8, 10, 10] Z)
<float[32, 8, 3, 3] Wa, float[32] Ba, float[8, 32, 1, 1] Wb, float[8] Bb, float[16, 8, 1, 1] Wc, float[16] Bc,
 float[8, 16, 3, 3] Wd, float[8] Bd, float[8, 1, 1] S>
{
    A = Conv <kernel_shape = [3, 3]> (X, Wa, Ba)
    Y = Conv (A, Wb, Bb)
    C = Conv (X, Wc, Bc)
    D = Conv <kernel_shape = [3, 3]> (C, Wd, Bd)
    Z = Mul (D, S)
}
"""

#: A 1x1 conv on a 1x1 input into a Gemm head, a Gemm chain, and 1x1 convs alone on a 1x1 input, one of
#: them a graph output (conv1x1_to_gemm); two 1x1 convs in a row (fuse_1x1_chain sees them).
HEAD = """
<ir_version: 8, opset_import: ["" : 17]>
head (float[2, 16, 7, 7] X) => (float[2, 10] Y, float[2, 16, 1, 1] S)
<float[32, 16, 1, 1] W1, float[32] B1, float[64, 32] G1, float[64] C1, float[64, 10] G2, float[10] C2,
 float[8, 16, 1, 1] W3, float[8] B3, float[16, 8, 1, 1] W4, float[16] B4>
{
    P = GlobalAveragePool (X)
    Q = Conv (P, W1, B1)
    F = Flatten <axis = 1> (Q)
    H = Gemm <transB = 1> (F, G1, C1)
    Y = Gemm (H, G2, C2)
    R = Conv (P, W3, B3)
    S = Conv (R, W4, B4)
}
"""

#: Summed branches with a BN identity (sum), convs concatenated (concat), siblings feeding different
#: consumers (split, with ``split_siblings``); the summed root is also a graph output.
BRANCHES = """
<ir_version: 8, opset_import: ["" : 17]>
branches (float[1, 8, 10, 10] X) => (float[1, 8, 10, 10] Y, float[1, 16, 10, 10] Z, float[1, 8, 10, 10] V)
<float[8, 8, 3, 3] W3, float[8] B3, float[8, 8, 1, 1] W1, float[8] B1, float[8] g, float[8] b, float[8] m,
 float[8] var, float[8, 8, 3, 3] Wa, float[8] Ba, float[8, 8, 3, 3] Wb, float[8] Bb, float[8, 8, 1, 1] Wp,
 float[8, 8, 1, 1] Wq>
{
    T3 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W3, B3)
    T1 = Conv (X, W1, B1)
    U = Add (T3, T1)
    N = BatchNormalization (X, g, b, m, var)
    Y = Add (U, N)
    R = Relu (Y)
    Ca = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (R, Wa, Ba)
    Cb = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (R, Wb, Bb)
    Z = Concat <axis = 1> (Ca, Cb)
    Pa = Conv (R, Wp)
    Pb = Conv (R, Wq)
    Ra = Relu (Pa)
    Rb = Sigmoid (Pb)
    V = Mul (Ra, Rb)
}
"""


def repvgg_folded() -> onnx.ModelProto:
    """RepVGG with its BNs folded: summed conv + identity-BN branches for merge_parallel_branches."""
    return apply_pass(build_repvgg(seed=0), "fold_batchnorm").model


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "sample": lambda: build_sample(seed=0),
    "repvgg": lambda: build_repvgg(seed=0),
    "repvgg_folded": repvgg_folded,
    "pairs": lambda: parse(PAIRS),
    "head": lambda: parse(HEAD),
    "branches": lambda: parse(BRANCHES),
}

#: Every registered pass with its default options, and the option-gated rewrite of merge_parallel_branches.
PASSES: dict[str, Callable[[], Pass]] = {
    **{cls.name: cls for cls in ALL_PASSES},
    "merge_parallel_branches[split_siblings]": lambda: MergeParallelBranches(split_siblings=True),
}


@pytest.fixture(scope="module")
def models() -> dict[str, onnx.ModelProto]:
    return {name: build() for name, build in MODELS.items()}


# -- the checker ---------------------------------------------------------------------------------------------


def _digest(values: Any) -> tuple[str, tuple[int, ...], str]:
    a = np.asarray(values)
    return str(a.dtype), tuple(a.shape), hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def _attr_key(value: Any) -> Any:
    if isinstance(value, gs.Tensor):
        return ("tensor", value.name, _digest(value.values) if isinstance(value, gs.Constant) else None)
    if isinstance(value, gs.Graph):
        return ("graph", value.name)
    if isinstance(value, np.ndarray):
        return _digest(value)
    return repr(value)


def graph_view(graph: gs.Graph) -> tuple[Any, ...]:
    """Everything a pass could edit in a graph view: nodes (names, ops, attributes, wiring), the graph's
    inputs and outputs, and the value of every constant."""
    nodes = tuple(
        (n.name, n.op, tuple(sorted((k, _attr_key(v)) for k, v in n.attrs.items())),
         tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs))
        for n in graph.nodes
    )
    consts = tuple(sorted((name, _digest(t.values)) for name, t in graph.tensors().items() if isinstance(t, gs.Constant)))
    return nodes, tuple(t.name for t in graph.inputs), tuple(t.name for t in graph.outputs), consts


def constants(proto: onnx.ModelProto) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Digest of every initializer and ``Constant`` node value, by tensor name."""
    out = {t.name: _digest(numpy_helper.to_array(t)) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = _digest(numpy_helper.to_array(attr.t))
                elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
                    out[node.output[0]] = repr(onnx.helper.get_attribute_value(attr))  # type: ignore[assignment]
    return out


def region_outputs(proto: onnx.ModelProto, touched: set[str]) -> dict[str, set[str]]:
    """Tensors the touched nodes hand to the rest of the graph, each with the untouched nodes reading it."""
    graph_outputs = {o.name for o in proto.graph.output}
    produced = {t for n in proto.graph.node if n.name in touched for t in n.output if t}
    out = {t: set() for t in produced & graph_outputs}
    for node in proto.graph.node:
        if node.name in touched:
            continue
        for t in node.input:
            if t in produced:
                out.setdefault(t, set()).add(node.name)
    return out


def rewrite_violations(before: onnx.ModelProto, after: onnx.ModelProto, candidate: Candidate) -> list[str]:
    """What a committed rewrite of ``candidate`` broke of the contract (empty when nothing)."""
    problems: list[str] = []
    touched = set(candidate.nodes)
    old_nodes = {n.name: n for n in before.graph.node}
    new_nodes = {n.name: n for n in after.graph.node}
    missing = touched - set(old_nodes)
    if missing:
        problems.append(f"candidate names nodes not in the graph: {sorted(missing)}")
    # Region outputs keep their names.
    if [o.name for o in after.graph.output] != [o.name for o in before.graph.output]:
        problems.append(f"graph outputs renamed: {[o.name for o in before.graph.output]} -> {[o.name for o in after.graph.output]}")
    produced = {t for n in after.graph.node for t in n.output} | {i.name for i in after.graph.input} | {
        t.name for t in after.graph.initializer}
    for tensor, readers in region_outputs(before, touched).items():
        if tensor not in produced:
            problems.append(f"region output {tensor!r} is no longer produced")
        for reader in readers:
            node = new_nodes.get(reader)
            if node is None or tensor not in node.input:
                problems.append(f"{reader} no longer reads region output {tensor!r}")
    # Fresh names: an old name is only ever the same, untouched node.
    names = [n.name for n in after.graph.node]
    if len(names) != len(set(names)):
        problems.append("node names are not unique after the rewrite")
    for name in set(new_nodes) & set(old_nodes):
        old, new = old_nodes[name], new_nodes[name]
        if name in touched or (old.op_type, list(old.input), list(old.output)) != (new.op_type, list(new.input), list(new.output)):
            problems.append(f"node name {name!r} of the old graph reused for a different node")
    # Constants are never modified in place.
    old_consts, new_consts = constants(before), constants(after)
    for name in set(old_consts) & set(new_consts):
        if old_consts[name] != new_consts[name]:
            problems.append(f"constant {name!r} modified in place")
    return problems


@dataclass
class Report:
    found: int = 0
    applied: int = 0
    problems: list[str] = field(default_factory=list)


def _spread(items: list[Candidate], k: int) -> list[Candidate]:
    step = max(1, len(items) // k)
    return items[::step][:k]


def check_pass(pass_: Pass, proto: onnx.ModelProto, max_applied: int = MAX_APPLIED) -> Report:
    """Run ``pass_.find`` on the model, then apply (on forks) and commit a spread of its candidates,
    recording every contract violation."""
    model = Model.from_source(proto)
    report = Report()
    proto_bytes = model.proto.SerializeToString()
    view = graph_view(model.graph)
    found = list(pass_.find(model))
    if model.proto.SerializeToString() != proto_bytes:
        report.problems.append("find edited the model's proto")
    if graph_view(model.graph) != view:
        report.problems.append("find edited the model's graph view")
    candidates = [c for c in found if isinstance(c, Candidate)]
    report.found = len(candidates)
    for cand in _spread(candidates, max_applied):
        fork = model.fork()
        pass_.apply(fork, cand)
        after = fork.commit()
        report.applied += 1
        report.problems += [f"{cand.description}: {p}" for p in rewrite_violations(model.proto, after.proto, cand)]
        if model.proto.SerializeToString() != proto_bytes or graph_view(model.graph) != view:
            report.problems.append(f"{cand.description}: apply edited the input model, not only its fork")
    return report


# -- every pass on every model -------------------------------------------------------------------------------

#: Candidates applied, per (pass, model), by the parametrized test below.
_applied: dict[tuple[str, str], int] = {}


#: (pass, model) pairs kept out of the default run: the bottleneck's find on the RepVGG models takes ~10 s
#: each (SVDs of every 3x3 conv at every rank), and the sample model already gives it candidates.
SLOW = {("bottleneck", "repvgg"), ("bottleneck", "repvgg_folded")}


@pytest.mark.parametrize(
    "pass_name,model_name",
    [pytest.param(p, m, marks=[pytest.mark.slow] if (p, m) in SLOW else []) for p in PASSES for m in MODELS],
)
def test_pass_follows_the_contract(pass_name: str, model_name: str, models: dict[str, onnx.ModelProto]) -> None:
    report = check_pass(PASSES[pass_name](), models[model_name])
    assert report.problems == []
    _applied[pass_name, model_name] = report.applied


def test_every_pass_was_exercised(models: dict[str, onnx.ModelProto]) -> None:
    """Not vacuous: each pass had candidates applied on some model. Reuses the counts of the parametrized
    test above; pairs it did not run (a selection with -k) are counted here."""
    def count(pass_name: str) -> int:
        return sum(n for (p, _), n in _applied.items() if p == pass_name)

    for pass_name in PASSES:
        for model_name in MODELS:
            if count(pass_name) == 0 and (pass_name, model_name) not in _applied:
                _applied[pass_name, model_name] = check_pass(PASSES[pass_name](), models[model_name], max_applied=1).applied
    assert [p for p in PASSES if count(p) == 0] == []


# -- the checker catches broken passes -----------------------------------------------------------------------

TOY = """
<ir_version: 8, opset_import: ["" : 17]>
toy (float[1, 2, 4, 4] X) => (float[1, 3, 4, 4] Y)
<float[3, 2, 1, 1] W, float[3] B>
{
    A = Conv (X, W, B)
    Y = Relu (A)
}
"""


class ScaleConv(PatternPass[gs.Node]):
    """A correct toy pass: every Conv is replaced by a new one with a copy of its weight times 1."""

    name = "toy_scale_conv"
    summary = "toy"
    exact = True

    def match(self, model: Model, node: gs.Node) -> gs.Node | None:
        return node if node.op == "Conv" else None

    def check(self, model: Model, match: gs.Node) -> str | None:
        return None

    def nodes(self, match: gs.Node) -> tuple[gs.Node, ...]:
        return (match,)

    def describe(self, model: Model, match: gs.Node) -> str:
        return f"rescale {match.name}"

    def cost(self, model: Model, match: gs.Node) -> Cost:
        return Cost(1, 1, 1, 1)

    def new_weight(self, model: Model, conv: gs.Node, names: NameFactory) -> gs.Tensor:
        w = const_value(conv.inputs[1])
        assert w is not None
        return constant(names, f"{conv.name}_W", w * 1.0)

    def new_name(self, conv: gs.Node, names: NameFactory) -> str:
        return names(f"{conv.name}_scaled")

    def new_outputs(self, model: Model, conv: gs.Node, names: NameFactory) -> list[gs.Tensor]:
        return list(conv.outputs)

    def rewrite(self, model: Model, match: gs.Node) -> None:
        names = NameFactory(model.graph)
        weight = self.new_weight(model, match, names)
        outputs = self.new_outputs(model, match, names)
        new = gs.Node("Conv", name=self.new_name(match, names), attrs=dict(match.attrs),
                      inputs=[match.inputs[0], weight, *match.inputs[2:]], outputs=outputs)
        replace_nodes(model.graph, [match], [new])


class EditsGraphInFind(ScaleConv):
    def match(self, model: Model, node: gs.Node) -> gs.Node | None:
        node.attrs["seen"] = 1
        return super().match(model, node)


class EditsProtoInFind(ScaleConv):
    def find(self, model: Model) -> Iterator[Any]:
        model.proto.doc_string = "seen by find"
        yield from super().find(model)


class ReusesName(ScaleConv):
    def new_name(self, conv: gs.Node, names: NameFactory) -> str:
        return conv.name


class MutatesWeight(ScaleConv):
    def new_weight(self, model: Model, conv: gs.Node, names: NameFactory) -> gs.Tensor:
        w = const_value(conv.inputs[1])
        assert w is not None
        w *= 2.0  # in place: the old initializer now holds other values
        return conv.inputs[1]


class RenamesOutput(ScaleConv):
    def new_outputs(self, model: Model, conv: gs.Node, names: NameFactory) -> list[gs.Tensor]:
        out = gs.Variable(names(f"{conv.outputs[0].name}_new"), dtype=np.float32)
        for user in list(conv.outputs[0].outputs):
            user.inputs[list(user.inputs).index(conv.outputs[0])] = out
        return [out]


def test_the_correct_toy_passes() -> None:
    report = check_pass(ScaleConv(), parse(TOY))
    assert report.applied == 1 and report.problems == []


@pytest.mark.parametrize(
    "broken,expected",
    [
        (EditsGraphInFind, "find edited the model's graph view"),
        (EditsProtoInFind, "find edited the model's proto"),
        (ReusesName, "node name 'Conv_0' of the old graph reused for a different node"),
        (MutatesWeight, "constant 'W' modified in place"),
        (RenamesOutput, "Relu_1 no longer reads region output 'A'"),
    ],
)
def test_the_checker_catches_a_broken_pass(broken: type[ScaleConv], expected: str) -> None:
    report = check_pass(broken(), parse(TOY))
    assert report.applied == 1
    assert any(expected in p for p in report.problems), report.problems


def test_the_checker_catches_a_renamed_graph_output() -> None:
    text = TOY.replace("A = Conv (X, W, B)\n    Y = Relu (A)", "Y = Conv (X, W, B)")
    report = check_pass(RenamesOutput(), parse(text))
    assert any("graph outputs renamed" in p or "region output 'Y' is no longer produced" in p for p in report.problems), report.problems
