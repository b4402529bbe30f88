"""fuse_1x1_chain: two pointwise (1x1) convolutions, with at most per-channel affine maps between them
(BatchNormalization, constant Mul/Add), -> one pointwise conv.

For ``Y = Conv(A(Conv(X, W1, b1)), W2, b2)`` with 1x1 kernels and no padding, where ``A(y) = y*s + t`` is
the composition of the affine nodes between, channel mixing composes as a matrix product. Per pixel
``y = W2 (s * (W1 x + b1) + t) + b2``, so with ``W1' = diag(s) W1``, ``b1' = s*b1 + t``::

    W = W2 @ W1'           # [O, M] @ [M, C] -> [O, C]
    b = W2 @ b1' + b2

Groups: a grouped 1x1 is a block-diagonal ``[M, C]`` matrix; both are expanded to dense, multiplied, and
the product is stored with the largest group count it is block-diagonal for (often 1, the same group
count when the blocks line up). Strides multiply (subsampling commutes with a pointwise map):
``s = s1 * s2``, and ``floor(floor((H-1)/s1)/s2) = floor((H-1)/(s1*s2))`` keeps the output size. The
fusion is kept only where it lowers MACs (an expansion followed by a projection); fusing a bottleneck pair
would raise them.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import numpy as np
import onnx_graphsurgeon as gs

from passes.common import bias_value, conv_padding_free, is_pointwise_conv, stored_as
from rewriter.analysis import node_cost, node_params
from rewriter.contract import Cost, PatternPass
from rewriter.graph import NameFactory, constant, const_value, constant_operands_reason, is_graph_output, replace_nodes
from rewriter.model import Model

#: The longest run of affine nodes looked through between the two convs.
MAX_MIDDLE = 4


# -- weight math (pure numpy) -----------------------------------------------------------------------


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


def dense_weight(w: np.ndarray, group: int) -> np.ndarray:
    """The group-1 equivalent ``[O, C, *k]`` of a grouped conv weight ``[O, C/group, *k]`` (block-diagonal)."""
    if group == 1:
        return w
    out_ch, in_per_group = w.shape[0], w.shape[1]
    out_per_group = out_ch // group
    dense = np.zeros((out_ch, in_per_group * group) + w.shape[2:], dtype=w.dtype)
    for g in range(group):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * in_per_group : (g + 1) * in_per_group] = w[rows]
    return dense


def block_diagonal_groups(w: np.ndarray) -> int:
    """The largest ``g`` for which the dense ``[O, C, ...]`` weight is block-diagonal with ``g`` equal blocks."""
    out_ch, in_ch = w.shape[:2]
    for g in range(gcd(out_ch, in_ch), 1, -1):
        if out_ch % g or in_ch % g:
            continue
        o, c = out_ch // g, in_ch // g
        mask = np.ones((out_ch, in_ch), dtype=bool)
        for k in range(g):
            mask[k * o : (k + 1) * o, k * c : (k + 1) * c] = False
        if not np.any(w.reshape(out_ch, in_ch, -1)[mask]):
            return g
    return 1


def grouped_weight(w: np.ndarray, group: int) -> np.ndarray:
    """Inverse of :func:`dense_weight`: the ``[O, C/group, ...]`` blocks of a block-diagonal dense weight."""
    if group == 1:
        return w
    out_ch, in_ch = w.shape[:2]
    o, c = out_ch // group, in_ch // group
    return np.concatenate([w[k * o : (k + 1) * o, k * c : (k + 1) * c] for k in range(group)], axis=0)


def scale_rows(w: np.ndarray, b: np.ndarray | None, s: np.ndarray, t: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``diag(s) W`` and ``s*b + t`` (missing ``b``/``t`` are 0; ``None`` when both are missing)."""
    w2 = w.astype(np.float64) * s[:, None]
    if b is None and t is None:
        return w2, None
    b2 = np.zeros(len(s)) if b is None else b.astype(np.float64) * s
    return w2, b2 if t is None else b2 + t


# -- pattern / check / rewrite ----------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    first: gs.Node
    second: gs.Node
    #: Affine nodes between, in order, each with its constant operand (None for BatchNormalization).
    middle: tuple[tuple[gs.Node, gs.Tensor | None], ...] = ()


class Fuse1x1Chain(PatternPass[Chain]):
    name = "fuse_1x1_chain"
    summary = "Fuse two linear 1x1 convs (with BN/affine between) into one (W = W2*W1), where it lowers MACs."
    exact = True

    def match(self, model: Model, node: gs.Node) -> Chain | None:
        from passes.fold_batchnorm import affine_operand

        if not is_pointwise_conv(node) or len(node.outputs) != 1:
            return None
        middle: list[tuple[gs.Node, gs.Tensor | None]] = []
        tensor = node.outputs[0]
        while True:
            users = tensor.outputs
            if len(users) != 1 or len(users[0].outputs) != 1:
                return None
            user = users[0]
            if is_pointwise_conv(user) and user.inputs[0] is tensor:
                return Chain(node, user, tuple(middle))
            if len(middle) == MAX_MIDDLE:
                return None
            if user.op == "BatchNormalization" and user.inputs[0] is tensor:
                middle.append((user, None))
            elif (operand := affine_operand(user, tensor)) is not None:
                middle.append((user, operand))
            else:
                return None
            tensor = user.outputs[0]

    def nodes(self, match: Chain) -> tuple[gs.Node, ...]:
        return (match.first, *(n for n, _ in match.middle), match.second)

    def check(self, model: Model, match: Chain) -> str | None:
        from passes.fold_batchnorm import affine_reason

        graph = model.graph
        for conv in (match.first, match.second):
            if not conv_padding_free(conv):
                return f"{conv.name}: padding on a 1x1 conv would add a border of bias values"
            reason = constant_operands_reason(graph, conv)
            if reason is not None:
                return reason
        w1 = const_value(match.first.inputs[1])
        w2 = const_value(match.second.inputs[1])
        assert w1 is not None and w2 is not None
        g1, g2 = int(match.first.attrs.get("group", 1)), int(match.second.attrs.get("group", 1))
        if w1.shape[0] != w2.shape[1] * g2 or w1.shape[0] % g1 or w2.shape[0] % g2:
            return f"weight shapes {tuple(w1.shape)} (group {g1}) and {tuple(w2.shape)} (group {g2}) do not chain"
        for node in (match.first, *(n for n, _ in match.middle)):
            mid = node.outputs[0]
            if is_graph_output(graph, mid):
                return f"intermediate tensor {mid.name!r} is a graph output"
        for node, operand in match.middle:
            reason = affine_reason(graph, node, operand, w1.ndim, int(w1.shape[0]))
            if reason is not None:
                return reason
        return self.cost(model, match).rise_reason(allow_equal=False)

    def describe(self, model: Model, match: Chain) -> str:
        w1 = const_value(match.first.inputs[1])
        w2 = const_value(match.second.inputs[1])
        assert w1 is not None and w2 is not None
        between = "".join(f" + {n.op} {n.name}" for n, _ in match.middle)
        return (
            f"fuse 1x1 chain {match.first.name} ({w1.shape[1] * int(match.first.attrs.get('group', 1))}->{w1.shape[0]})"
            f"{between} + {match.second.name} ({w1.shape[0]}->{w2.shape[0]})"
        )

    def _fused(self, match: Chain) -> tuple[np.ndarray, np.ndarray | None, int]:
        """The fused ``[O, C/g]`` weight, bias and group count ``g``."""
        from passes.fold_batchnorm import affine_scale_shift

        first, second = match.first, match.second
        w1, w2 = const_value(first.inputs[1]), const_value(second.inputs[1])
        assert w1 is not None and w2 is not None
        d1 = dense_weight(w1, int(first.attrs.get("group", 1))).reshape(w1.shape[0], -1)
        d2 = dense_weight(w2, int(second.attrs.get("group", 1))).reshape(w2.shape[0], -1)
        b1 = bias_value(first)
        for node, operand in match.middle:
            s, t = affine_scale_shift(node, operand, d1.shape[0], w1.ndim)
            d1, b1 = scale_rows(d1, b1, s, t)
        w, b = compose_pointwise(d1, b1, d2, bias_value(second))
        group = block_diagonal_groups(w)
        return grouped_weight(w, group), b, group

    def cost(self, model: Model, match: Chain) -> Cost:
        costs = [node_cost(model, n) for n in (match.first, match.second)]
        params_before = sum(c.params for c in costs) + sum(node_params(n) for n, _ in match.middle)
        out = model.static_shape(match.second.outputs[0])
        if out is None or any(c.macs == 0 for c in costs):
            return Cost(0, 0, params_before, 0)
        w, b, _ = self._fused(match)
        macs_after = int(np.prod(out)) * int(w.shape[1])
        return Cost(sum(c.macs for c in costs), macs_after, params_before, int(w.size) + (0 if b is None else int(b.size)))

    def rewrite(self, model: Model, match: Chain) -> None:
        first, second = match.first, match.second
        w1 = const_value(first.inputs[1])
        assert w1 is not None
        spatial = w1.ndim - 2
        w, b, group = self._fused(match)
        names = NameFactory(model.graph)
        inputs = [first.inputs[0], constant(names, f"{second.name}_fused_W", stored_as(w.reshape(w.shape + (1,) * spatial), w1.dtype))]
        if b is not None:
            inputs.append(constant(names, f"{second.name}_fused_B", stored_as(b, w1.dtype)))
        s1 = list(first.attrs.get("strides", [1] * spatial))
        s2 = list(second.attrs.get("strides", [1] * spatial))
        fused = gs.Node(
            "Conv",
            name=names(f"{first.name}_{second.name}_fused"),
            attrs={"kernel_shape": [1] * spatial, "strides": [x * y for x, y in zip(s1, s2)], "pads": [0] * (2 * spatial),
                   "dilations": [1] * spatial, "group": group},
            inputs=inputs,
            outputs=list(second.outputs),
        )
        replace_nodes(model.graph, self.nodes(match), [fused])
