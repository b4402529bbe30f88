"""conv1x1_to_gemm: 1x1 convolutions on 1x1 spatial inputs, and chains of Gemm/MatMul, as fewer Gemms.

A 1x1 conv (group 1, no padding) whose input is ``[N, C, 1, ..., 1]`` (after GlobalAveragePool: SE blocks,
classifier heads) is a plain affine map of the rows of ``X.reshape(N, C)``. In the column convention of
``compose_pointwise`` every linear op here is ``y = W x + b`` with ``W`` shaped ``[out, in]``:

* 1x1 conv, weight ``[O, C, 1, 1]``:  ``W = weight.reshape(O, C)``, ``b = bias``;
* ``Gemm(A, B, C, alpha, beta, transA=0, transB)``:  ``W = alpha * (B if transB else B^T)``,
  ``b = beta * C`` (C broadcast along rows: shape ``[]``, ``[1]``, ``[P]``, ``[1, 1]`` or ``[1, P]``);
* ``MatMul(A, B)`` with a 2-D constant ``B``:  ``W = B^T``, no bias.

Two affine maps in a row compose as (``compose_pointwise``)::

    W = W2 @ W1          b = W2 @ b1 + b2

Three rewrites, one candidate each (an anchor node tries them in this order and takes the first whose
preconditions hold):

1. ``conv_into_gemm`` -- Conv1x1 -> Flatten(axis 1) | Reshape to ``[N, O]`` -> Gemm | MatMul becomes
   Flatten -> one Gemm with ``W = W_gemm @ W_conv``, ``b = W_gemm @ b_conv + C``. A MatMul head becomes a
   MatMul when the conv has no bias, else a Gemm carrying the folded bias. Kept only where it lowers MACs.
2. ``conv_as_gemm`` -- a 1x1 conv on a 1x1 input alone becomes Flatten -> Gemm(transB=1, W [O, C], bias).
   When the conv's only consumer is a Flatten/Reshape to ``[N, O]`` that node is absorbed (Conv + Flatten
   -> Flatten + Gemm, no extra node); otherwise a Reshape back to ``[N, O, 1, ..]`` follows, which makes
   the rewrite pay only if Gemm is faster than Conv on that runtime -- the pipeline's latency gate decides.
3. ``gemm_chain`` -- Gemm/MatMul -> Gemm/MatMul with constant right operands and nothing between becomes
   one Gemm (MatMul when both are MatMuls). For ``[K -> H -> N]`` MACs per row go from ``K*H + H*N`` to
   ``K*N``; fused only when that is lower.

MACs (one row of the activation, times the ``M`` rows): Conv on 1x1 = ``C*O``, Gemm/MatMul = ``K*N``.

Any conv stride is exact on a 1x1 input (``floor((1 - 1) / s) + 1 = 1``); the check still confirms the
inferred output is ``[N, O, 1, ..]``. Declined with a reason: unknown or non-1x1 spatial size, padding,
group > 1, Gemm ``transA=1``, a per-row C (``[M, N]``, M > 1), right operands that are not 2-D constants,
intermediates read elsewhere or exported, and a Reshape whose target shape is computed at run time.
MatMul -> MatMul chains also fuse on rank > 2 activations (the batch dims pass through unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
import onnx_graphsurgeon as gs

from passes.common import bias_tensor, conv_padding_free, is_pointwise_conv, opset, optional_input, stored_as, weight_shape
from passes.fuse_1x1_chain import compose_pointwise
from rewriter.analysis import node_cost
from rewriter.contract import Cost, Rule, RuleSetPass
from rewriter.graph import NameFactory, constant, const_value, constant_operands_reason, intermediate_reason, is_graph_output, replace_nodes
from rewriter.model import Model

# -- weight math (pure numpy) ---------------------------------------------------------------------------


def gemm_row_bias(c: np.ndarray, n: int) -> np.ndarray | None:
    """Gemm's C as a length-``n`` vector when it is the same for every row, else ``None`` (per-row C).

    Accepts the shapes that broadcast along rows: ``[]``, ``[1]``, ``[n]``, ``[1, 1]``, ``[1, n]``.
    """
    c = np.asarray(c)
    if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
        return None
    flat = c.reshape(-1)
    if flat.size not in (1, n):
        return None
    return np.broadcast_to(flat, (n,)).copy()


def gemm_as_pointwise(
    b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float, trans_b: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(W [N, K], bias [N] | None)`` with ``Gemm(A, B, C) = A @ W^T + bias`` (transA = 0), in float64.

    ``W = alpha * (B if transB else B^T)``, ``bias = beta * C``. Raises ``ValueError`` for a per-row C.
    """
    w = alpha * (b if trans_b else b.T).astype(np.float64)
    if c is None:
        return w, None
    row = gemm_row_bias(c, w.shape[0])
    if row is None:
        raise ValueError(f"Gemm C of shape {np.shape(c)} varies per row")
    return w, beta * row.astype(np.float64)


def conv1x1_as_pointwise(weight: np.ndarray) -> np.ndarray:
    """The ``[O, C]`` matrix of a 1x1 conv weight ``[O, C, 1, ..., 1]``."""
    return weight.reshape(weight.shape[:2])


def chain_macs_per_row(k: int, h: int, n: int) -> tuple[int, int]:
    """MACs per activation row of ``[K -> H -> N]`` before (``K*H + H*N``) and after fusing (``K*N``)."""
    return k * h + h * n, k * n


# -- helpers shared by the rules --------------------------------------------------------------------------


def _activation_dtype_reason(model: Model, tensor: gs.Tensor) -> str | None:
    dtype = model.dtype(tensor)
    if dtype is not None and np.dtype(dtype).kind != "f":
        return f"activation {tensor.name!r} is {np.dtype(dtype)}, not floating point"
    return None


def _conv_reason(model: Model, conv: gs.Node) -> str | None:
    """Why ``conv`` is not an exact affine map of ``[N, C, 1, ..]`` -> ``[N, O, 1, ..]``, or None."""
    if int(conv.attrs.get("group", 1)) != 1:
        return f"{conv.name}: grouped 1x1 conv (group {conv.attrs['group']})"
    if not conv_padding_free(conv):
        return f"{conv.name}: padding on a 1x1 conv would add a border of bias values"
    reason = constant_operands_reason(model.graph, conv) or _activation_dtype_reason(model, conv.inputs[0])
    if reason is not None:
        return reason
    x, y = model.static_shape(conv.inputs[0]), model.static_shape(conv.outputs[0])
    if x is None or len(x) < 3:
        return f"{conv.name}: input shape {model.shape(conv.inputs[0])} unknown; cannot tell whether the spatial size is 1x1"
    if any(d != 1 for d in x[2:]):
        return f"{conv.name}: input spatial size is {'x'.join(map(str, x[2:]))}, not 1x1"
    w = weight_shape(conv)
    assert w is not None
    if y is None or y != (x[0], w[0]) + (1,) * (len(x) - 2):
        return f"{conv.name}: output shape {model.shape(conv.outputs[0])} is not [N, O, 1, ..] for input {x}"
    return None


def _rows_reason(model: Model, node: gs.Node, n: int, o: int) -> str | None:
    """Why ``node`` (reading ``[N, O, 1, ..]``) is not a Flatten(axis 1) / constant Reshape to ``[N, O]``."""
    if node.op == "Flatten":
        rank = len(model.static_shape(node.inputs[0]) or ())
        axis = int(node.attrs.get("axis", 1))
        if rank == 0 or axis % rank != 1:
            return f"{node.name}: Flatten axis {axis} does not give [N, C] rows"
        return None
    if const_value(node.inputs[1]) is None:
        return f"{node.name}: Reshape target shape is computed at run time"
    out = model.static_shape(node.outputs[0])
    if out != (n, o):
        return f"{node.name}: Reshape gives {model.shape(node.outputs[0])}, not [N, C] = [{n}, {o}]"
    return None


def _is_rows_op(node: gs.Node, tensor: gs.Tensor) -> bool:
    return node.op in ("Flatten", "Reshape") and len(node.inputs) >= 1 and node.inputs[0] is tensor


def _linear_reason(node: gs.Node) -> str | None:
    """Why a Gemm/MatMul is not ``A @ W^T + b`` with a constant 2-D right operand, or None (operands aside)."""
    b = const_value(node.inputs[1])
    if b is None:
        return None  # reported by constant_operands_reason, which reads any node's constant operands
    if b.ndim != 2:
        return f"{node.name}: right operand has rank {b.ndim}, not 2"
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            return f"{node.name}: Gemm with transA=1 is not folded"
        c = optional_input(node, 2)
        n = b.shape[0] if int(node.attrs.get("transB", 0)) else b.shape[1]
        if c is not None and (cv := const_value(c)) is not None and gemm_row_bias(cv, n) is None:
            return f"{node.name}: Gemm C of shape {list(cv.shape)} varies per row; not folded"
    return None


def _as_pointwise(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None]:
    """``(W [N, K], bias | None)`` of a checked Gemm or MatMul, float64."""
    b = const_value(node.inputs[1])
    assert b is not None
    if node.op == "MatMul":
        return b.T.astype(np.float64), None
    c = optional_input(node, 2)
    return gemm_as_pointwise(
        b,
        const_value(c) if c is not None else None,
        float(node.attrs.get("alpha", 1.0)),
        float(node.attrs.get("beta", 1.0)),
        bool(int(node.attrs.get("transB", 0))),
    )


def _linear_node(
    model: Model,
    names: NameFactory,
    base: str,
    a: gs.Tensor,
    w: np.ndarray,
    bias: np.ndarray | gs.Tensor | None,
    dtype: np.dtype,
    outputs: list[gs.Tensor],
    prefer_matmul: bool,
) -> gs.Node:
    """``outputs = a @ w^T + bias``: a MatMul when asked for and there is no bias, else a Gemm(transB=1)."""
    if prefer_matmul and bias is None:
        return gs.Node("MatMul", name=names(base), inputs=[a, constant(names, f"{base}_W", stored_as(w.T, dtype))], outputs=outputs)
    inputs = [a, constant(names, f"{base}_W", stored_as(w, dtype))]
    if isinstance(bias, gs.Tensor):
        inputs.append(bias)
    elif bias is not None:
        inputs.append(constant(names, f"{base}_B", stored_as(bias, dtype)))
    elif opset(model) < 11:  # C is required before opset 11
        inputs.append(constant(names, f"{base}_B", np.zeros(w.shape[0], dtype=dtype)))
    return gs.Node("Gemm", name=names(base), attrs={"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1},
                   inputs=inputs, outputs=outputs)


# -- the rules --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvIntoGemm:
    conv: gs.Node
    rows: gs.Node  # Flatten or Reshape to [N, O]
    linear: gs.Node  # Gemm or MatMul


class ConvIntoGemmRule(Rule[ConvIntoGemm]):
    label = "conv_into_gemm"

    def match(self, model: Model, node: gs.Node) -> ConvIntoGemm | None:
        if not is_pointwise_conv(node) or len(node.outputs) != 1:
            return None
        mid = node.outputs[0]
        for rows in mid.outputs:
            if not _is_rows_op(rows, mid) or len(rows.outputs) != 1:
                continue
            for linear in rows.outputs[0].outputs:
                if linear.op in ("Gemm", "MatMul") and linear.inputs[0] is rows.outputs[0]:
                    return ConvIntoGemm(node, rows, linear)
        return None

    def nodes(self, match: ConvIntoGemm) -> tuple[gs.Node, ...]:
        return (match.conv, match.rows, match.linear)

    def check(self, model: Model, match: ConvIntoGemm) -> str | None:
        graph = model.graph
        conv, rows, linear = match.conv, match.rows, match.linear
        reason = (
            _conv_reason(model, conv)
            or intermediate_reason(graph, conv.outputs[0])
            or intermediate_reason(graph, rows.outputs[0])
            or constant_operands_reason(graph, linear)
            or _linear_reason(linear)
        )
        if reason is not None:
            return reason
        x = model.static_shape(conv.inputs[0])
        w = weight_shape(conv)
        assert x is not None and w is not None
        reason = _rows_reason(model, rows, x[0], w[0])
        if reason is not None:
            return reason
        w_lin, _ = _as_pointwise(linear)
        if w_lin.shape[1] != w[0]:
            return f"{linear.name}: takes {w_lin.shape[1]} features, the conv gives {w[0]}"
        before, after = chain_macs_per_row(w[1], w[0], w_lin.shape[0])
        if after >= before:
            return (f"fusing [{w[1]}->{w[0]}->{w_lin.shape[0]}] would raise MACs per row "
                    f"from {before} to {after}")
        return None

    def describe(self, model: Model, match: ConvIntoGemm) -> str:
        w = weight_shape(match.conv)
        assert w is not None
        w_lin, _ = _as_pointwise(match.linear)
        return (f"fold 1x1 conv {match.conv.name} ({w[1]}->{w[0]}, 1x1 spatial) + {match.rows.op} "
                f"into {match.linear.op} {match.linear.name} (->{w_lin.shape[0]}): Flatten + one "
                f"{'Gemm' if match.linear.op == 'Gemm' or bias_tensor(match.conv) is not None else 'MatMul'}")

    def cost(self, model: Model, match: ConvIntoGemm) -> Cost:
        a, b = node_cost(model, match.conv), node_cost(model, match.linear)
        x = model.static_shape(match.conv.inputs[0])
        w = weight_shape(match.conv)
        assert w is not None
        w_lin, _ = _as_pointwise(match.linear)
        has_bias = bias_tensor(match.conv) is not None or optional_input(match.linear, 2) is not None
        params_after = w[1] * w_lin.shape[0] + (w_lin.shape[0] if has_bias else 0)
        if x is None:
            return Cost(0, 0, a.params + b.params, params_after)
        return Cost(a.macs + b.macs, x[0] * w[1] * w_lin.shape[0], a.params + b.params, params_after)

    def rewrite(self, model: Model, match: ConvIntoGemm) -> None:
        conv, linear = match.conv, match.linear
        weight = const_value(conv.inputs[1])
        assert weight is not None
        bias_t = optional_input(conv, 2)
        b_conv = const_value(bias_t) if bias_t is not None else None
        w_lin, b_lin = _as_pointwise(linear)
        w, b = compose_pointwise(conv1x1_as_pointwise(weight).astype(np.float64), b_conv, w_lin, b_lin)
        names = NameFactory(model.graph)
        flat = gs.Variable(names(f"{conv.name}_rows"), dtype=weight.dtype)
        new = [
            gs.Node("Flatten", name=names(f"{conv.name}_flatten"), attrs={"axis": 1}, inputs=[conv.inputs[0]], outputs=[flat]),
            _linear_node(model, names, f"{conv.name}_{linear.name}_fused", flat, w, b, weight.dtype,
                         list(linear.outputs), prefer_matmul=linear.op == "MatMul"),
        ]
        replace_nodes(model.graph, [conv, match.rows, linear], new)


@dataclass(frozen=True)
class ConvAsGemm:
    conv: gs.Node
    rows: gs.Node | None  # a Flatten/Reshape to [N, O] absorbed into the rewrite, if the conv feeds one


class ConvAsGemmRule(Rule[ConvAsGemm]):
    label = "conv_as_gemm"

    def match(self, model: Model, node: gs.Node) -> ConvAsGemm | None:
        if not is_pointwise_conv(node) or len(node.outputs) != 1:
            return None
        mid = node.outputs[0]
        users = mid.outputs
        x, w = model.static_shape(node.inputs[0]), weight_shape(node)
        if (
            len(users) == 1 and not is_graph_output(model.graph, mid) and _is_rows_op(users[0], mid)
            and len(users[0].outputs) == 1 and x is not None and w is not None
            and _rows_reason(model, users[0], x[0], w[0]) is None
        ):
            return ConvAsGemm(node, users[0])
        return ConvAsGemm(node, None)

    def nodes(self, match: ConvAsGemm) -> tuple[gs.Node, ...]:
        return (match.conv,) if match.rows is None else (match.conv, match.rows)

    def check(self, model: Model, match: ConvAsGemm) -> str | None:
        return _conv_reason(model, match.conv)

    def describe(self, model: Model, match: ConvAsGemm) -> str:
        w = weight_shape(match.conv)
        assert w is not None
        head = f"1x1 conv {match.conv.name} ({w[1]}->{w[0]}) on a 1x1 input"
        if match.rows is not None:
            return f"{head} + {match.rows.op} as Flatten + Gemm (same MACs, same node count)"
        return (f"{head} as Flatten + Gemm + Reshape (same MACs, two extra reshapes; pays only if Gemm "
                f"beats Conv here)")

    def cost(self, model: Model, match: ConvAsGemm) -> Cost:
        c = node_cost(model, match.conv)
        return Cost(c.macs, c.macs, c.params, c.params)

    def rewrite(self, model: Model, match: ConvAsGemm) -> None:
        conv = match.conv
        weight = const_value(conv.inputs[1])
        x = model.static_shape(conv.inputs[0])
        assert weight is not None and x is not None
        names = NameFactory(model.graph)
        flat = gs.Variable(names(f"{conv.name}_rows"), dtype=weight.dtype)
        new = [gs.Node("Flatten", name=names(f"{conv.name}_flatten"), attrs={"axis": 1}, inputs=[conv.inputs[0]], outputs=[flat])]
        w = conv1x1_as_pointwise(weight).copy()
        if match.rows is not None:
            new.append(_linear_node(model, names, f"{conv.name}_gemm", flat, w, optional_input(conv, 2), weight.dtype,
                                    list(match.rows.outputs), prefer_matmul=False))
            replace_nodes(model.graph, [conv, match.rows], new)
            return
        rows = gs.Variable(names(f"{conv.name}_gemm_out"), dtype=weight.dtype)
        new.append(_linear_node(model, names, f"{conv.name}_gemm", flat, w, optional_input(conv, 2), weight.dtype,
                                [rows], prefer_matmul=False))
        shape = constant(names, f"{conv.name}_shape", np.array([-1, weight.shape[0]] + [1] * (len(x) - 2), dtype=np.int64))
        new.append(gs.Node("Reshape", name=names(f"{conv.name}_unflatten"), inputs=[rows, shape], outputs=list(conv.outputs)))
        replace_nodes(model.graph, [conv], new)


@dataclass(frozen=True)
class GemmChain:
    first: gs.Node
    second: gs.Node


class GemmChainRule(Rule[GemmChain]):
    label = "gemm_chain"

    def match(self, model: Model, node: gs.Node) -> GemmChain | None:
        if node.op not in ("Gemm", "MatMul") or len(node.outputs) != 1 or len(node.inputs) < 2:
            return None
        mid = node.outputs[0]
        for user in mid.outputs:
            if user.op in ("Gemm", "MatMul") and len(user.inputs) >= 2 and user.inputs[0] is mid and user.inputs[1] is not mid:
                return GemmChain(node, user)
        return None

    def nodes(self, match: GemmChain) -> tuple[gs.Node, ...]:
        return (match.first, match.second)

    def check(self, model: Model, match: GemmChain) -> str | None:
        graph = model.graph
        first, second = match.first, match.second
        reason = (
            constant_operands_reason(graph, first)
            or constant_operands_reason(graph, second)
            or _linear_reason(first)
            or _linear_reason(second)
            or intermediate_reason(graph, first.outputs[0])
            or _activation_dtype_reason(model, first.inputs[0])
        )
        if reason is not None:
            return reason
        a = model.static_shape(first.inputs[0])
        if a is None:
            return f"{first.name}: input shape {model.shape(first.inputs[0])} unknown"
        if len(a) < 2:
            return f"{first.name}: rank-{len(a)} activation; only rank 2 and up are fused"
        w1, _ = _as_pointwise(first)
        w2, _ = _as_pointwise(second)
        if w2.shape[1] != w1.shape[0] or a[-1] != w1.shape[1]:
            return f"operand shapes {w1.shape} and {w2.shape} do not chain"
        k, h, n = w1.shape[1], w1.shape[0], w2.shape[0]
        before, after = chain_macs_per_row(k, h, n)
        if after >= before:
            return (f"fusing [{k}->{h}->{n}] would raise MACs per row: K*N = {after} >= K*H + H*N = {before}")
        return None

    def describe(self, model: Model, match: GemmChain) -> str:
        w1, _ = _as_pointwise(match.first)
        w2, _ = _as_pointwise(match.second)
        return (f"fuse {match.first.op} {match.first.name} ({w1.shape[1]}->{w1.shape[0]}) + {match.second.op} "
                f"{match.second.name} (->{w2.shape[0]}) into one {self._fused_op(match)}")

    @staticmethod
    def _fused_op(match: GemmChain) -> str:
        return "MatMul" if match.first.op == match.second.op == "MatMul" else "Gemm"

    def cost(self, model: Model, match: GemmChain) -> Cost:
        a, b = node_cost(model, match.first), node_cost(model, match.second)
        w1, b1 = _as_pointwise(match.first)
        w2, b2 = _as_pointwise(match.second)
        params_after = w1.shape[1] * w2.shape[0] + (w2.shape[0] if b1 is not None or b2 is not None else 0)
        x = model.static_shape(match.first.inputs[0])
        if x is None or a.macs == 0 or b.macs == 0:
            return Cost(0, 0, a.params + b.params, params_after)
        return Cost(a.macs + b.macs, prod(x[:-1]) * w1.shape[1] * w2.shape[0], a.params + b.params, params_after)

    def rewrite(self, model: Model, match: GemmChain) -> None:
        first, second = match.first, match.second
        w1, b1 = _as_pointwise(first)
        w2, b2 = _as_pointwise(second)
        w, b = compose_pointwise(w1, b1, w2, b2)
        dtype = const_value(first.inputs[1]).dtype  # type: ignore[union-attr]
        names = NameFactory(model.graph)
        fused = _linear_node(model, names, f"{first.name}_{second.name}_fused", first.inputs[0], w, b, dtype,
                             list(second.outputs), prefer_matmul=self._fused_op(match) == "MatMul")
        replace_nodes(model.graph, [first, second], [fused])


# -- the pass ---------------------------------------------------------------------------------------------


class Conv1x1ToGemm(RuleSetPass):
    """Tries, per anchor node, ``conv_into_gemm``, then ``conv_as_gemm``, then ``gemm_chain``."""

    name = "conv1x1_to_gemm"
    summary = ("1x1 convs on 1x1 spatial inputs as Gemm, folded into a following Gemm/MatMul head where it "
               "lowers MACs; fuse Gemm/MatMul chains with nothing between them.")
    exact = True

    _rules: tuple[Rule, ...] = (ConvIntoGemmRule(), ConvAsGemmRule(), GemmChainRule())

    def rules(self) -> tuple[Rule, ...]:
        return self._rules
