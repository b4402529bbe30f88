"""A tiny helper to write CNNs with onnx.helper and seeded weights.

Weights are He-normal (std = sqrt(2 / fan_in)) so activations keep a sane scale through ReLU nets; biases
are small. Random weights are for structure and latency only: they have flat spectra and say nothing
about the accuracy of lossy rewrites.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class NetBuilder:
    def __init__(self, seed: int = 0, opset: int = 17, *, float32_draws: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        #: Draw weights as float32 normals (3x faster for 100M-parameter nets; another random stream).
        self.float32_draws = float32_draws
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        if self.float32_draws:
            w = self.rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(np.sqrt(2.0 / fan_in))
        else:
            w = (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        self.inits.append(numpy_helper.from_array(w, name))
        return name

    def bias(self, name: str, n: int) -> str:
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(n) * 0.05).astype(np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int | tuple[int, int], *, stride: int = 1, group: int = 1,
             pad: int | None = None, bias: bool = True, name: str = "conv") -> str:
        kh, kw = (k, k) if isinstance(k, int) else k
        node = self._name(name)
        w = self.weight(f"{node}.W", (cout, cin // group, kh, kw), (cin // group) * kh * kw)
        inputs = [x, w] + ([self.bias(f"{node}.B", cout)] if bias else [])
        ph, pw = (kh // 2, kw // 2) if pad is None else (pad, pad)
        y = f"{node}.out"
        self.nodes.append(helper.make_node("Conv", inputs, [y], name=node, kernel_shape=[kh, kw],
                                           strides=[stride, stride], pads=[ph, pw, ph, pw], group=group))
        return y

    def op(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> str:  # type: ignore[no-untyped-def]
        node = self._name(name or op.lower())
        y = f"{node}.out"
        self.nodes.append(helper.make_node(op, inputs, [y], name=node, **attrs))
        return y

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer holding ``value`` as is."""
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def clip(self, x: str, lo: float, hi: float) -> str:
        """``Clip(x, lo, hi)`` with constant bounds (ReLU6 is ``clip(x, 0, 6)``)."""
        node = self._name("clip")
        bounds = [self.const(f"{node}.{k}", np.array(v, np.float32)) for k, v in (("min", lo), ("max", hi))]
        y = f"{node}.out"
        self.nodes.append(helper.make_node("Clip", [x] + bounds, [y], name=node))
        return y

    def pool(self, op: str, x: str, k: int, stride: int, *, pad: int = 0, ceil_mode: bool = False) -> str:
        """``MaxPool``/``AveragePool`` with a square kernel, symmetric pads and optional ceil mode."""
        attrs = {"kernel_shape": [k, k], "strides": [stride, stride], "pads": [pad] * 4}
        if ceil_mode:
            attrs["ceil_mode"] = 1
        return self.op(op, [x], **attrs)

    def conv_relu(self, x: str, cin: int, cout: int, k: int, **kw) -> str:  # type: ignore[no-untyped-def]
        return self.relu(self.conv(x, cin, cout, k, **kw))

    def batchnorm(self, x: str, c: int, scale: float = 1.0) -> str:
        """Inference BN with random statistics; ``scale`` multiplies its gamma (e.g. to damp a residual branch)."""
        node = self._name("bn")
        params = {
            "scale": scale * (1.0 + 0.1 * self.rng.standard_normal(c)),
            "B": 0.1 * self.rng.standard_normal(c),
            "mean": 0.1 * self.rng.standard_normal(c),
            "var": 0.5 + self.rng.random(c),
        }
        names = []
        for key, value in params.items():
            self.inits.append(numpy_helper.from_array(value.astype(np.float32), f"{node}.{key}"))
            names.append(f"{node}.{key}")
        y = f"{node}.out"
        self.nodes.append(helper.make_node("BatchNormalization", [x] + names, [y], name=node, epsilon=1e-5))
        return y

    def gemm(self, x: str, cin: int, cout: int) -> str:
        node = self._name("fc")
        w = self.weight(f"{node}.W", (cout, cin), cin)
        b = self.bias(f"{node}.B", cout)
        y = f"{node}.out"
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [y], name=node, transB=1))
        return y

    def model(self, inp: str, in_shape: list[int | str], out: str, out_shape: list[int | str], name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(inp, TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="onnx-bottleneck-models")
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model
