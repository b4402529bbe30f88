"""Same work after onnxruntime's optimizer: a latency equality proven without timing.

onnxruntime's own graph optimizer (``ORT_ENABLE_ALL``) already folds BatchNormalization into Conv, fuses
Conv + Add + activation and more. An exact rewrite that does only what it does leaves the *deployed* graph as
it was: the same kernels, in the same wiring, on tensors of the same shapes. Then the two models take the same
time by construction, and timing them only measures noise -- and costs seconds.

:func:`deployed_key` builds the session as deployed, has onnxruntime write the graph it runs
(``optimized_model_filepath``), and hashes its structure: each node's domain, op type and attributes, and
where each input comes from (the producing node's hash and output index, a graph input by name, or an
initializer by dims and dtype -- not its values, which do not change the work). Two models with equal keys run
the same kernels on the same shapes. Weight *values* are left out on purpose: a fold changes them in the last
bits, as onnxruntime's own fold does. (What this does not see: values that change a kernel's speed, such as
denormal weights; none of the exact rewrites makes them.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import replace

import onnx

from rewriter.memory import give_back_memory
from rewriter.validation.runtime import RuntimeOptions, deploy_session_options, payload

log = logging.getLogger(__name__)


def structure_key(model: onnx.ModelProto) -> str:
    """A hash of the graph's structure: node kinds and attributes, and the wiring between them -- what each node
    reads, from above, and which nodes read each of its outputs (initializers by dims and dtype only).
    Independent of node and tensor names and of the node order."""
    graph = model.graph
    inits = {t.name: ("init", tuple(t.dims), t.data_type) for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    produced: dict[str, tuple[str, int]] = {}
    signatures = []
    for node in graph.node:  # onnxruntime writes its graph in topological order
        sources = [produced.get(x) or inits.get(x) or (("input", x) if x in inputs else ("absent" if not x else ("unknown",)))
                   for x in node.input]
        attrs = sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in node.attribute if a.type != onnx.AttributeProto.GRAPH)
        digest = hashlib.sha256(repr((node.domain, node.op_type, attrs, sources)).encode()).hexdigest()
        for i, out in enumerate(node.output):
            produced[out] = (digest, i)
        signatures.append(digest)
    outputs = [produced.get(o.name, ("input", o.name)) for o in graph.output]
    # ... and where each output goes (which kinds of node read it, and how many): the wiring seen from below too
    readers: dict[str, list[str]] = {}
    for node, digest in zip(graph.node, signatures):
        for x in node.input:
            readers.setdefault(x, []).append(digest)
    both = [repr((digest, [sorted(readers.get(o, [])) for o in node.output])) for node, digest in zip(graph.node, signatures)]
    return hashlib.sha256(repr((sorted(both), outputs)).encode()).hexdigest()


def deployed_key(model: onnx.ModelProto, runtime: RuntimeOptions) -> str | None:
    """:func:`structure_key` of the graph onnxruntime runs for ``model`` with ``runtime`` (on one thread: the
    graph does not depend on the thread count), or ``None`` when it cannot be had (a provider that compiles the
    graph itself, external data, an error) -- then only a timing can tell."""
    if runtime.provider != "cpu":  # (a model over protobuf's 2 GiB cannot be serialized: caught below, then timed)
        return None
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="onnx-bottleneck-deployed-") as tmp:
        path = os.path.join(tmp, "deployed.onnx")
        so = deploy_session_options(replace(runtime, threads=1))
        so.optimized_model_filepath = path
        # The weights go to a side file that is never read: only the graph's structure is hashed.
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            with payload(model) as source:
                ort.InferenceSession(source, so, providers=runtime.providers())
            give_back_memory()
            return structure_key(onnx.load(path, load_external_data=False))
        except Exception as exc:  # onnxruntime raises its own types; then the models are timed
            log.info("the deployed graph could not be read (%s); timing instead", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None
