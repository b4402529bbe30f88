"""Extract the region a rewrite touched, before and after, as two small standalone models.

The region *before* is the candidate's nodes in the accepted model. Its *outputs* are the tensors it
hands to the rest of the graph (the contract keeps their names). The region *after* is found in the
rewritten model by walking back from those outputs until a tensor is a region input, a constant, a graph
input, or the output of a node the rewrite did not touch. Timing the two regions on the same boundary
feeds is the fast path for judging a single rewrite's latency.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from rewriter.model import Model


@dataclass(frozen=True)
class Region:
    model: onnx.ModelProto
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    nodes: tuple[str, ...]


class RegionError(Exception):
    """The region cannot be extracted (e.g. a boundary tensor without a static shape)."""


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in graph.node for out in n.output if out}


def region_outputs(model: Model, node_names: Collection[str]) -> tuple[str, ...]:
    """Tensors produced inside the region and read outside it (or graph outputs)."""
    graph = model.proto.graph
    inside = set(node_names)
    produced = [o for n in graph.node if n.name in inside for o in n.output if o]
    graph_outputs = {o.name for o in graph.output}
    read_outside = {i for n in graph.node if n.name not in inside for i in n.input}
    for n in graph.node:  # tensors read by subgraphs of outside nodes
        if n.name not in inside:
            for attr in n.attribute:
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    read_outside.update(i for sn in g.node for i in sn.input)
    return tuple(t for t in produced if t in graph_outputs or t in read_outside)


def extract_region(model: Model, outputs: tuple[str, ...], rewritten: Collection[str], known_shapes: Model) -> Region:
    """The nodes computing ``outputs`` back to the region's boundary, as a standalone model.

    ``rewritten``: names of nodes the rewrite touched (walked through); any other existing node is a
    boundary. Nodes whose names ``known_shapes`` does not know (new nodes) are walked through too.
    ``known_shapes`` supplies dtypes and static shapes of boundary tensors.
    """
    graph = model.proto.graph
    producers = _producers(graph)
    inits = {t.name: t for t in graph.initializer}
    old_names = {n.name for n in known_shapes.proto.graph.node}
    touched = set(rewritten)
    chosen: set[str] = set()
    boundary: list[str] = []
    stack = list(outputs)
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        if tensor in seen or not tensor:
            continue
        seen.add(tensor)
        if tensor in inits:
            continue
        node = producers.get(tensor)
        if node is None or (node.name in old_names and node.name not in touched and node.op_type != "Constant"):
            boundary.append(tensor)
            continue
        if node.name not in chosen:
            chosen.add(node.name)
            stack.extend(node.input)
    nodes = [n for n in graph.node if n.name in chosen]
    used = {i for n in nodes for i in n.input}
    initializers = [inits[name] for name in inits if name in used]

    def value_info(name: str) -> onnx.ValueInfoProto:
        shape = known_shapes.static_shape(name) or model.static_shape(name)
        dtype = known_shapes.dtype(name) or model.dtype(name)
        if shape is None or dtype is None:
            raise RegionError(f"tensor {name!r} at the region boundary has no static shape")
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(shape))

    boundary = sorted(set(boundary))
    sub = helper.make_graph(
        nodes, "region", [value_info(t) for t in boundary], [value_info(t) for t in outputs], initializers
    )
    sub_model = helper.make_model(sub, opset_imports=list(model.proto.opset_import), ir_version=model.proto.ir_version)
    return Region(sub_model, tuple(boundary), tuple(outputs), tuple(n.name for n in nodes))


def region_feed(regions: tuple[Region, ...], known_shapes: Model, seed: int = 0) -> dict[str, np.ndarray]:
    """One random feed covering every boundary input of the given regions."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for region in regions:
        for vi in region.model.graph.input:
            if vi.name in feed:
                continue
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
            shape = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
            if dtype.kind == "f":
                feed[vi.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "b":
                feed[vi.name] = rng.random(shape) < 0.5
            else:
                feed[vi.name] = rng.integers(1, 9, size=shape).astype(dtype)
    return feed
