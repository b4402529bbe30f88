"""fuse_1x1_kxk: a linear 1x1 convolution followed directly by a KxK convolution -> one KxK convolution.

For ``Y = Conv(Conv(X, W1, b1), W2, b2)`` where the first conv is pointwise (1x1, stride 1, no padding,
group 1), the intermediate tensor is ``W1 x + b1`` at every pixel, so the KxK conv sees a channel mix of
``x`` and folds it into its own weights (``W1`` is ``[M, C, 1, 1]``, ``W2`` is ``[O, M, kh, kw]``)::

    W[o, c, :, :] = sum_m W2[o, m, :, :] * W1[m, c]
    b[o]          = b2[o] + sum_{m, i, j} W2[o, m, i, j] * b1[m]

The fused conv keeps the KxK conv's strides, pads, dilations and auto_pad (the 1x1 keeps the spatial size,
so the KxK conv sees the same geometry on ``x``).

The border case. The bias term assumes every tap of the KxK window reads ``W1 x + b1``. Where the KxK conv
zero-pads, the padded taps read 0 instead, so border outputs would get ``b1``'s contribution through taps
that never had it. No constant padding of ``x`` can fix that in general (``W1 v + b1 = 0`` has no solution
``v`` unless ``b1`` lies in ``W1``'s column space). The fold is therefore exact only when

* the KxK conv does not pad (pads all 0, auto_pad NOTSET or VALID), or
* ``b1`` is absent or all zeros;

otherwise the pass skips: "the first conv's bias would meet the KxK conv's zero padding at the borders".

A grouped KxK conv (group ``g``) fuses into a dense one: output ``o`` reads only the intermediate channels of
its group, but each of those mixes all of ``x``'s channels, so ``W = dense(W2) . W1`` with ``dense`` the
block-diagonal expansion from :mod:`passes.fuse_kxk_1x1`.

MACs, with ``P`` input pixels and ``Q`` output pixels: before ``P*M*C + Q*O*(M/g)*kh*kw``, after
``Q*O*C*kh*kw``. Applied only where MACs do not rise: an expansion into the KxK conv (1x1 4->8 then 3x3
8->4: 320 -> 144 per pixel) fuses, a reduction does not (1x1 64->16 then 3x3 16->16: 3328 -> 9216).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from passes.fuse_1x1_chain import conv_padding_free, is_pointwise_conv, pointwise_reason
from passes.fuse_kxk_1x1 import conv_bias, dense_weight
from rewriter.analysis import node_cost
from rewriter.contract import Cost, PatternPass
from rewriter.graph import NameFactory, constant, const_value, constant_operands_reason, intermediate_reason, replace_nodes
from rewriter.model import Model

BORDER_REASON = "the first conv's bias would meet the KxK conv's zero padding at the borders"


def compose_1x1_then_kxk(
    w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(W2 . W1, b2 + sum W2 b1) for a 1x1 weight ``[M, C]`` or ``[M, C, 1, ..]`` and a dense KxK weight ``[O, M, *k]``.

    Returns the ``[O, C, *k]`` weight and ``[O]`` bias (``None`` when neither conv has one), in float64.
    The bias is exact only where the KxK conv sees no zero padding (see the module docstring).
    """
    m = w2.shape[1]
    a = w1.astype(np.float64).reshape(m, -1)
    k2 = w2.astype(np.float64)
    w = np.moveaxis(np.tensordot(k2, a, axes=([1], [0])), -1, 1)  # [O, *k, C] -> [O, C, *k]
    if b1 is None and b2 is None:
        return w, None
    b = np.zeros(w.shape[0]) if b2 is None else b2.astype(np.float64)
    if b1 is not None:
        b = b + k2.reshape(k2.shape[0], m, -1).sum(axis=2) @ b1.astype(np.float64)
    return w, b


@dataclass(frozen=True)
class PointwiseThenKxk:
    first: gs.Node  # the 1x1 conv
    second: gs.Node  # the KxK conv


class Fuse1x1Kxk(PatternPass[PointwiseThenKxk]):
    name = "fuse_1x1_kxk"
    summary = "Fold a linear 1x1 conv into the KxK conv after it (W = W2*W1), where exact and MACs do not rise."
    exact = True

    def match(self, model: Model, node: gs.Node) -> PointwiseThenKxk | None:
        if not is_pointwise_conv(node) or len(node.outputs) != 1:
            return None
        mid = node.outputs[0]
        for user in mid.outputs:
            if user.op == "Conv" and len(user.inputs) >= 2 and user.inputs[0] is mid and not is_pointwise_conv(user):
                return PointwiseThenKxk(node, user)
        return None

    def nodes(self, match: PointwiseThenKxk) -> tuple[gs.Node, ...]:
        return (match.first, match.second)

    def check(self, model: Model, match: PointwiseThenKxk) -> str | None:
        graph = model.graph
        first, second = match.first, match.second
        for conv in (first, second):
            reason = constant_operands_reason(graph, conv)
            if reason is not None:
                return reason
        reason = intermediate_reason(graph, first.outputs[0])
        if reason is not None:
            return reason
        reason = pointwise_reason(first)
        if reason is not None:
            return reason
        w1, w2 = const_value(first.inputs[1]), const_value(second.inputs[1])
        assert w1 is not None and w2 is not None
        group = int(second.attrs.get("group", 1))
        if w2.ndim < 3 or w2.shape[0] % group or w2.shape[1] * group != w1.shape[0]:
            return f"weight shapes {w1.shape} and {w2.shape} (group {group}) do not chain"
        b1 = conv_bias(first)
        if b1 is not None and np.any(b1 != 0) and not conv_padding_free(second):
            return BORDER_REASON
        return self.cost(model, match).rise_reason(allow_equal=True)

    def describe(self, model: Model, match: PointwiseThenKxk) -> str:
        w1, w2 = const_value(match.first.inputs[1]), const_value(match.second.inputs[1])
        assert w1 is not None and w2 is not None
        group = int(match.second.attrs.get("group", 1))
        kernel = "x".join(str(k) for k in w2.shape[2:])
        grouped = f", group {group}" if group != 1 else ""
        return (
            f"fold 1x1 {match.first.name} ({w1.shape[1]}->{w1.shape[0]}) into {kernel} "
            f"{match.second.name} ({w2.shape[1] * group}->{w2.shape[0]}{grouped})"
        )

    def cost(self, model: Model, match: PointwiseThenKxk) -> Cost:
        a, b = node_cost(model, match.first), node_cost(model, match.second)
        w1, w2 = const_value(match.first.inputs[1]), const_value(match.second.inputs[1])
        assert w1 is not None and w2 is not None
        out = model.static_shape(match.second.outputs[0])
        params_before = a.params + b.params
        if out is None or a.macs == 0 or b.macs == 0:
            return Cost(0, 0, params_before, 0)
        c_in, c_out = w1.shape[1], w2.shape[0]
        per_output = c_in * int(np.prod(w2.shape[2:]))
        has_bias = conv_bias(match.first) is not None or conv_bias(match.second) is not None
        params_after = c_out * per_output + (c_out if has_bias else 0)
        return Cost(a.macs + b.macs, int(np.prod(out)) * per_output, params_before, params_after)

    def rewrite(self, model: Model, match: PointwiseThenKxk) -> None:
        first, second = match.first, match.second
        w1, w2 = const_value(first.inputs[1]), const_value(second.inputs[1])
        assert w1 is not None and w2 is not None
        group = int(second.attrs.get("group", 1))
        w, b = compose_1x1_then_kxk(w1, conv_bias(first), dense_weight(w2, group), conv_bias(second))
        names = NameFactory(model.graph)
        inputs = [first.inputs[0], constant(names, f"{first.name}_fused_W", w.astype(w2.dtype))]
        if b is not None:
            inputs.append(constant(names, f"{first.name}_fused_B", b.astype(w2.dtype)))
        attrs = dict(second.attrs)
        attrs["group"] = 1
        fused = gs.Node(
            "Conv",
            name=names(f"{first.name}_{second.name}_fused"),
            attrs=attrs,
            inputs=inputs,
            outputs=list(second.outputs),
        )
        replace_nodes(model.graph, [first, second], [fused])
