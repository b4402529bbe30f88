"""What keeps a run's memory down: a big model reaches onnxruntime through a file (the serialized copy freed
before the session is built), counting parameters loads no weight, released graph views are rebuilt on demand."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from rewriter.analysis import analyze
from rewriter.memory import give_back_memory
from rewriter.model import Model
from rewriter.validation import runtime
from rewriter.validation.runtime import payload, reference_session, run_feeds
from tests.helpers import parse

CONV = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 8, 8] X) => (float[1, 4, 8, 8] Y)
    <float[4, 3, 3, 3] W, float[4] B> {
        Y = Conv <pads = [1, 1, 1, 1]> (X, W, B)
    }
"""


def test_a_small_model_goes_as_bytes_and_a_big_one_through_a_file_that_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    proto = parse(CONV)
    with payload(proto) as source:
        assert isinstance(source, bytes)
    monkeypatch.setattr(runtime, "FILE_PAYLOAD_BYTES", 0)
    with payload(proto) as source:
        assert isinstance(source, str) and os.path.isfile(source)
        path = source
    assert not os.path.exists(path)
    x = np.ones((1, 3, 8, 8), np.float32)
    (out,) = run_feeds(reference_session(proto), [{"X": x}])  # built from the file, the same outputs
    with payload(proto) as source:
        assert source.endswith(".onnx")
    assert out["Y"].shape == (1, 4, 8, 8)
    give_back_memory()  # never raises, glibc or not


def test_counting_parameters_loads_no_weight_and_a_released_view_is_rebuilt() -> None:
    model = Model.from_source(parse(CONV))
    analysis = analyze(model)
    assert analysis.total_params == 4 * 3 * 3 * 3 + 4
    lazy = [t for t in model.graph.tensors().values() if isinstance(t, gs.Constant)]
    assert lazy and all(type(t._values).__name__ == "LazyValues" for t in lazy)  # shapes and dtypes only
    first = model.graph
    assert model.release() == 0  # (nothing was loaded)
    assert model.graph is not first and model.node(first.nodes[0].name) is not None


def test_a_committed_fork_that_loaded_weights_frees_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph view is a web of cycles: without the commit's own collection its loaded weights outlive it."""
    from rewriter import model as model_module

    monkeypatch.setattr(model_module, "COLLECT_BYTES", 4 * 3 * 3 * 3 * 4)  # (W's bytes: worth a collection)
    fork = Model.from_source(parse(CONV)).fork()
    weight = fork.graph.tensors()["W"]
    alive = weakref.ref(weight.values)  # loaded: an array the graph holds
    del weight
    gc.disable()  # (only the commit's collection may free it)
    try:
        fork.commit()
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("name", ["fold_batchnorm", "conv1x1_to_gemm"])
def test_finding_and_checking_rewrites_loads_no_weight(name: str) -> None:
    """A check needs a weight's dtype and shape, never its values: only a rewrite copies a weight."""
    from rewriter.contract import Skip
    from rewriter.registry import resolve_pass
    from tests.search_fixtures import THREE_BN

    head = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 8, 1, 1] X) => (float[1, 3] Y)
        <float[16, 8, 1, 1] W, float[16] B, float[3, 16] G, float[3] C> {
            H = Conv (X, W, B)
            F = Flatten (H)
            Y = Gemm <transB = 1> (F, G, C)
        }
    """
    model = Model.from_source(parse(THREE_BN if name == "fold_batchnorm" else head, seed=1))
    found = list(resolve_pass(name).find(model))
    assert any(not isinstance(f, Skip) for f in found)
    weights = [t for t in model.graph.tensors().values() if isinstance(t, gs.Constant) and t.name.startswith("W")]
    assert weights and all(type(t._values).__name__ == "LazyValues" for t in weights)


def test_an_existing_output_outside_the_inputs_folder_is_not_checked_by_parsing_the_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rewriter.io import load

    source, out = tmp_path / "in" / "m.onnx", tmp_path / "out" / "m.onnx"
    for f in (source, out):
        f.parent.mkdir()
        f.write_bytes(b"x")
    monkeypatch.setattr(load, "input_files", lambda path: pytest.fail("the input was parsed"))
    load.check_output_path(source, out)  # the input's data files cannot lie in another folder


@pytest.mark.parametrize("sendfile", [True, False])
def test_copying_a_written_model_into_its_output_keeps_every_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sendfile: bool) -> None:
    from rewriter.io import save

    data = np.random.default_rng(0).bytes(3 << 20)
    (tmp_path / "src").write_bytes(data)
    if not sendfile:
        monkeypatch.delattr(os, "sendfile")
    with open(tmp_path / "dst", "wb") as fh:
        fh.write(b"head")  # (copied after what the file holds already)
        save._copy_into(str(tmp_path / "src"), fh)
        fh.write(b"tail")
    assert (tmp_path / "dst").read_bytes() == b"head" + data + b"tail"


def test_finalizing_a_graph_drops_dead_nodes_without_printing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnx-graphsurgeon's cleanup formats every node it removes (weights and all) for a log nobody reads."""
    from rewriter.graph import finalize

    model = Model.from_source(parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3, 8, 8] X) => (float[1, 3, 8, 8] Y)
        <float[4, 3, 3, 3] W> {
            H = Conv <pads = [1, 1, 1, 1]> (X, W)
            R = Relu (H)
            Y = Identity (X)
        }
    """, seed=1))
    monkeypatch.setattr(gs.Node, "__str__", lambda self: pytest.fail("a node was formatted"))
    graph = finalize(model.graph)
    assert [n.op for n in graph.nodes] == ["Identity"]  # Relu, then the Conv it read, are gone
