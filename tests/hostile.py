"""Hostile model files, generated (never committed as binaries).

``CASES`` is a table of named builders. Each writes its files into an empty folder and returns a
:class:`Case`: the model path to give the tool, the input files that must stay byte-identical, and the
expected outcome --

* :class:`Refused`: ``analyze`` and ``optimize`` exit 2 with one line on stderr containing ``message``,
  and write nothing;
* :class:`Handled`: the model is valid but unusual; both commands succeed (exit 0) and ``check`` is
  called with the input and output paths of ``optimize`` to assert the unusual parts were left untouched.

Write every case to a folder for a look by hand::

    python -m tests.hostile OUT_DIR

The models are built from one small conv net, ``x[1,3,8,8] -> Conv 1x1 (3->8) -> Conv 1x1 (8->4) ->
Relu -> y``, whose linear 1x1 pair ``fuse_1x1_chain`` fuses: so a handled case shows both that the tool
still rewrites what it can and that it left the rest alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# W1 is [8, 3, 1, 1] float32: 96 bytes.
BASE_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
base (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y)
<float[8, 3, 1, 1] W1, float[8] B1, float[4, 8, 1, 1] W2, float[4] B2>
{
    a = Conv (x, W1, B1)
    b = Conv (a, W2, B2)
    y = Relu (b)
}
"""
W1_BYTES = 8 * 3 * 4
#: Deepest subgraph nesting the loader accepts (rewriter.io.MAX_SUBGRAPH_DEPTH); one more is refused.
MAX_DEPTH = 16


@dataclass(frozen=True)
class Refused:
    """Exit 2, one line on stderr containing ``message``, nothing written."""

    message: str


@dataclass(frozen=True)
class Handled:
    """Exit 0; ``check(input_path, output_path)`` asserts what ``optimize`` left untouched (and what it did)."""

    untouched: str
    check: Callable[[Path, Path], None]
    #: A substring the one warning line of ``optimize`` on stderr must contain; None: stderr stays empty.
    warning: str | None = None


@dataclass
class Case:
    model: Path
    expect: Refused | Handled
    #: Input files whose sha256 must not change (the model, its data files, files near it).
    inputs: list[Path] = field(default_factory=list)
    #: Extra command-line options for both commands.
    options: tuple[str, ...] = ()


def base_model(seed: int = 0) -> onnx.ModelProto:
    model = onnx.parser.parse_model(BASE_TEXT)
    rng = np.random.default_rng(seed)
    graph = model.graph
    for vi in graph.value_info:
        shape = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
        graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), vi.name))
    del graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


def _write(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _externalize(tensor: onnx.TensorProto, location: str, offset: int | str = 0, length: int | str | None = None) -> bytes:
    """Mark ``tensor`` external at ``location``; return the bytes that belong in the data file."""
    blob = tensor.raw_data
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(len(blob) if length is None else length)}
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return blob


def _external(d: Path, location: str, data_file: Path | None, *, offset: int | str = 0, length: int | str | None = None,
              folder: str = "model") -> Case:
    """The base model in ``d/folder/m.onnx`` with W1 external at ``location``; its bytes go to ``data_file``."""
    model = base_model()
    blob = _externalize(_init(model, "W1"), location, offset, length)
    path = _write(model, d / folder / "m.onnx")
    inputs = [path]
    if data_file is not None:
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_bytes(blob)
        inputs.append(data_file)
    return Case(path, Refused(""), inputs)


def _refuse(case: Case, message: str) -> Case:
    case.expect = Refused(message)
    return case


# -- the file itself --------------------------------------------------------------------------------------
def missing_file(d: Path) -> Case:
    return Case(d / "missing.onnx", Refused("no such file"))


def empty_file(d: Path) -> Case:
    path = d / "empty.onnx"
    path.write_bytes(b"")
    return Case(path, Refused("empty file"), [path])


def directory(d: Path) -> Case:
    path = d / "folder.onnx"
    path.mkdir()
    (path / "inside.txt").write_text("keep me")
    return Case(path, Refused("is a directory"), [path / "inside.txt"])


def fifo_as_model(d: Path) -> Case:
    """A named pipe: opening it for reading would block forever."""
    path = d / "pipe.onnx"
    os.mkfifo(path)
    return Case(path, Refused("not a regular file"))


def truncated_protobuf(d: Path) -> Case:
    data = base_model().SerializeToString()
    path = d / "truncated.onnx"
    path.write_bytes(data[: len(data) * 2 // 3])
    return Case(path, Refused("not an ONNX model"), [path])


def garbage_bytes(d: Path) -> Case:
    path = d / "garbage.onnx"
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    return Case(path, Refused("not an ONNX model"), [path])


def other_message(d: Path) -> Case:
    """A valid protobuf, but a TensorProto, not a ModelProto."""
    path = d / "tensor.onnx"
    path.write_bytes(numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "t").SerializeToString())
    return Case(path, Refused("not an ONNX model"), [path])


def no_nodes(d: Path) -> Case:
    graph = helper.make_graph([], "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    path = _write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), d / "no_nodes.onnx")
    return Case(path, Refused("no nodes"), [path])


def ir_version_too_new(d: Path) -> Case:
    model = base_model()
    model.ir_version = 99
    path = _write(model, d / "ir99.onnx")
    return Case(path, Refused("ir_version 99"), [path])


def max_model_bytes_exceeded(d: Path) -> Case:
    """Model file plus its external data exceed --max-model-bytes (each alone is under it)."""
    case = _external(d, "w.data", d / "model" / "w.data")
    limit = case.model.stat().st_size + W1_BYTES // 2
    case.options = ("--max-model-bytes", str(limit))
    return _refuse(case, "exceeds the limit")


# -- external data ----------------------------------------------------------------------------------------
def ext_dotdot(d: Path) -> Case:
    return _refuse(_external(d, "../w.data", d / "w.data"), "leaves the model's folder")


def ext_dotdot_backslash(d: Path) -> Case:
    return _refuse(_external(d, "..\\w.data", d / "w.data"), "leaves the model's folder")


def ext_dotdot_inside_path(d: Path) -> Case:
    """``sub/../../w.data``: starts inside, climbs out."""
    (d / "model" / "sub").mkdir(parents=True)
    return _refuse(_external(d, "sub/../../w.data", d / "w.data"), "leaves the model's folder")


def ext_absolute(d: Path) -> Case:
    outside = d / "elsewhere" / "w.data"
    return _refuse(_external(d, str(outside.resolve()), outside), "absolute path")


def ext_windows_drive(d: Path) -> Case:
    return _refuse(_external(d, "C:\\weights\\w.data", None), "absolute path")


def ext_symlink_outside(d: Path) -> Case:
    outside = d / "elsewhere" / "w.data"
    case = _external(d, "link.data", outside)
    (d / "model" / "link.data").symlink_to(outside)
    return _refuse(case, "resolves outside the model's folder")


def ext_symlinked_folder(d: Path) -> Case:
    """``sub/w.data`` where ``sub`` is a symlink to a folder outside."""
    outside = d / "elsewhere" / "w.data"
    case = _external(d, "sub/w.data", outside)
    (d / "model" / "sub").symlink_to(d / "elsewhere", target_is_directory=True)
    return _refuse(case, "resolves outside the model's folder")


def ext_symlink_to_device(d: Path) -> Case:
    """A symlink inside the folder to /dev/zero (an endless read)."""
    case = _external(d, "zero.data", None)
    (d / "model" / "zero.data").symlink_to("/dev/zero")
    return _refuse(case, "resolves outside the model's folder")


def ext_hard_link(d: Path) -> Case:
    """A hard link inside the folder to a file outside: indistinguishable by path, so refused by link count."""
    outside = d / "elsewhere" / "w.data"
    case = _external(d, "w.data", outside)
    os.link(outside, d / "model" / "w.data")
    return _refuse(case, "hard link")


def ext_offset_beyond_end(d: Path) -> Case:
    return _refuse(_external(d, "w.data", d / "model" / "w.data", offset=4096), "beyond the end")


def ext_length_beyond_end(d: Path) -> Case:
    return _refuse(_external(d, "w.data", d / "model" / "w.data", offset=8), "beyond the end")


def ext_huge_length(d: Path) -> Case:
    """length 2**62: must be refused before anything is read or allocated."""
    return _refuse(_external(d, "w.data", d / "model" / "w.data", length=2**62), "beyond the end")


def ext_huge_offset(d: Path) -> Case:
    return _refuse(_external(d, "w.data", d / "model" / "w.data", offset=2**64 + 1), "beyond the end")


def ext_negative_offset(d: Path) -> Case:
    return _refuse(_external(d, "w.data", d / "model" / "w.data", offset=-8), "negative")


def ext_non_integer_length(d: Path) -> Case:
    return _refuse(_external(d, "w.data", d / "model" / "w.data", length="96; rm -rf /"), "not integers")


def ext_missing_data_file(d: Path) -> Case:
    return _refuse(_external(d, "nowhere.data", d / "model" / "w.data"), "not found")


def ext_empty_location(d: Path) -> Case:
    return _refuse(_external(d, "", d / "model" / "w.data"), "names no data file")


def ext_location_is_directory(d: Path) -> Case:
    case = _external(d, "sub", None)
    (d / "model" / "sub").mkdir()
    return _refuse(case, "not a regular file")


def ext_fifo(d: Path) -> Case:
    """The data file is a named pipe: reading it would block forever."""
    case = _external(d, "pipe.data", None)
    os.mkfifo(d / "model" / "pipe.data")
    return _refuse(case, "not a regular file")


def ext_nul_byte(d: Path) -> Case:
    return _refuse(_external(d, "w.data\x00../../etc/passwd", d / "model" / "w.data"), "NUL")


def ext_length_not_matching_dims(d: Path) -> Case:
    """Range inside the file, but 100 bytes for a tensor whose dims need 96."""
    case = _external(d, "w.data", None, length=100)
    (d / "model" / "w.data").write_bytes(bytes(128))
    case.inputs.append(d / "model" / "w.data")
    return _refuse(case, "need 96 bytes")


def ext_in_constant_node(d: Path) -> Case:
    """The escape hides in a Constant node's tensor attribute rather than an initializer."""
    model = base_model()
    w1 = _init(model, "W1")
    model.graph.initializer.remove(w1)
    const = helper.make_node("Constant", [], ["W1"], value=w1)
    blob = _externalize(const.attribute[0].t, "../w.data")
    model.graph.node.insert(0, const)
    (d / "w.data").write_bytes(blob)
    path = _write(model, d / "model" / "m.onnx")
    return Case(path, Refused("leaves the model's folder"), [path, d / "w.data"])


def ext_in_subgraph(d: Path) -> Case:
    """The escape hides in an initializer of an If branch."""
    model = if_model()
    branch = next(a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    blob = _externalize(branch.initializer[0], "../w.data")
    (d / "w.data").write_bytes(blob)
    path = _write(model, d / "model" / "m.onnx")
    return Case(path, Refused("leaves the model's folder"), [path, d / "w.data"])


def ext_symlink_inside(d: Path) -> Case:
    """A symlink that stays inside the model's folder is fine."""
    case = _external(d, "link.data", d / "model" / "weights" / "w.data")
    (d / "model" / "link.data").symlink_to(Path("weights") / "w.data")

    def check(src: Path, out: Path) -> None:
        assert _ops(onnx.load(str(out))) == {"Conv": 1, "Relu": 1}

    case.expect = Handled("the data file (read through the link, not written)", check)
    return case


# -- graph structure --------------------------------------------------------------------------------------
def _edit_nodes(d: Path, name: str, nodes: list[onnx.NodeProto], message: str) -> Case:
    model = base_model()
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = _write(model, d / f"{name}.onnx")
    return Case(path, Refused(message), [path])


def graph_cycle(d: Path) -> Case:
    return _edit_nodes(d, "cycle", [
        helper.make_node("Conv", ["x", "W1", "B1"], ["a"]),
        helper.make_node("Add", ["a", "c"], ["b"]),
        helper.make_node("Relu", ["b"], ["c"]),
        helper.make_node("Conv", ["c", "W2", "B2"], ["y"]),
    ], "cycle")


def nodes_out_of_order(d: Path) -> Case:
    """Acyclic but not topologically sorted: ONNX forbids it, onnxruntime runs it; sorted on load (in memory)."""
    case = _edit_nodes(d, "unsorted", [
        helper.make_node("Relu", ["b"], ["y"]),
        helper.make_node("Conv", ["a", "W2", "B2"], ["b"]),
        helper.make_node("Conv", ["x", "W1", "B1"], ["a"]),
    ], "")

    def check(src: Path, out: Path) -> None:
        optimized = onnx.load(str(out))
        onnx.checker.check_model(optimized, full_check=True)  # sorted
        assert _ops(optimized) == {"Conv": 1, "Relu": 1}  # and the pair still fused

    case.expect = Handled("the input file's node order (sorted in memory only)", check)
    return case


def ir3_initializers_not_inputs(d: Path) -> Case:
    """IR 3 (opset 8) with its weights as initializers only, as older converters wrote it: the checker refuses
    it, onnxruntime runs it; the IR version is raised to 4 on load (in memory)."""
    model = base_model()
    model.ir_version = 3
    model.opset_import[0].version = 8
    path = _write(model, d / "ir3.onnx")

    def check(src: Path, out: Path) -> None:
        optimized = onnx.load(str(out))
        assert optimized.ir_version == 4 and [vi.name for vi in optimized.graph.input] == ["x"]
        assert _ops(optimized) == {"Conv": 1, "Relu": 1}

    return Case(path, Handled("the input file's IR version", check), [path])


def ir2_initializers_not_inputs(d: Path) -> Case:
    """IR 2 is not normalized: refused as before."""
    model = base_model()
    model.ir_version = 2
    path = _write(model, d / "ir2.onnx")
    return Case(path, Refused("invalid ONNX model"), [path])


def duplicate_output_name(d: Path) -> Case:
    return _edit_nodes(d, "dup_output", [
        helper.make_node("Conv", ["x", "W1", "B1"], ["a"]),
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Conv", ["a", "W2", "B2"], ["b"]),
        helper.make_node("Relu", ["b"], ["y"]),
    ], "'a' is produced by more than one node")


def output_shadows_initializer(d: Path) -> Case:
    """A node writes a tensor named like an initializer."""
    return _edit_nodes(d, "shadow", [
        helper.make_node("Conv", ["x", "W1", "B1"], ["W2"]),
        helper.make_node("Conv", ["W2", "W2", "B2"], ["b"]),
        helper.make_node("Relu", ["b"], ["y"]),
    ], "'W2'")


def duplicate_initializer_name(d: Path) -> Case:
    model = base_model()
    extra = onnx.TensorProto()
    extra.CopyFrom(_init(model, "W2"))
    model.graph.initializer.append(extra)
    path = _write(model, d / "dup_init.onnx")
    return Case(path, Refused("'W2'"), [path])


def undefined_input(d: Path) -> Case:
    return _edit_nodes(d, "undefined", [
        helper.make_node("Conv", ["x", "W1", "B1"], ["a"]),
        helper.make_node("Add", ["a", "ghost"], ["a2"]),
        helper.make_node("Conv", ["a2", "W2", "B2"], ["b"]),
        helper.make_node("Relu", ["b"], ["y"]),
    ], "'ghost', which nothing defines")


def output_never_produced(d: Path) -> Case:
    return _edit_nodes(d, "no_output", [
        helper.make_node("Conv", ["x", "W1", "B1"], ["a"]),
        helper.make_node("Conv", ["a", "W2", "B2"], ["b"]),
    ], "'y'")


def unknown_op_default_domain(d: Path) -> Case:
    return _edit_nodes(d, "unknown_op", [
        helper.make_node("Conv", ["x", "W1", "B1"], ["a"]),
        helper.make_node("Conv", ["a", "W2", "B2"], ["b"]),
        helper.make_node("TotallyNewOp", ["b"], ["y"]),
    ], "TotallyNewOp")


def opset_too_new(d: Path) -> Case:
    model = base_model()
    model.opset_import[0].version = 99
    path = _write(model, d / "opset99.onnx")
    return Case(path, Refused("opset 99"), [path])


def opset_zero(d: Path) -> Case:
    model = base_model()
    model.opset_import[0].version = 0
    path = _write(model, d / "opset0.onnx")
    return Case(path, Refused("opset 0"), [path])


def custom_domain_without_import(d: Path) -> Case:
    model = base_model()
    model.graph.node[-1].CopyFrom(helper.make_node("Swish", ["b"], ["y"], domain="com.example"))
    path = _write(model, d / "custom_noimport.onnx")
    return Case(path, Refused("com.example"), [path])


# -- tensors ----------------------------------------------------------------------------------------------
def _tensor_case(d: Path, name: str, edit: Callable[[onnx.TensorProto], None], message: str) -> Case:
    model = base_model()
    edit(_init(model, "W1"))
    path = _write(model, d / f"{name}.onnx")
    return Case(path, Refused(message), [path])


def init_data_too_short(d: Path) -> Case:
    def edit(t: onnx.TensorProto) -> None:
        t.raw_data = t.raw_data[:48]
    return _tensor_case(d, "short", edit, "need 96 bytes")


def init_data_too_long(d: Path) -> Case:
    def edit(t: onnx.TensorProto) -> None:
        t.raw_data = t.raw_data + bytes(8)
    return _tensor_case(d, "long", edit, "need 96 bytes")


def init_dims_mismatch(d: Path) -> Case:
    """Declared dims [16, 3, 1, 1] over 8x3 values."""
    def edit(t: onnx.TensorProto) -> None:
        t.dims[0] = 16
    return _tensor_case(d, "dims", edit, "W1")


def init_float_data_count(d: Path) -> Case:
    def edit(t: onnx.TensorProto) -> None:
        values = np.frombuffer(t.raw_data, dtype=np.float32)
        t.ClearField("raw_data")
        t.float_data.extend(values.tolist() + [1.0, 2.0])
    return _tensor_case(d, "float_data", edit, "26 values")


def init_negative_dim(d: Path) -> Case:
    def edit(t: onnx.TensorProto) -> None:
        t.dims[0] = -8
    return _tensor_case(d, "negdim", edit, "negative")


def init_huge_dims(d: Path) -> Case:
    """Dims whose product is 2**64 elements over 96 bytes of data."""
    def edit(t: onnx.TensorProto) -> None:
        t.dims[:] = [2**32, 2**32, 1, 1]
    return _tensor_case(d, "huge", edit, "W1")


def init_unknown_data_type(d: Path) -> Case:
    def edit(t: onnx.TensorProto) -> None:
        t.data_type = 999
    return _tensor_case(d, "dtype", edit, "data type 999")


# -- valid but unusual ------------------------------------------------------------------------------------
def _ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _branch(name: str, seed: int) -> onnx.GraphProto:
    """A subgraph with its own linear 1x1 pair (which a pass must not touch) reading the outer ``x``."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 1, 1)).astype(np.float32), f"{name}_W1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), f"{name}_W2")
    return helper.make_graph(
        [helper.make_node("Conv", ["x", w1.name], [f"{name}_a"]), helper.make_node("Conv", [f"{name}_a", w2.name], [f"{name}_o"])],
        name, [], [helper.make_tensor_value_info(f"{name}_o", TensorProto.FLOAT, [1, 4, 8, 8])], [w1, w2],
    )


def _with_subgraph_node(node: onnx.NodeProto, extra_inputs: list[onnx.ValueInfoProto], extra_nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """The base model whose output is the sum of the base path and ``node``'s first output."""
    model = base_model()
    model.graph.node[-1].output[0] = "base_y"
    model.graph.node.extend(extra_nodes + [node, helper.make_node("Add", ["base_y", node.output[0]], ["y"])])
    model.graph.input.extend(extra_inputs)
    return model


def if_model() -> onnx.ModelProto:
    cond = helper.make_node("ReduceMax", ["x"], ["xmax"], keepdims=0)
    test = helper.make_node("Greater", ["xmax", "zero"], ["cond"])
    node = helper.make_node("If", ["cond"], ["branch_y"], then_branch=_branch("then", 1), else_branch=_branch("else", 2))
    model = _with_subgraph_node(node, [], [cond, helper.make_node("Constant", [], ["zero"], value_float=0.0), test])
    onnx.checker.check_model(model, full_check=True)
    return model


def _signature(graph: onnx.GraphProto) -> bytes:
    """A graph's nodes, initializers, inputs and outputs, nested graphs included; value_info (type
    annotations an exporter may add) left out."""
    copy = onnx.GraphProto()
    copy.CopyFrom(graph)
    stack = [copy]
    while stack:
        g = stack.pop()
        del g.value_info[:]
        stack += [a.g for n in g.node for a in n.attribute if a.HasField("g")]
        stack += [sub for n in g.node for a in n.attribute for sub in a.graphs]
    return copy.SerializeToString(deterministic=True)


def _subgraphs(model: onnx.ModelProto) -> list[bytes]:
    return [_signature(a.g) for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]


def _same_subgraphs(src: Path, out: Path) -> None:
    before, after = onnx.load(str(src)), onnx.load(str(out))
    assert _subgraphs(after) == _subgraphs(before), "a subgraph changed"
    assert _ops(after)["Conv"] == _ops(before)["Conv"] - 1  # only the main graph's pair was fused


def if_subgraphs(d: Path) -> Case:
    path = _write(if_model(), d / "if.onnx")
    return Case(path, Handled("both If branches (each with a fusable 1x1 pair)", _same_subgraphs), [path])


def loop_subgraph(d: Path) -> Case:
    body_w = numpy_helper.from_array(np.random.default_rng(3).standard_normal((3, 3, 1, 1)).astype(np.float32) * 0.5, "body_W")
    body_w2 = numpy_helper.from_array(np.random.default_rng(4).standard_normal((3, 3, 1, 1)).astype(np.float32) * 0.5, "body_W2")
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Conv", ["state_in", body_w.name], ["body_a"]),
            helper.make_node("Conv", ["body_a", body_w2.name], ["state_out"]),
        ],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, 3, 8, 8])],
        [body_w, body_w2],
    )
    consts = [
        helper.make_node("Constant", [], ["trip"], value=numpy_helper.from_array(np.array(3, dtype=np.int64))),
        helper.make_node("Constant", [], ["keep_going"], value=numpy_helper.from_array(np.array(True))),
    ]
    loop = helper.make_node("Loop", ["trip", "keep_going", "x"], ["looped"], body=body)
    reduce = helper.make_node("ReduceMean", ["looped"], ["loop_y"], axes=[1], keepdims=1)
    model = _with_subgraph_node(reduce, [], consts + [loop])
    onnx.checker.check_model(model, full_check=True)
    path = _write(model, d / "loop.onnx")
    return Case(path, Handled("the Loop body (with a fusable 1x1 pair)", _same_subgraphs), [path])


def custom_domain_op(d: Path) -> Case:
    """An op onnxruntime does not know: nothing can be validated, so nothing is rewritten."""
    model = base_model()
    model.graph.node[-1].CopyFrom(helper.make_node("FancyAct", ["b"], ["y"], domain="com.example", alpha=0.5))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.checker.check_model(model)
    path = _write(model, d / "custom.onnx")

    def check(src: Path, out: Path) -> None:
        before, after = onnx.load(str(src)), onnx.load(str(out))
        strip = [(n.op_type, n.domain, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute]) for n in before.graph.node]
        assert [(n.op_type, n.domain, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute]) for n in after.graph.node] == strip
        assert list(after.graph.initializer) == list(before.graph.initializer)
        assert list(after.opset_import) == list(before.opset_import)

    return Case(path, Handled("every node, the custom op included (nothing can be validated)", check,
                              warning="onnxruntime cannot load the model"), [path])


def model_local_function(d: Path) -> Case:
    """A call to a function defined in the model (a custom op with a body onnxruntime can inline)."""
    model = base_model()
    fn = helper.make_function("local.fns", "ScaledRelu", ["t"], ["u"],
                              [helper.make_node("Constant", [], ["two"], value_float=2.0),
                               helper.make_node("Mul", ["t", "two"], ["t2"]), helper.make_node("Relu", ["t2"], ["u"])],
                              [helper.make_opsetid("", 17)])
    model.functions.append(fn)
    model.opset_import.append(helper.make_opsetid("local.fns", 1))
    model.graph.node[-1].CopyFrom(helper.make_node("ScaledRelu", ["b"], ["y"], domain="local.fns"))
    onnx.checker.check_model(model, full_check=True)
    path = _write(model, d / "function.onnx")

    def check(src: Path, out: Path) -> None:
        after = onnx.load(str(out))
        assert list(after.functions) == [fn]
        assert _ops(after) == {"Conv": 1, "ScaledRelu": 1}

    return Case(path, Handled("the function and its call", check), [path])


# -- subgraph nesting -------------------------------------------------------------------------------------
def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    key, size, out = (number << 3) | 2, len(payload), bytearray()
    for value in (key, size):
        while True:
            byte = value & 0x7F
            value >>= 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                break
    return bytes(out) + payload


def nested_if_bytes(levels: int) -> bytes:
    """The base model plus an If whose then branch nests ``levels`` graphs deep, encoded by hand.

    Past about 30 levels protobuf itself refuses to build or parse such a message, so the nesting is
    written in the wire format: GraphProto.node = 1, .name = 2, .output = 12; NodeProto.input = 1,
    .output = 2, .op_type = 4, .attribute = 5; AttributeProto.name = 1, .g = 6, .type = 20 (GRAPH = 5);
    ModelProto.graph = 7. The innermost graph passes the outer ``x`` through.
    """
    out_vi = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 3, 8, 8]).SerializeToString()
    leaf = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "leaf", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 3, 8, 8])]).SerializeToString()

    def if_node(then: bytes, output: str) -> bytes:
        attrs = b"".join(_field(5, _field(1, name.encode()) + _field(6, g) + bytes([0xA0, 0x01, 5]))
                         for name, g in (("then_branch", then), ("else_branch", leaf)))
        return _field(1, b"cond") + _field(2, output.encode()) + _field(4, b"If") + attrs

    graph = leaf
    for level in range(levels - 1):
        graph = _field(1, if_node(graph, "o")) + _field(2, f"level{level}".encode()) + _field(12, out_vi)
    placeholder = helper.make_node("Identity", ["cond"], ["nested_y"])
    model = _with_subgraph_node(
        helper.make_node("ReduceMean", ["nested_y"], ["nested_m"], axes=[1], keepdims=1), [],
        [helper.make_node("ReduceMax", ["x"], ["xmax"], keepdims=0),
         helper.make_node("Constant", [], ["zero"], value_float=0.0),
         helper.make_node("Greater", ["xmax", "zero"], ["cond"]), placeholder],
    )
    main = model.graph.SerializeToString()
    old = _field(1, placeholder.SerializeToString())
    assert main.count(old) == 1
    main = main.replace(old, _field(1, if_node(graph, "nested_y")))
    model.ClearField("graph")
    return model.SerializeToString() + _field(7, main)


def _nested(d: Path, depth: int, message: str) -> Case:
    path = d / f"nested_{depth}.onnx"
    path.write_bytes(nested_if_bytes(depth))
    return Case(path, Refused(message), [path])


def nesting_beyond_limit(d: Path) -> Case:
    """One level more than the loader's own limit (protobuf could still parse it)."""
    return _nested(d, MAX_DEPTH + 1, "subgraphs nested")


def nesting_beyond_protobuf(d: Path) -> Case:
    """Deep enough that protobuf's own recursion limit stops the parse."""
    return _nested(d, 200, "nested too deeply")


def nesting_within_limit(d: Path) -> Case:
    path = d / "nested_ok.onnx"
    path.write_bytes(nested_if_bytes(MAX_DEPTH))

    return Case(path, Handled(f"the If chain nested {MAX_DEPTH} deep", _same_subgraphs), [path])


CASES: dict[str, Callable[[Path], Case]] = {
    fn.__name__: fn
    for fn in (
        missing_file, empty_file, directory, fifo_as_model, truncated_protobuf, garbage_bytes, other_message, no_nodes,
        ir_version_too_new, max_model_bytes_exceeded,
        ext_dotdot, ext_dotdot_backslash, ext_dotdot_inside_path, ext_absolute, ext_windows_drive, ext_symlink_outside,
        ext_symlinked_folder, ext_symlink_to_device, ext_hard_link, ext_offset_beyond_end, ext_length_beyond_end,
        ext_huge_length, ext_huge_offset, ext_negative_offset, ext_non_integer_length, ext_missing_data_file,
        ext_empty_location, ext_location_is_directory, ext_fifo, ext_nul_byte, ext_length_not_matching_dims,
        ext_in_constant_node, ext_in_subgraph, ext_symlink_inside,
        graph_cycle, nodes_out_of_order, ir3_initializers_not_inputs, ir2_initializers_not_inputs, duplicate_output_name, output_shadows_initializer, duplicate_initializer_name,
        undefined_input, output_never_produced, unknown_op_default_domain, opset_too_new, opset_zero,
        custom_domain_without_import,
        init_data_too_short, init_data_too_long, init_dims_mismatch, init_float_data_count, init_negative_dim,
        init_huge_dims, init_unknown_data_type,
        if_subgraphs, loop_subgraph, custom_domain_op, model_local_function,
        nesting_within_limit, nesting_beyond_limit, nesting_beyond_protobuf,
    )
}


def main() -> None:
    parser = argparse.ArgumentParser(description="Write every hostile case into OUT_DIR/<case>/.")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    for name, build in CASES.items():
        folder = args.out_dir / name
        folder.mkdir(parents=True, exist_ok=False)
        case = build(folder)
        sys.stdout.write(f"{name}: {case.model} -> {case.expect}\n")


if __name__ == "__main__":
    main()
