"""A cheap sensitivity proxy for int8 nodes: the quantization noise each node adds, from one run of the float
model and one of its full-int8 QDQ model on a few calibration feeds (two onnxruntime sessions in all, with
graph optimizations disabled and the tensors needed exposed as outputs).

With ``nsr(c, r) = sum (c - r)^2 / sum r^2`` (noise-to-signal power, over the feeds) and, for a node ``N`` of
the int8 model:

* ``out(N) = nsr(int8 value of N's output after its QuantizeLinear/DequantizeLinear pair (the raw output when
  it has none), float value of the same tensor)``;
* ``in(N) = max`` over N's activation inputs ``x`` of ``nsr(int8 value of x before its QDQ pair, float x)``
  (0 for graph inputs): the noise that reaches N from upstream, before N's own input is quantized;

the node's sensitivity is ``max(0, out(N) - in(N))``: the relative noise power quantizing N's input, its
weights and its output adds. Quantization noise is roughly independent from layer to layer, so noise powers
add and the difference isolates the node. It is a ranking, not a promise: the search checks every exclusion
set it keeps against the budget.

Name matching: the QDQ quantizer keeps the float model's tensor names, except that a graph output written by
a quantized node is renamed ``<name>_QuantizeLinear_Input``, and a Relu/Clip it drops (fused into the
following QuantizeLinear's range) leaves its output name on the node before it, holding the value *before*
the activation: such a pre-QDQ value is compared with the float input of the dropped Relu/Clip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from rewriter.validation.runtime import reference_session

_Q_INPUT = "_QuantizeLinear_Input"
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def nsr(cand: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> float:
    """``sum (c - r)^2 / sum r^2`` over all arrays (``inf`` when the reference is zero and they differ)."""
    num = sum(float(np.sum((np.asarray(c, np.float64) - np.asarray(r, np.float64)) ** 2)) for c, r in zip(cand, ref))
    den = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in ref)
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def _run(model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """The values of tensors ``names`` on each feed (exposed as extra graph outputs)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    have = {o.name for o in work.graph.output}
    for name in names:
        if name not in have:
            work.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = reference_session(work)
    wanted = list(dict.fromkeys(names))
    out: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
    for feed in feeds:
        for name, value in zip(wanted, session.run(wanted, dict(feed))):
            out[name].append(value)
    return out


class _Names:
    """Maps tensors of the int8 model to the float model's (see the module docstring)."""

    def __init__(self, float_model: onnx.ModelProto, int8: onnx.ModelProto) -> None:
        self.float_producer = {o: n for n in float_model.graph.node for o in n.output}
        self.float_tensors = set(self.float_producer) | {i.name for i in float_model.graph.input}
        kept = {n.name for n in int8.graph.node}
        self.dropped = {n.name for n in float_model.graph.node if n.name not in kept}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in int8.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.producer = {o: n for n in int8.graph.node for o in n.output}

    def float_name(self, tensor: str, before_activation: bool) -> str | None:
        name = tensor[: -len(_Q_INPUT)] if tensor.endswith(_Q_INPUT) else tensor
        if before_activation:
            while name in self.float_producer and self.float_producer[name].name in self.dropped:
                name = self.float_producer[name].input[0]
        return name if name in self.float_tensors else None

    def after_qdq(self, tensor: str) -> str:
        """The DequantizeLinear output that carries ``tensor`` after its QDQ pair, or ``tensor``."""
        for q in self.consumers.get(tensor, []):
            if q.op_type == "QuantizeLinear":
                for dq in self.consumers.get(q.output[0], []):
                    if dq.op_type == "DequantizeLinear":
                        return dq.output[0]
        return tensor

    def before_qdq(self, tensor: str) -> str:
        """The tensor a DequantizeLinear output ``tensor`` was quantized from, or ``tensor``."""
        dq = self.producer.get(tensor)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = self.producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                return q.input[0]
        return tensor


def _pairs(float_model: onnx.ModelProto, int8: onnx.ModelProto, units: Sequence[str]) -> dict[str, tuple[list[tuple[str, str]], tuple[str, str] | None]]:
    """Per unit: its (int8 tensor, float tensor) input pairs and its output pair."""
    names = _Names(float_model, int8)
    weights = {t.name for t in int8.graph.initializer}
    by_name = {n.name: n for n in int8.graph.node}
    out: dict[str, tuple[list[tuple[str, str]], tuple[str, str] | None]] = {}
    for unit in units:
        node = by_name.get(unit)
        if node is None or not node.output:
            continue
        inputs = []
        for x in node.input:
            if not x or x in weights:
                continue
            src, made_by = names.before_qdq(x), names.producer.get(x)
            if src in weights or (made_by is not None and made_by.op_type == "DequantizeLinear" and src == x):
                continue  # a weight or bias, dequantized or float
            f = names.float_name(src, before_activation=True)
            if f is not None:
                inputs.append((src, f))
        f_out = names.float_name(node.output[0], before_activation=False)
        out[unit] = (inputs, None if f_out is None else (names.after_qdq(node.output[0]), f_out))
    return out


def sensitivities(float_model: onnx.ModelProto, int8: onnx.ModelProto, units: Sequence[str],
                  feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Each unit's ``max(0, out - in)`` (module docstring); a unit whose tensors cannot be matched gets 0."""
    pairs = _pairs(float_model, int8, units)
    int8_names = {a for ins, o in pairs.values() for a, _ in ins + ([o] if o else [])}
    float_names = {b for ins, o in pairs.values() for _, b in ins + ([o] if o else [])}
    graph_inputs = {i.name for i in float_model.graph.input}
    qv = _run(int8, sorted(int8_names - graph_inputs), feeds)
    fv = _run(float_model, sorted(float_names - graph_inputs), feeds)
    for name in graph_inputs:
        qv[name] = fv[name] = [np.asarray(f[name]) for f in feeds if name in f]
    result = {}
    for unit in units:
        ins, o = pairs.get(unit, ([], None))
        if o is None:
            result[unit] = 0.0
            continue
        noise_in = max((nsr(qv[a], fv[b]) for a, b in ins), default=0.0)
        result[unit] = max(0.0, nsr(qv[o[0]], fv[o[1]]) - noise_in)
    return result
