"""The shared base of ``fuse_kxk_1x1`` and ``fuse_1x1_kxk``: a KxK conv and a linear 1x1 conv, one
directly after the other, fused into one dense KxK conv.

Both passes are the same rewrite seen from either side. With ``K`` the KxK conv (weight ``[M, C/g, k...]``
or ``[O, M/g, k...]``, group ``g``) and ``P`` the 1x1 conv (group 1, stride 1, no padding), the pair is a
linear map whose weight is the product of ``P``'s ``[out, in]`` matrix and the block-diagonal
``dense(K)`` (see :func:`passes.fuse_1x1_chain.dense_weight`); each pass module supplies its orientation
(``pointwise_first``), its compose function and its own shape (and border) preconditions. The fused conv
keeps the KxK conv's attributes with ``group = 1``, reads the first conv's input and writes the second
conv's output.

MACs: before, those of both convs; after, ``Q * O * C * prod(k)`` for ``Q`` output pixels. The fusion is
applied only where MACs do not rise.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from passes.common import bias_value, conv_padding_free, is_pointwise_conv, stored_as, weight_value
from passes.fuse_1x1_chain import dense_weight
from rewriter.analysis import node_cost
from rewriter.contract import Cost, PatternPass
from rewriter.graph import NameFactory, constant, constant_operands_reason, intermediate_reason, replace_nodes
from rewriter.model import Model

def pointwise_reason(conv: gs.Node) -> str | None:
    """Why a 1x1 conv cannot be folded into a KxK neighbour (grouped, padded or strided), or None."""
    if int(conv.attrs.get("group", 1)) != 1:
        return f"{conv.name}: grouped 1x1 conv (group {conv.attrs['group']})"
    if not conv_padding_free(conv):
        return f"{conv.name}: padding on the 1x1 conv would add a border of bias values"
    if any(int(s) != 1 for s in conv.attrs.get("strides", [])):
        return f"{conv.name}: the 1x1 conv has strides {list(conv.attrs['strides'])}, only stride 1 is fused"
    return None


def is_kxk_conv(node: gs.Node) -> bool:
    """A Conv with a weight input that is not pointwise."""
    return node.op == "Conv" and len(node.inputs) >= 2 and not is_pointwise_conv(node)


@dataclass(frozen=True)
class ConvPair:
    first: gs.Node  # the conv reading the pair's input
    second: gs.Node  # the conv reading ``first``'s output


class ConvPairFusion(PatternPass[ConvPair]):
    """One KxK conv and one 1x1 conv in a row -> one KxK conv. Subclasses set the orientation and math."""

    exact = True
    #: True: 1x1 then KxK (``fuse_1x1_kxk``); False: KxK then 1x1 (``fuse_kxk_1x1``).
    pointwise_first: ClassVar[bool]

    @staticmethod
    @abc.abstractmethod
    def compose(
        w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The fused ``[O, C, k...]`` weight and ``[O]`` bias of the pair, the KxK weight given dense."""

    @abc.abstractmethod
    def pair_reason(self, match: ConvPair, w1: np.ndarray, w2: np.ndarray, group: int) -> str | None:
        """Why the two (constant) weights, ``group`` being the KxK conv's, cannot be fused; or None."""

    # -- the two roles -----------------------------------------------------------------------------
    def kxk(self, match: ConvPair) -> gs.Node:
        return match.second if self.pointwise_first else match.first

    def pointwise(self, match: ConvPair) -> gs.Node:
        return match.first if self.pointwise_first else match.second

    def _is_first(self, node: gs.Node) -> bool:
        return is_pointwise_conv(node) if self.pointwise_first else is_kxk_conv(node)

    def _is_second(self, node: gs.Node) -> bool:
        return is_kxk_conv(node) if self.pointwise_first else is_pointwise_conv(node)

    def _weights(self, match: ConvPair) -> tuple[np.ndarray, np.ndarray, int]:
        w1, w2 = weight_value(match.first), weight_value(match.second)
        assert w1 is not None and w2 is not None
        return w1, w2, int(self.kxk(match).attrs.get("group", 1))

    # -- pattern / check / rewrite -----------------------------------------------------------------
    def match(self, model: Model, node: gs.Node) -> ConvPair | None:
        if not self._is_first(node) or len(node.outputs) != 1:
            return None
        mid = node.outputs[0]
        for user in mid.outputs:
            if self._is_second(user) and user.inputs[0] is mid:
                return ConvPair(node, user)
        return None

    def nodes(self, match: ConvPair) -> tuple[gs.Node, ...]:
        return (match.first, match.second)

    def check(self, model: Model, match: ConvPair) -> str | None:
        graph = model.graph
        for conv in (match.first, match.second):
            reason = constant_operands_reason(graph, conv)
            if reason is not None:
                return reason
        reason = intermediate_reason(graph, match.first.outputs[0]) or pointwise_reason(self.pointwise(match))
        if reason is not None:
            return reason
        reason = self.pair_reason(match, *self._weights(match))
        if reason is not None:
            return reason
        return self.cost(model, match).rise_reason(allow_equal=True)

    def describe(self, model: Model, match: ConvPair) -> str:
        w1, w2, group = self._weights(match)
        wk, wp = (w2, w1) if self.pointwise_first else (w1, w2)
        kernel = "x".join(str(k) for k in wk.shape[2:])
        grouped = f", group {group}" if group != 1 else ""
        return (
            f"fold 1x1 {self.pointwise(match).name} ({wp.shape[1]}->{wp.shape[0]}) into {kernel} "
            f"{self.kxk(match).name} ({wk.shape[1] * group}->{wk.shape[0]}{grouped})"
        )

    def cost(self, model: Model, match: ConvPair) -> Cost:
        a, b = node_cost(model, match.first), node_cost(model, match.second)
        w1, w2, group = self._weights(match)
        out = model.static_shape(match.second.outputs[0])
        params_before = a.params + b.params
        if out is None or a.macs == 0 or b.macs == 0:
            return Cost(0, 0, params_before, 0)
        wk = w2 if self.pointwise_first else w1
        c_in = w1.shape[1] * (1 if self.pointwise_first else group)
        c_out = w2.shape[0]
        per_output = c_in * int(np.prod(wk.shape[2:]))
        has_bias = bias_value(match.first) is not None or bias_value(match.second) is not None
        params_after = c_out * per_output + (c_out if has_bias else 0)
        return Cost(a.macs + b.macs, int(np.prod(out)) * per_output, params_before, params_after)

    def rewrite(self, model: Model, match: ConvPair) -> None:
        first, second = match.first, match.second
        kxk, base = self.kxk(match), self.pointwise(match).name
        w1, w2, group = self._weights(match)
        if self.pointwise_first:
            w2 = dense_weight(w2, group)
        else:
            w1 = dense_weight(w1, group)
        w, b = self.compose(w1, bias_value(first), w2, bias_value(second))
        dtype = weight_value(kxk).dtype  # type: ignore[union-attr]
        names = NameFactory(model.graph)
        inputs = [first.inputs[0], constant(names, f"{base}_fused_W", stored_as(w, dtype))]
        if b is not None:
            inputs.append(constant(names, f"{base}_fused_B", stored_as(b, dtype)))
        attrs = dict(kxk.attrs)
        attrs["group"] = 1
        fused = gs.Node(
            "Conv",
            name=names(f"{first.name}_{second.name}_fused"),
            attrs=attrs,
            inputs=inputs,
            outputs=list(second.outputs),
        )
        replace_nodes(model.graph, [first, second], [fused])
