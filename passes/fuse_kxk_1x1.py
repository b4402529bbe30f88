"""fuse_kxk_1x1: a KxK convolution followed directly by a linear 1x1 convolution -> one KxK convolution.

For ``Y = Conv(Conv(X, W1, b1), W2, b2)`` where the second conv is pointwise (1x1, stride 1, no padding,
group 1), the 1x1 mixes the channels of every output pixel of the KxK conv, so it folds into the KxK
weights (``W1`` is ``[M, C, kh, kw]``, ``W2`` is ``[O, M, 1, 1]``)::

    W[o, c, :, :] = sum_m W2[o, m] * W1[m, c, :, :]     # W2 @ W1.reshape(M, C*kh*kw)
    b[o]          = sum_m W2[o, m] * b1[m] + b2[o]

The fused conv keeps the KxK conv's strides, pads, dilations and auto_pad. Zero padding is no problem
here: it sits in front of the KxK conv, whose every output (border pixels included) is ``W1 * x + b1``
before the 1x1 sees it.

A grouped KxK conv (group ``g``) fuses too, but only into a *dense* conv: the 1x1 mixes output channels
across groups, so the result is ``W2 @ dense(W1)`` with ``dense(W1)`` the block-diagonal ``[M, C, kh, kw]``
expansion of the grouped weight (``dense(W1)[m, c] = W1[m, c - g(m)*C/g]`` when input channel ``c`` lies in
``m``'s group ``g(m) = m // (M/g)``, else 0). The fusion stays grouped only if ``W2`` happened to be
block-diagonal itself, which is not assumed.

MACs, per output pixel (the 1x1 keeps the KxK's output size): before ``M*(C/g)*kh*kw + O*M``, after
``O*C*kh*kw``. The fusion is applied only where it does not raise MACs, e.g. a KxK expansion followed by a
1x1 projection (3x3 16->64 then 1x1 64->16: 10240 -> 2304 per pixel), not the reverse (3x3 16->16 then
1x1 16->64: 3328 -> 9216). A 1x1 followed by a 1x1 belongs to ``fuse_1x1_chain``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from passes.fuse_1x1_chain import compose_pointwise, dense_weight, is_pointwise_conv, pointwise_reason
from rewriter.analysis import node_cost
from rewriter.contract import Cost, PatternPass
from rewriter.graph import NameFactory, constant, const_value, constant_operands_reason, intermediate_reason, replace_nodes
from rewriter.model import Model


def compose_kxk_then_1x1(
    w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(W2 @ W1, W2 b1 + b2) for a dense KxK weight ``[M, C, *k]`` and a 1x1 weight ``[O, M]`` or ``[O, M, 1, ..]``.

    Returns the ``[O, C, *k]`` weight and ``[O]`` bias (``None`` when neither conv has one), in float64.
    """
    m, kernel = w1.shape[0], w1.shape[1:]
    w, b = compose_pointwise(w1.reshape(m, -1), b1, w2.reshape(w2.shape[0], m), b2)
    return w.reshape((w.shape[0],) + kernel), b


def conv_bias(conv: gs.Node) -> np.ndarray | None:
    """The constant bias of a conv, or None when it has none."""
    return const_value(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2].name else None


@dataclass(frozen=True)
class KxkThen1x1:
    first: gs.Node  # the KxK conv
    second: gs.Node  # the 1x1 conv


class FuseKxk1x1(PatternPass[KxkThen1x1]):
    name = "fuse_kxk_1x1"
    summary = "Fold a linear 1x1 conv into the KxK conv before it (W = W2*W1), where it does not raise MACs."
    exact = True

    def match(self, model: Model, node: gs.Node) -> KxkThen1x1 | None:
        if node.op != "Conv" or len(node.inputs) < 2 or len(node.outputs) != 1 or is_pointwise_conv(node):
            return None
        mid = node.outputs[0]
        for user in mid.outputs:
            if is_pointwise_conv(user) and user.inputs[0] is mid:
                return KxkThen1x1(node, user)
        return None

    def nodes(self, match: KxkThen1x1) -> tuple[gs.Node, ...]:
        return (match.first, match.second)

    def check(self, model: Model, match: KxkThen1x1) -> str | None:
        graph = model.graph
        first, second = match.first, match.second
        for conv in (first, second):
            reason = constant_operands_reason(graph, conv)
            if reason is not None:
                return reason
        reason = intermediate_reason(graph, first.outputs[0])
        if reason is not None:
            return reason
        reason = pointwise_reason(second)
        if reason is not None:
            return reason
        w1, w2 = const_value(first.inputs[1]), const_value(second.inputs[1])
        assert w1 is not None and w2 is not None
        group = int(first.attrs.get("group", 1))
        if w1.ndim < 3 or w1.shape[0] % group or w2.shape[1] != w1.shape[0]:
            return f"weight shapes {w1.shape} (group {group}) and {w2.shape} do not chain"
        return self.cost(model, match).rise_reason(allow_equal=True)

    def describe(self, model: Model, match: KxkThen1x1) -> str:
        w1, w2 = const_value(match.first.inputs[1]), const_value(match.second.inputs[1])
        assert w1 is not None and w2 is not None
        group = int(match.first.attrs.get("group", 1))
        kernel = "x".join(str(k) for k in w1.shape[2:])
        grouped = f", group {group}" if group != 1 else ""
        return (
            f"fold 1x1 {match.second.name} ({w2.shape[1]}->{w2.shape[0]}) into {kernel} "
            f"{match.first.name} ({w1.shape[1] * group}->{w1.shape[0]}{grouped})"
        )

    def cost(self, model: Model, match: KxkThen1x1) -> Cost:
        a, b = node_cost(model, match.first), node_cost(model, match.second)
        w1, w2 = const_value(match.first.inputs[1]), const_value(match.second.inputs[1])
        assert w1 is not None and w2 is not None
        out = model.static_shape(match.second.outputs[0])
        params_before = a.params + b.params
        if out is None or a.macs == 0 or b.macs == 0:
            return Cost(0, 0, params_before, 0)
        c_in = w1.shape[1] * int(match.first.attrs.get("group", 1))
        c_out = w2.shape[0]
        per_output = c_in * int(np.prod(w1.shape[2:]))
        has_bias = conv_bias(match.first) is not None or conv_bias(match.second) is not None
        params_after = c_out * per_output + (c_out if has_bias else 0)
        return Cost(a.macs + b.macs, int(np.prod(out)) * per_output, params_before, params_after)

    def rewrite(self, model: Model, match: KxkThen1x1) -> None:
        first, second = match.first, match.second
        w1, w2 = const_value(first.inputs[1]), const_value(second.inputs[1])
        assert w1 is not None and w2 is not None
        group = int(first.attrs.get("group", 1))
        w, b = compose_kxk_then_1x1(dense_weight(w1, group), conv_bias(first), w2, conv_bias(second))
        names = NameFactory(model.graph)
        inputs = [first.inputs[0], constant(names, f"{second.name}_fused_W", w.astype(w1.dtype))]
        if b is not None:
            inputs.append(constant(names, f"{second.name}_fused_B", b.astype(w1.dtype)))
        attrs = dict(first.attrs)
        attrs["group"] = 1
        fused = gs.Node(
            "Conv",
            name=names(f"{first.name}_{second.name}_fused"),
            attrs=attrs,
            inputs=inputs,
            outputs=list(second.outputs),
        )
        replace_nodes(model.graph, [first, second], [fused])
