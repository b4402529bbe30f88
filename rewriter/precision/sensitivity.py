"""A cheap sensitivity proxy for int8 nodes: the quantization noise each node adds, from one run of the float
model and one of its full-int8 QDQ model on a few calibration feeds (two onnxruntime sessions in all, with
graph optimizations disabled and the tensors needed exposed as outputs).

With ``nsr(c, r) = max_ch sum (c - r)^2 / sum r^2`` (noise-to-signal power of the worst channel, axis 1, over
the feeds: a small channel next to a large one -- a class score near 0 beside one near 1, a channel 1000x
smaller than an outlier -- is what 8 bits lose, and a whole-tensor ratio would hide it) and, for a node ``N``
of the int8 model:

* ``out(N) = nsr(int8 value of N's output before its QuantizeLinear/DequantizeLinear pair, float value)``,
  or *after* the pair when the output is a graph output;
* ``in(N) = max`` over N's activation inputs ``x`` of ``nsr(int8 value of x before its QDQ pair, float x)``
  (0 for graph inputs): the noise that reaches N from upstream, before N's own input is quantized;

the node's sensitivity is ``max(0, out(N) - in(N))``: the relative noise power that quantizing N's inputs
and weights adds (and its output's, for a graph output). A tensor's quantization is charged to its
consumers, and to its producer only when it is a graph output (no consumer): onnxruntime keeps a tensor
float only when its producer and every consumer are float, which is how the search's exclusion sets are
closed (:func:`rewriter.precision.search.exclusion`). Quantization noise is roughly independent from layer
to layer, so noise powers add and the difference isolates the node; far downstream of a node that breaks the
budget, the noise already there hides what a node adds (its sensitivity reads near 0). It is a ranking, not
a promise: the search checks every exclusion set it keeps against the budget.

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


def _per_channel(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of squares per channel (axis 1 of each array of rank >= 2; one channel otherwise), over the arrays."""
    total = None
    for a in arrays:
        a = np.asarray(a, np.float64)
        sq = np.sum(a**2, axis=tuple(i for i in range(a.ndim) if i != 1)) if a.ndim >= 2 else np.array([np.sum(a**2)])
        total = sq if total is None else total + sq
    return np.zeros(1) if total is None else total


def nsr(cand: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> float:
    """The worst channel's ``sum (c - r)^2 / sum r^2`` over all arrays (channels: axis 1); a channel whose
    reference is zero counts as 0 when equal, else ``inf``."""
    num = _per_channel([np.asarray(c, np.float64) - np.asarray(r, np.float64) for c, r in zip(cand, ref)])
    den = _per_channel(ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))
    return float(np.max(ratio)) if ratio.size else 0.0


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
    outputs = {o.name for o in float_model.graph.output}
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
        final = names.float_name(node.output[0], before_activation=False) in outputs
        f_out = names.float_name(node.output[0], before_activation=not final)
        out[unit] = (inputs, None if f_out is None else (names.after_qdq(node.output[0]) if final else node.output[0], f_out))
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
