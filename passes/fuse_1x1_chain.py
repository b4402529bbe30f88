"""fuse_1x1_chain: two pointwise (1x1) convolutions with nothing between them -> one pointwise conv.

For ``Y = Conv(Conv(X, W1, b1), W2, b2)`` with 1x1 kernels, group 1 and no padding, channel mixing
composes as a matrix product (per pixel ``y = W2 (W1 x + b1) + b2``)::

    W = W2 @ W1            # [O, M] @ [M, C] -> [O, C]
    b = W2 @ b1 + b2

Strides multiply (subsampling commutes with a pointwise map): ``s = s1 * s2``, and
``floor(floor((H-1)/s1)/s2) = floor((H-1)/(s1*s2))`` keeps the output size. The fusion is kept only
where it lowers MACs (e.g. an expansion followed by a projection); fusing a bottleneck pair would raise
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.analysis import node_cost
from rewriter.contract import Cost, PatternPass
from rewriter.graph import NameFactory, constant, const_value, is_graph_input, replace_nodes, single_consumer
from rewriter.model import Model


def compose_pointwise(
    w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(W2 W1, W2 b1 + b2) for weights [M, C], [O, M]; computed in float64."""
    w = w2.astype(np.float64) @ w1.astype(np.float64)
    if b1 is None and b2 is None:
        return w, None
    b = np.zeros(w.shape[0]) if b2 is None else b2.astype(np.float64)
    if b1 is not None:
        b = b + w2.astype(np.float64) @ b1.astype(np.float64)
    return w, b


def is_pointwise_conv(node: gs.Node) -> bool:
    """A Conv whose kernel is all ones (from ``kernel_shape``, else from a constant weight's shape)."""
    if node.op != "Conv" or len(node.inputs) < 2:
        return False
    kernel = node.attrs.get("kernel_shape")
    if kernel is None:
        w = const_value(node.inputs[1])
        if w is None or w.ndim < 3:
            return False
        kernel = w.shape[2:]
    return len(kernel) > 0 and all(k == 1 for k in kernel)


def conv_padding_free(node: gs.Node) -> bool:
    pads = node.attrs.get("pads", [])
    return all(p == 0 for p in pads) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")


@dataclass(frozen=True)
class Chain:
    first: gs.Node
    second: gs.Node


class Fuse1x1Chain(PatternPass[Chain]):
    name = "fuse_1x1_chain"
    summary = "Fuse two consecutive linear 1x1 convs into one (W = W2*W1), where it lowers MACs."
    exact = True

    def match(self, model: Model, node: gs.Node) -> Chain | None:
        if not is_pointwise_conv(node) or len(node.outputs) != 1:
            return None
        users = node.outputs[0].outputs
        if len(users) != 1 or not is_pointwise_conv(users[0]) or users[0].inputs[0] is not node.outputs[0]:
            return None
        return Chain(node, users[0])

    def nodes(self, match: Chain) -> tuple[gs.Node, ...]:
        return (match.first, match.second)

    def check(self, model: Model, match: Chain) -> str | None:
        graph = model.graph
        for conv in (match.first, match.second):
            if int(conv.attrs.get("group", 1)) != 1:
                return f"{conv.name}: grouped 1x1 conv (group {conv.attrs['group']})"
            if not conv_padding_free(conv):
                return f"{conv.name}: padding on a 1x1 conv would add a border of bias values"
            for t in conv.inputs[1:]:
                if is_graph_input(graph, t):
                    return f"{conv.name}: weight {t.name!r} is a graph input, not a constant"
                if const_value(t) is None:
                    return f"{conv.name}: weight or bias {t.name!r} is not constant"
        if not single_consumer(graph, match.first.outputs[0]):
            return f"intermediate tensor {match.first.outputs[0].name!r} is a graph output"
        w1 = const_value(match.first.inputs[1])
        if w1 is None or w1.dtype.kind != "f":
            return "weights are not floating point"
        cost = self.cost(model, match)
        if cost.macs_before == 0:
            return "output shapes unknown; cannot tell whether fusing lowers MACs"
        if cost.macs_after >= cost.macs_before:
            return f"fusing would raise MACs from {cost.macs_before} to {cost.macs_after}"
        return None

    def describe(self, model: Model, match: Chain) -> str:
        w1 = const_value(match.first.inputs[1])
        w2 = const_value(match.second.inputs[1])
        assert w1 is not None and w2 is not None
        return f"fuse 1x1 chain {match.first.name} ({w1.shape[1]}->{w1.shape[0]}) + {match.second.name} ({w2.shape[1]}->{w2.shape[0]})"

    def cost(self, model: Model, match: Chain) -> Cost:
        a, b = node_cost(model, match.first), node_cost(model, match.second)
        w1 = const_value(match.first.inputs[1])
        w2 = const_value(match.second.inputs[1])
        assert w1 is not None and w2 is not None
        out = model.static_shape(match.second.outputs[0])
        if out is None or a.macs == 0 or b.macs == 0:
            return Cost(0, 0, a.params + b.params, 0)
        c_in, c_out = w1.shape[1], w2.shape[0]
        macs_after = int(np.prod(out)) * c_in
        params_after = c_out * c_in + (c_out if len(match.first.inputs) > 2 or len(match.second.inputs) > 2 else 0)
        return Cost(a.macs + b.macs, macs_after, a.params + b.params, params_after)

    def rewrite(self, model: Model, match: Chain) -> None:
        first, second = match.first, match.second
        w1, w2 = const_value(first.inputs[1]), const_value(second.inputs[1])
        assert w1 is not None and w2 is not None
        b1 = const_value(first.inputs[2]) if len(first.inputs) > 2 else None
        b2 = const_value(second.inputs[2]) if len(second.inputs) > 2 else None
        spatial = w1.ndim - 2
        w, b = compose_pointwise(w1.reshape(w1.shape[:2]), b1, w2.reshape(w2.shape[:2]), b2)
        names = NameFactory(model.graph)
        inputs = [first.inputs[0], constant(names, f"{second.name}_fused_W", w.reshape(w.shape + (1,) * spatial).astype(w1.dtype))]
        if b is not None:
            inputs.append(constant(names, f"{second.name}_fused_B", b.astype(w1.dtype)))
        s1 = list(first.attrs.get("strides", [1] * spatial))
        s2 = list(second.attrs.get("strides", [1] * spatial))
        fused = gs.Node(
            "Conv",
            name=names(f"{first.name}_{second.name}_fused"),
            attrs={"kernel_shape": [1] * spatial, "strides": [x * y for x, y in zip(s1, s2)], "pads": [0] * (2 * spatial),
                   "dilations": [1] * spatial, "group": 1},
            inputs=inputs,
            outputs=list(second.outputs),
        )
        replace_nodes(model.graph, [first, second], [fused])
