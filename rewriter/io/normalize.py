"""Harmless export quirks, normalized on load: models onnxruntime runs that the ONNX checker refuses.

:func:`normalize_model` edits a freshly parsed model in place, before the structural checks of
:mod:`rewriter.io.check`, and returns one short note per change (each also logged at INFO). The notes
end up in the JSON report's ``normalized`` list. Three quirks are normalized:

* **An opset imported twice at the same version** (``""`` and its alias ``"ai.onnx"``, or one domain listed
  twice, as tools that merge or re-export models write them): the repeats say nothing more and are
  dropped, the first entry kept. A domain imported at two different versions is ambiguous and stays
  refused.

* **IR version 3 with initializers missing from the graph inputs** (older converters, opset 8 and before).
  IR 3 requires every initializer to be listed as a graph input as well; onnxruntime runs such files
  anyway and, in an IR-3 model, treats every initializer as a constant (it lets no feed override one).

  - *None of the initializers is listed*: ``ir_version`` is raised to 4. One field changes and the graph
    does not: in IR 4 an initializer that is not a graph input is a constant, the very meaning
    onnxruntime gives the IR-3 file. The alternative, listing the weights as inputs, would add one graph
    input per weight (hundreds on a real CNN) to the file's interface, and every initializer a rewrite
    adds would have to be listed too.
  - *Some are listed* (the file mixes both): the missing ones are listed as well and IR 3 stays. Raising
    the version would turn the listed initializers into inputs a caller may override (an IR-4 default),
    which the IR-3 file does not allow; listing the rest gives the form IR 3 prescribes with the same
    meaning. Initializers of subgraphs are then left as they are (listing one would change a Loop or
    Scan body's signature).

  IR versions 1 and 2 (opset 1, no opset imports) are not normalized: they are refused as before.

* **Nodes out of topological order** (fp16 exports by ``onnxruntime.transformers.float16``
  ``convert_float_to_float16(model, keep_io_types=True)`` append the input Casts after the nodes that
  read them). The nodes of the main graph, of every subgraph and of every model-local function are
  sorted when they form a DAG that is merely unsorted: Kahn's algorithm, always taking the earliest
  ready node, so a sorted graph keeps its order exactly and an unsorted one moves only what must move.
  A node holding subgraphs depends on what those subgraphs read from the enclosing graph. Nodes that
  cannot be ordered (a cycle, a tensor produced twice) are left as they are, for the checks to refuse
  with their usual message.

Anything else the checks refuse stays refused. Nothing here raises: a model too broken to normalize is
left to the checks.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Iterator, MutableSequence

import onnx
from onnx import helper

log = logging.getLogger(__name__)


def normalize_model(model: onnx.ModelProto) -> list[str]:
    """Normalize harmless export quirks of ``model`` in place (see the module docstring); the notes, one per change."""
    notes = [note for note in (_repeated_opsets(model), _listed_initializers(model), _topological_order(model)) if note]
    for note in notes:
        log.info("normalized on load: %s", note)
    return notes


# -- opsets imported twice ---------------------------------------------------------------------------------
def _repeated_opsets(model: onnx.ModelProto) -> str | None:
    """Drop repeated opset imports of a domain at the same version (any other repeat is left for the checks)."""
    first: dict[str, int] = {}
    repeats: list[int] = []
    for i, entry in enumerate(model.opset_import):
        domain = "" if entry.domain == "ai.onnx" else entry.domain
        if domain not in first:
            first[domain] = entry.version
        elif first[domain] == entry.version:
            repeats.append(i)
        else:
            return None  # two versions of one domain: refused by the checks
    if not repeats:
        return None
    named = sorted({model.opset_import[i].domain or "ai.onnx" for i in repeats})
    for i in reversed(repeats):
        del model.opset_import[i]
    return f"dropped {len(repeats)} repeated opset import(s) ({', '.join(repr(d) for d in named)})"


# -- IR 3: initializers not listed as graph inputs ---------------------------------------------------------
def _unlisted(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    inputs = {vi.name for vi in graph.input}
    return [t for t in graph.initializer if t.name not in inputs]


def _subgraphs(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.GraphProto]:
    """Every graph nested in ``nodes``' attributes, at any depth (walked without recursion)."""
    stack = [g for node in nodes for attr in node.attribute for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]
    while stack:
        graph = stack.pop()
        yield graph
        stack += [g for node in graph.node for attr in node.attribute for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]


def _listed_initializers(model: onnx.ModelProto) -> str | None:
    """IR 3 with initializers missing from the graph inputs: raise the IR version, or list them (see above)."""
    if model.ir_version != 3:
        return None
    graph = model.graph
    missing = _unlisted(graph)
    if len(missing) < len(graph.initializer):  # some are listed: list the rest, keep IR 3
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in missing)
        return f"listed {len(missing)} initializer(s) as graph inputs, as IR 3 requires" if missing else None
    if not missing and not any(_unlisted(sub) for sub in _subgraphs(graph.node)):
        return None
    model.ir_version = 4
    return "ir_version 3 -> 4: initializers were not listed as graph inputs (constants either way)"


# -- topological order -------------------------------------------------------------------------------------
def _reads(node: onnx.NodeProto) -> set[str]:
    """The names ``node`` reads: its inputs, and every name read inside its subgraphs (some of them are the
    subgraphs' own: those are produced by no node of the enclosing graph, so they add no dependency)."""
    names = {name for name in node.input if name}
    for sub in _subgraphs([node]):
        for inner in sub.node:
            names.update(name for name in inner.input if name)
        names.update(out.name for out in sub.output)  # a body may pass an outer tensor straight through
    return names


def topological_order(nodes: MutableSequence[onnx.NodeProto]) -> list[int] | None:
    """Indices of ``nodes`` in a topological order as close to the given one as can be (the earliest ready
    node first), or ``None`` when they cannot be ordered (a tensor produced twice, a cycle)."""
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                if out in producer:
                    return None
                producer[out] = i
    users: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for j in {producer[name] for name in _reads(node) if name in producer}:
            users[j].append(i)
            pending[i] += 1
    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in users[i]:
            pending[j] -= 1
            if pending[j] == 0:
                heapq.heappush(ready, j)
    return order if len(order) == len(nodes) else None


def _sort(nodes: MutableSequence[onnx.NodeProto]) -> bool:
    """Sort ``nodes`` (a repeated field) topologically in place; whether they moved."""
    order = topological_order(nodes)
    if order is None or order == list(range(len(order))):
        return False
    holder = onnx.GraphProto()
    holder.node.extend(nodes[i] for i in order)  # copies, in the new order
    del nodes[:]
    nodes.extend(holder.node)  # type: ignore[attr-defined]
    return True


def _topological_order(model: onnx.ModelProto) -> str | None:
    """Sort every node list that is a DAG out of order; where it did, or ``None``."""
    main = _sort(model.graph.node)
    subgraphs = sum(_sort(sub.node) for sub in list(_subgraphs(model.graph.node)))
    functions = sum(_sort(f.node) for f in model.functions)
    where = (["main graph"] if main else []) + [f"{n} {what}{'s' if n > 1 else ''}" for n, what in ((subgraphs, "subgraph"), (functions, "function")) if n]
    return f"nodes sorted into topological order ({', '.join(where)})" if where else None
