"""Shared test helpers: models from ONNX text, numeric equality through onnxruntime, op histograms."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from rewriter.graph import op_histogram
from rewriter.shapes import graph_inputs, resolve_input_shapes
from rewriter.validation.feeds import input_specs, random_feeds

RTOL = 1e-4
ATOL = 1e-5


def parse(text: str, seed: int = 0) -> onnx.ModelProto:
    """A model from ONNX text syntax (onnx.parser), checked in full.

    Tensors declared in the graph's ``<...>`` block without a value (``<float[8, 4, 3, 3] W>``) become
    seeded random initializers: N(0, 1) floats, except names containing ``var`` (BatchNormalization
    variances), which are drawn from U(0.5, 1.5) to stay positive.
    """
    model = onnx.parser.parse_model(text)
    graph = model.graph
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    rng = np.random.default_rng(seed)
    keep = []
    for vi in graph.value_info:
        if vi.name in produced:
            keep.append(vi)
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = tuple(d.dim_value for d in tt.shape.dim)
        if "var" in vi.name.lower():
            values = rng.uniform(0.5, 1.5, size=shape)
        elif np.dtype(dtype).kind == "f":
            values = rng.standard_normal(shape)
        else:
            values = rng.integers(1, 4, size=shape)
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(values).astype(dtype), vi.name))
    del graph.value_info[:]
    graph.value_info.extend(keep)
    onnx.checker.check_model(model, full_check=True)
    return model


def run_reference(model: onnx.ModelProto, feeds: Sequence[dict]) -> list[list[np.ndarray]]:
    """Outputs under onnxruntime with graph optimizations disabled (the reference setting)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [sess.run(None, feed) for feed in feeds]


def feeds_for(model: onnx.ModelProto, count: int = 3, seed: int = 0, input_shapes: dict | None = None) -> list[dict]:
    shapes = resolve_input_shapes(model, input_shapes)
    return random_feeds(input_specs(model, shapes), count, seed=seed)


def assert_same_outputs(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    *,
    feeds: Sequence[dict] | None = None,
    rtol: float = RTOL,
    atol: float = ATOL,
    input_shapes: dict | None = None,
) -> None:
    """Both models give the same outputs (allclose at rtol/atol) on the same feeds."""
    feeds = feeds if feeds is not None else feeds_for(before, input_shapes=input_shapes)
    ref = run_reference(before, feeds)
    got = run_reference(after, feeds)
    for r_feed, g_feed in zip(ref, got):
        assert len(r_feed) == len(g_feed)
        for r, g in zip(r_feed, g_feed):
            np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


def ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op histogram of the main graph."""
    return op_histogram(model.graph.node)


def input_names(model: onnx.ModelProto) -> list[str]:
    return [vi.name for vi in graph_inputs(model)]


def assert_valid(validator, data: dict) -> None:  # type: ignore[no-untyped-def]
    """Every error of ``data`` against a JSON Schema validator (the ``report_validator`` fixture), listed."""
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])
