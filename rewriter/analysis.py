"""Cost analysis: multiply-accumulates (MACs) and parameters per node, and the ranking of expensive convs.

Formulas (one MAC = one multiply and one add; bias adds are not counted):

* Conv:          MACs = N * C_out * H_out * W_out * (C_in / group) * prod(kernel)
* ConvTranspose: MACs = N * C_in * H_in * W_in * (C_out / group) * prod(kernel)
* Gemm:          MACs = M * N * K
* MatMul:        MACs = prod(batch) * M * N * K   (numpy broadcasting of the batch dims)

Params are the element counts of a node's floating-point constant inputs (weights, biases, BN
statistics); each shared constant is counted once in the total.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import prod
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rewriter.graph import const_info, const_value, op_histogram
from rewriter.model import Model


@dataclass(frozen=True)
class NodeCost:
    name: str
    op: str
    macs: int
    params: int
    kernel: tuple[int, ...] = ()
    group: int = 1
    in_channels: int | None = None
    out_channels: int | None = None
    output_shape: tuple[int, ...] | None = None

    @property
    def is_dense_kxk_conv(self) -> bool:
        """A dense (group 1) convolution with a kernel of at least 3 along some axis."""
        return self.op == "Conv" and self.group == 1 and bool(self.kernel) and max(self.kernel) >= 3


def _const_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    info = const_info(tensor)
    return None if info is None else info[1]


def _const_meta(tensor: gs.Tensor) -> tuple[np.dtype, int] | None:
    """The dtype and element count of a load-time constant (see :func:`rewriter.graph.const_info`)."""
    info = const_info(tensor)
    return None if info is None else (info[0], int(prod(info[1])))


def _float_size(tensor: gs.Tensor) -> int | None:
    meta = _const_meta(tensor)
    return meta[1] if meta is not None and meta[0].kind == "f" else None


#: Inputs of the quantization ops that are not weights: scales and zero points.
_QUANT_OPS = ("QuantizeLinear", "DequantizeLinear")


def _param_inputs(node: gs.Node) -> list[tuple[gs.Tensor, int]]:
    """The node's constant inputs that are parameters, with their element counts: floating-point constants
    (weights, biases, BN statistics); for a DequantizeLinear, the quantized tensor it reads (an int8 QDQ
    model's weights and biases) and not its scale or zero point; nothing of a QuantizeLinear."""
    if node.op in _QUANT_OPS:
        if node.op == "QuantizeLinear" or not node.inputs:
            return []
        meta = _const_meta(node.inputs[0])
        return [] if meta is None else [(node.inputs[0], meta[1])]
    return [(t, n) for t in node.inputs if (n := _float_size(t)) is not None]


def node_params(node: gs.Node) -> int:
    """Elements of the node's parameters (see :func:`_param_inputs`)."""
    return sum(n for _, n in _param_inputs(node))


def _weight_shape(model: Model, node: gs.Node) -> tuple[int, ...] | None:
    if len(node.inputs) < 2:
        return None
    shape = _const_shape(node.inputs[1])
    return shape if shape is not None else model.static_shape(node.inputs[1])


def conv_macs(out_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
    """N * C_out * prod(spatial_out) * (C_in/group) * prod(kernel); weight is [C_out, C_in/group, *k]."""
    return prod(out_shape) * prod(weight_shape[1:])


def conv_transpose_macs(in_shape: tuple[int, ...], weight_shape: tuple[int, ...], group: int) -> int:
    """N * C_in * prod(spatial_in) * (C_out/group) * prod(kernel); weight is [C_in, C_out/group, *k]."""
    return prod(in_shape) * prod(weight_shape[1:])


def matmul_macs(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
    """prod(broadcast batch) * M * K * N with numpy's 1-D promotion rules."""
    a = a_shape if len(a_shape) > 1 else (1,) + tuple(a_shape)
    b = b_shape if len(b_shape) > 1 else tuple(b_shape) + (1,)
    batch_a, batch_b = a[:-2], b[:-2]
    width = max(len(batch_a), len(batch_b))
    batch_a = (1,) * (width - len(batch_a)) + batch_a
    batch_b = (1,) * (width - len(batch_b)) + batch_b
    batch = prod(max(x, y) for x, y in zip(batch_a, batch_b))
    return batch * a[-2] * a[-1] * b[-1]


def gemm_macs(a_shape: tuple[int, ...], b_shape: tuple[int, ...], trans_a: int, trans_b: int) -> int:
    m, k = (a_shape[1], a_shape[0]) if trans_a else (a_shape[0], a_shape[1])
    n = b_shape[0] if trans_b else b_shape[1]
    return m * k * n


def node_cost(model: Model, node: gs.Node) -> NodeCost:
    """MACs and params of one node; MACs are 0 for ops this module does not count or cannot size."""
    params = node_params(node)
    op = node.op
    try:
        if op in ("Conv", "ConvTranspose"):
            w = _weight_shape(model, node)
            group = int(node.attrs.get("group", 1))
            if w is None:
                return NodeCost(node.name, op, 0, params, group=group)
            kernel = tuple(w[2:])
            if op == "Conv":
                out = model.static_shape(node.outputs[0])
                macs = conv_macs(out, w) if out else 0
                cin, cout = w[1] * group, w[0]
            else:
                inp = model.static_shape(node.inputs[0])
                out = model.static_shape(node.outputs[0])
                macs = conv_transpose_macs(inp, w, group) if inp else 0
                cin, cout = w[0], w[1] * group
            return NodeCost(node.name, op, macs, params, kernel, group, cin, cout, out)
        if op == "Gemm":
            a, b = model.static_shape(node.inputs[0]), _weight_shape(model, node)
            macs = gemm_macs(a, b, int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))) if a and b else 0
            return NodeCost(node.name, op, macs, params, output_shape=model.static_shape(node.outputs[0]))
        if op == "MatMul":
            a, b = model.static_shape(node.inputs[0]), model.static_shape(node.inputs[1])
            if b is None and (v := const_value(node.inputs[1])) is not None:
                b = tuple(v.shape)
            macs = matmul_macs(a, b) if a and b else 0
            return NodeCost(node.name, op, macs, params, output_shape=model.static_shape(node.outputs[0]))
    except (IndexError, TypeError, ValueError):
        pass
    return NodeCost(node.name, op, 0, params)


@dataclass(frozen=True)
class Analysis:
    nodes: list[NodeCost]
    histogram: dict[str, int]
    total_macs: int
    total_params: int

    def expensive_convs(self, min_kernel: int = 3) -> list[tuple[NodeCost, float]]:
        """Dense KxK convs (k >= ``min_kernel``), most MACs first, each with its share of the model's MACs."""
        convs = [c for c in self.nodes if c.is_dense_kxk_conv and max(c.kernel) >= min_kernel]
        convs.sort(key=lambda c: (-c.macs, c.name))
        total = self.total_macs or 1
        return [(c, c.macs / total) for c in convs]

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        ranked = self.expensive_convs()
        return {
            "total_macs": self.total_macs,
            "total_params": self.total_params,
            "op_histogram": self.histogram,
            "expensive_convs": [
                {**asdict(c), "share": share} for c, share in (ranked if top is None else ranked[:top])
            ],
            "nodes": [asdict(c) for c in self.nodes],
        }


#: ONNX floating-point tensor types by name.
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.BFLOAT16: "bfloat16",
}


def weights_dtype(proto: onnx.ModelProto) -> str | None:
    """The floating-point type that holds most elements of the main graph's constants (initializers and
    ``Constant`` nodes' ``value`` tensors): ``"float16"`` for a model converted to half precision (its few
    float32 constants, e.g. those of ops the converter keeps in float32, are outvoted), ``"float32"`` for
    most models; ``None`` without floating-point constants. Reads sizes only, never tensor data."""
    counts: dict[str, int] = {}
    constants = [a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in [*proto.graph.initializer, *constants]:
        name = _FLOAT_TYPES.get(t.data_type)
        if name is not None:
            counts[name] = counts.get(name, 0) + prod(t.dims)
    return max(counts, key=lambda k: counts[k]) if counts else None


def analyze(model: Model) -> Analysis:
    """Cost of every node of the model's main graph."""
    costs = [node_cost(model, n) for n in model.graph.nodes]
    # Params: each constant counted once even when shared.
    seen: set[int] = set()
    total_params = 0
    for n in model.graph.nodes:
        for t, size in _param_inputs(n):
            if id(t) not in seen:
                seen.add(id(t))
                total_params += size
    return Analysis(costs, op_histogram(model.graph.nodes), sum(c.macs for c in costs), total_params)
