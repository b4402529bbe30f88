"""fold_batchnorm: an inference BatchNormalization, or a constant per-channel Mul / Add, after a Conv,
ConvTranspose or Gemm -> folded into that op's weights and bias.

Each of the three followers is a per-output-channel affine map ``z = y * s + t`` (channels on axis 1)::

    BatchNormalization:  s = gamma / sqrt(var + eps),  t = beta - mean * s
    Mul by k:            s = k,                        t = 0
    Add k:               s = 1,                        t = k

and folds into the producer as follows (computed in float64, stored in the weight's dtype):

* Conv, W ``[C_out, C_in/group, k...]``: ``W'[o] = W[o] * s[o]``, ``b' = b * s + t``
  (for BatchNormalization: ``b' = (b - mean) * s + beta``; a missing ``b`` is 0).
* ConvTranspose, W ``[C_in, C_out/group, k...]``: output channel ``o = g * (C_out/group) + j`` is
  ``W[g*(C_in/group) : (g+1)*(C_in/group), j]``, so with ``W`` viewed as ``[group, C_in/group, C_out/group,
  k...]`` and ``s`` as ``[group, 1, C_out/group, 1...]``: ``W' = W * s``; ``b' = b * s + t``.
* Gemm, ``Y = alpha * A' B' + beta * C`` with output features the columns of ``Y``:
  ``B'[:, n] *= s[n]`` (rows of ``B`` when ``transB``), ``C' = beta * C * s + t`` and ``beta' = 1``;
  ``alpha`` is kept. ``C`` must be per column (shape ``[]``, ``[1]``, ``[N]``, ``[1, N]``).

A Mul/Add constant qualifies when it broadcasts along the channel axis only: left-padded to the output
rank, every dim is 1 except axis 1, which is 1 (a scalar) or C (e.g. ``[C,1,1]`` or ``[1,C,1,1]`` after a
2-D conv, ``[N]`` or ``[1,N]`` after a Gemm). Padding, strides, dilations and output padding need no
care: the map acts per output element, and every output element (border ones included) carries the bias.
The fold is exact up to float rounding and removes one node; it changes no MACs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from passes.common import batchnorm_scale_shift, bias_tensor, bias_value, stored_as, weight_shape, weight_value
from rewriter.analysis import node_cost, node_params
from rewriter.contract import Candidate, Cost, PatternPass
from rewriter.graph import (
    NameFactory,
    constant,
    const_value,
    constant_operands_reason,
    is_graph_input,
    is_graph_output,
    producer,
    replace_nodes,
)
from rewriter.model import Model

#: Ops whose output channels can absorb a per-channel affine map.
PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
#: Ops that are a per-channel affine map when their parameters are constant.
FOLLOWERS = ("BatchNormalization", "Mul", "Add")


# -- weight math (pure numpy) -----------------------------------------------------------------------


def per_channel_vector(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """The length-``channels`` vector a constant stands for along axis 1 of a rank-``rank`` tensor.

    ``None`` when the constant would broadcast along another axis or raise the rank.
    """
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + tuple(value.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,)).copy()


def fold_bias(b: np.ndarray | None, s: np.ndarray, t: np.ndarray | None) -> np.ndarray | None:
    """``b * s + t`` with a missing ``b`` or ``t`` taken as 0; ``None`` when both are missing."""
    if b is None and t is None:
        return None
    out = np.zeros(s.shape, dtype=np.float64)
    if b is not None:
        out = out + b.astype(np.float64) * s
    if t is not None:
        out = out + t
    return out


def fold_conv(
    w: np.ndarray, b: np.ndarray | None, s: np.ndarray, t: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Conv weight ``[C_out, C_in/group, k...]``: ``W'[o] = W[o] * s[o]``, ``b' = b * s + t``."""
    w2 = w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))
    return w2, fold_bias(b, s, t)


def fold_conv_transpose(
    w: np.ndarray, b: np.ndarray | None, s: np.ndarray, t: np.ndarray | None, group: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """ConvTranspose weight ``[C_in, C_out/group, k...]``; output channel ``g*(C_out/group) + j``."""
    c_in, per_group = w.shape[:2]
    kernel = tuple(w.shape[2:])
    wg = w.astype(np.float64).reshape((group, c_in // group, per_group) + kernel)
    sg = s.reshape((group, 1, per_group) + (1,) * len(kernel))
    return (wg * sg).reshape(w.shape), fold_bias(b, s, t)


def fold_gemm(
    b_mat: np.ndarray, c: np.ndarray | None, s: np.ndarray, t: np.ndarray | None, trans_b: bool, beta: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Gemm: scale the output columns of ``B`` by ``s``; ``C' = beta * C * s + t`` (use with ``beta' = 1``).

    ``c`` must be per column (``[]``, ``[1]``, ``[N]`` or ``[1, N]``); ``C'`` has shape ``[N]``.
    """
    b64 = b_mat.astype(np.float64)
    b2 = b64 * s[:, None] if trans_b else b64 * s[None, :]
    c_vec = None if c is None else float(beta) * np.broadcast_to(c.astype(np.float64).reshape(-1), s.shape)
    return b2, fold_bias(c_vec, s, t)


# -- pattern / check / rewrite ----------------------------------------------------------------------


@dataclass(frozen=True)
class Fold:
    producer: gs.Node  # Conv / ConvTranspose / Gemm
    follower: gs.Node  # BatchNormalization / Mul / Add
    #: The constant side of a Mul / Add (None for BatchNormalization).
    operand: gs.Tensor | None = None


def _out_channels(node: gs.Node, w: tuple[int, ...]) -> int:
    """The producer's output channels, from its weight's shape ``w``."""
    if node.op == "Conv":
        return int(w[0])
    if node.op == "ConvTranspose":
        return int(w[1]) * int(node.attrs.get("group", 1))
    return int(w[0] if node.attrs.get("transB", 0) else w[1])


def _out_rank(node: gs.Node, w: tuple[int, ...]) -> int:
    return 2 if node.op == "Gemm" else len(w)


def _bn_params(node: gs.Node) -> list[gs.Tensor]:
    return list(node.inputs[1:5])


# -- the follower as a per-channel affine map (shared with fuse_1x1_chain) --------------------------


def affine_reason(graph: gs.Graph, node: gs.Node, operand: gs.Tensor | None, rank: int, channels: int) -> str | None:
    """Why ``node`` (a BatchNormalization, or a Mul/Add with constant ``operand``) is not a per-channel
    affine map over a rank-``rank`` tensor with ``channels`` channels on axis 1; ``None`` when it is."""
    if len(node.outputs) != 1:
        return f"{node.name}: {len(node.outputs)} outputs (training-mode statistics are used)"
    if node.op == "BatchNormalization":
        return _bn_reason(graph, node, channels)
    if node.op not in ("Mul", "Add") or operand is None:
        return f"{node.name}: {node.op} is not a per-channel affine map"
    if "broadcast" in node.attrs or "axis" in node.attrs:
        return f"{node.name}: legacy broadcast/axis attributes are not handled"
    if is_graph_input(graph, operand):
        return f"{node.name}: operand {operand.name!r} is a graph input, not a constant"
    v = const_value(operand)
    if v is None:
        return f"{node.name}: operand {operand.name!r} is not constant"
    if v.dtype.kind != "f":
        return f"{node.name}: operand {operand.name!r} is {v.dtype}, not floating point"
    if per_channel_vector(v, rank, channels) is None:
        return (
            f"{node.name}: operand {operand.name!r} of shape {tuple(v.shape)} does not broadcast per channel "
            f"over a rank-{rank} output with {channels} channels"
        )
    return None


def _bn_reason(graph: gs.Graph, bn: gs.Node, channels: int) -> str | None:
    if int(bn.attrs.get("training_mode", 0)) != 0:
        return f"{bn.name}: training_mode is set"
    if int(bn.attrs.get("spatial", 1)) == 0:
        return f"{bn.name}: spatial=0 (per-element statistics) is not handled"
    if len(bn.inputs) != 5:
        return f"{bn.name}: {len(bn.inputs)} inputs, expected 5"
    values = []
    for t in _bn_params(bn):
        if is_graph_input(graph, t):
            return f"{bn.name}: parameter {t.name!r} is a graph input, not a constant"
        v = const_value(t)
        if v is None:
            return f"{bn.name}: parameter {t.name!r} is not constant"
        if v.dtype.kind != "f":
            return f"{bn.name}: parameter {t.name!r} is {v.dtype}, not floating point"
        if tuple(v.shape) != (channels,):
            return f"{bn.name}: parameter {t.name!r} has shape {tuple(v.shape)}, expected ({channels},)"
        values.append(v)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    if not np.all(values[3].astype(np.float64) + eps > 0):
        return f"{bn.name}: var + epsilon is not positive everywhere"
    return None


def affine_scale_shift(node: gs.Node, operand: gs.Tensor | None, channels: int, rank: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(s, t) of a node that :func:`affine_reason` accepted: ``node(y) = y * s + t`` per channel."""
    if node.op == "BatchNormalization":
        gamma, beta, mean, var = (const_value(t) for t in _bn_params(node))
        assert gamma is not None and beta is not None and mean is not None and var is not None
        return batchnorm_scale_shift(gamma, beta, mean, var, float(node.attrs.get("epsilon", 1e-5)))
    k = per_channel_vector(const_value(operand), rank, channels)  # type: ignore[arg-type]
    assert k is not None
    if node.op == "Mul":
        return k, None
    return np.ones(channels), k


def affine_operand(node: gs.Node, data: gs.Tensor) -> gs.Tensor | None:
    """For a two-input Mul/Add reading ``data``: its other input if that is a constant, else ``None``."""
    if node.op not in ("Mul", "Add") or len(node.inputs) != 2:
        return None
    other = node.inputs[1] if node.inputs[0] is data else node.inputs[0]
    return other if other is not data and const_value(other) is not None else None


class FoldBatchNorm(PatternPass[Fold]):
    name = "fold_batchnorm"
    summary = "Fold inference BatchNormalization or a per-channel constant Mul/Add into the preceding Conv/ConvTranspose/Gemm."
    exact = True

    def anchor(self, candidate: Candidate) -> str:
        return candidate.nodes[1]  # the follower: each one is a separate place to fold

    def match(self, model: Model, node: gs.Node) -> Fold | None:
        if node.op not in FOLLOWERS or not node.inputs:
            return None
        if node.op == "BatchNormalization":
            p = producer(node.inputs[0])
            if p is None or p.op not in PRODUCERS or not p.outputs or p.outputs[0] is not node.inputs[0]:
                return None
            return Fold(p, node)
        if len(node.inputs) != 2:
            return None
        for i in (0, 1):
            data, other = node.inputs[i], node.inputs[1 - i]
            p = producer(data)
            if p is None or p.op not in PRODUCERS or not p.outputs or p.outputs[0] is not data:
                continue
            if const_value(other) is not None:  # a Mul/Add with run-time data is not an affine map
                return Fold(p, node, other)
        return None

    def nodes(self, match: Fold) -> tuple[gs.Node, ...]:
        return (match.producer, match.follower)

    def check(self, model: Model, match: Fold) -> str | None:
        graph = model.graph
        prod, fol = match.producer, match.follower
        # The producer: constant floating weights.
        if len(prod.outputs) != 1:
            return f"{prod.name}: {len(prod.outputs)} outputs"
        reason = constant_operands_reason(graph, prod)
        if reason is not None:
            return reason
        w = weight_shape(prod)  # (its shape only: a check loads no weights)
        assert w is not None
        channels = _out_channels(prod, w)
        if prod.op == "ConvTranspose":
            group = int(prod.attrs.get("group", 1))
            if group < 1 or w[0] % group:
                return f"{prod.name}: {w[0]} input channels do not split into {group} groups"
        if prod.op == "Gemm":
            if len(w) != 2:
                return f"{prod.name}: B has rank {len(w)}, not 2"
            c = bias_value(prod)
            if c is not None and per_channel_vector(c, 2, channels) is None:
                return f"{prod.name}: bias C of shape {tuple(c.shape)} is not per column ([], [1], [N] or [1, N])"
        # The intermediate tensor.
        mid = prod.outputs[0]
        if is_graph_output(graph, mid):
            return f"intermediate tensor {mid.name!r} is a graph output"
        if len(mid.outputs) != 1:
            return f"intermediate tensor {mid.name!r} has {len(mid.outputs)} consumers"
        # The follower: constant floating parameters, a per-channel map.
        return affine_reason(graph, fol, match.operand, _out_rank(prod, w), channels)

    def describe(self, model: Model, match: Fold) -> str:
        w = weight_shape(match.producer)
        assert w is not None
        return (
            f"fold {match.follower.op} {match.follower.name} into {match.producer.op} {match.producer.name} "
            f"({_out_channels(match.producer, w)} channels)"
        )

    def cost(self, model: Model, match: Fold) -> Cost:
        prod = node_cost(model, match.producer)
        w = weight_shape(match.producer)
        assert w is not None
        has_bias = bias_tensor(match.producer) is not None or match.follower.op != "Mul"
        params_after = int(np.prod(w)) + (_out_channels(match.producer, w) if has_bias else 0)
        # The follower is elementwise (0 MACs), so MACs do not change; the fold removes a node.
        return Cost(prod.macs, prod.macs, prod.params + node_params(match.follower), params_after)

    def rewrite(self, model: Model, match: Fold) -> None:
        prod, fol = match.producer, match.follower
        w = weight_value(prod)
        assert w is not None
        b = bias_value(prod)
        channels = _out_channels(prod, w.shape)
        s, t = affine_scale_shift(fol, match.operand, channels, _out_rank(prod, w.shape))
        attrs = dict(prod.attrs)
        if prod.op == "Conv":
            w2, b2 = fold_conv(w, b, s, t)
        elif prod.op == "ConvTranspose":
            w2, b2 = fold_conv_transpose(w, b, s, t, int(attrs.get("group", 1)))
        else:
            w2, b2 = fold_gemm(w, b, s, t, bool(attrs.get("transB", 0)), float(attrs.get("beta", 1.0)))
            if b2 is not None:
                attrs["beta"] = 1.0
        names = NameFactory(model.graph)
        base = prod.name.removesuffix("_folded")
        inputs = [prod.inputs[0], constant(names, f"{base}_W_folded", stored_as(w2, w.dtype))]
        if b2 is not None:
            inputs.append(constant(names, f"{base}_B_folded", stored_as(b2, w.dtype)))
        folded = gs.Node(prod.op, name=names(f"{base}_folded"), attrs=attrs, inputs=inputs, outputs=list(fol.outputs))
        replace_nodes(model.graph, [prod, fol], [folded])
