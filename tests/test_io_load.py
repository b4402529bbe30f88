"""Safe model loading (rewriter.io.load, with the structural checks of rewriter.io.check): external data,
the caller's model and files left alone, and one-line errors for unsafe or broken files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from rewriter.errors import InputError
from rewriter.io import load_model, save_model, sha256_file
from rewriter.model import Model
from tests.io_models import conv_model, tensors_by_name, write_with_external_weight


# -- external data ---------------------------------------------------------------------------------------
def test_external_data_in_a_subfolder_of_the_model_folder_loads(tmp_path: Path) -> None:
    write_with_external_weight(tmp_path / "m.onnx", tmp_path / "weights" / "w.bin", "weights/w.bin")
    loaded = load_model(tmp_path / "m.onnx")
    np.testing.assert_array_equal(tensors_by_name(loaded)["W"], tensors_by_name(conv_model())["W"])


# -- the caller's model is never modified --------------------------------------------------------------
def test_model_from_source_does_not_modify_the_callers_proto() -> None:
    model = conv_model()
    before = model.SerializeToString()
    m = Model.from_source(model)
    assert model.SerializeToString() == before
    assert [n.name for n in model.graph.node] == ["", ""]
    # The copy did get names (the tool refers to nodes by name), so it really is a separate proto.
    assert all(n.name for n in m.proto.graph.node)
    assert m.input_shapes == {"x": (1, 3, 8, 8)}


def test_model_from_path_does_not_modify_the_file(tmp_path: Path) -> None:
    path = save_model(conv_model(), tmp_path / "m.onnx", external_data=True)
    shas = (sha256_file(path), sha256_file(tmp_path / "m.onnx.data"))
    Model.from_source(path).graph  # noqa: B018 -- build the graph view too
    assert (sha256_file(path), sha256_file(tmp_path / "m.onnx.data")) == shas


# -- load errors ---------------------------------------------------------------------------------------
def _missing(tmp: Path) -> Path:
    return tmp / "missing.onnx"


def _directory(tmp: Path) -> Path:
    (tmp / "folder.onnx").mkdir()
    return tmp / "folder.onnx"


def _empty(tmp: Path) -> Path:
    (tmp / "empty.onnx").write_bytes(b"")
    return tmp / "empty.onnx"


def _truncated(tmp: Path) -> Path:
    data = conv_model().SerializeToString()
    (tmp / "truncated.onnx").write_bytes(data[: len(data) // 2])
    return tmp / "truncated.onnx"


def _garbage(tmp: Path) -> Path:
    (tmp / "garbage.onnx").write_bytes(b"this is not an onnx model\n" * 20)
    return tmp / "garbage.onnx"


def _no_nodes(tmp: Path) -> Path:
    graph = helper.make_graph(
        [], "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp / "no_nodes.onnx").write_bytes(model.SerializeToString())
    return tmp / "no_nodes.onnx"


def _dotdot(tmp: Path) -> Path:
    write_with_external_weight(tmp / "model" / "m.onnx", tmp / "x.data", "../x.data")
    return tmp / "model" / "m.onnx"


def _absolute(tmp: Path) -> Path:
    outside = tmp / "elsewhere" / "x.data"
    write_with_external_weight(tmp / "model" / "m.onnx", outside, str(outside.resolve()))
    return tmp / "model" / "m.onnx"


def _symlink_out(tmp: Path) -> Path:
    outside = tmp / "elsewhere" / "x.data"
    write_with_external_weight(tmp / "model" / "m.onnx", outside, "link.data")
    (tmp / "model" / "link.data").symlink_to(outside)
    return tmp / "model" / "m.onnx"


def _offset_past_end(tmp: Path) -> Path:
    # The data file holds 1728 bytes; offset 4096 starts past its end.
    write_with_external_weight(tmp / "m.onnx", tmp / "w.data", "w.data", offset=4096)
    return tmp / "m.onnx"


def _length_past_end(tmp: Path) -> Path:
    # [8, 8 + 1728) ends 8 bytes past the end of the 1728-byte file.
    write_with_external_weight(tmp / "m.onnx", tmp / "w.data", "w.data", offset=8)
    return tmp / "m.onnx"


def _missing_data_file(tmp: Path) -> Path:
    write_with_external_weight(tmp / "m.onnx", tmp / "w.data", "other.data")
    return tmp / "m.onnx"

LOAD_ERRORS = [
    (_missing, "no such file"),
    (_directory, "is a directory"),
    (_empty, "empty file"),
    (_truncated, "not an ONNX model"),
    (_garbage, "not an ONNX model"),
    (_no_nodes, "no nodes"),
    (_dotdot, "leaves the model's folder"),
    (_absolute, "absolute path"),
    (_symlink_out, "resolves outside the model's folder"),
    (_offset_past_end, "beyond the end"),
    (_length_past_end, "beyond the end"),
    (_missing_data_file, "not found"),
]


@pytest.mark.parametrize(("make", "expected"), LOAD_ERRORS, ids=[make.__name__.lstrip("_") for make, _ in LOAD_ERRORS])
def test_unusable_model_files_raise_a_one_line_input_error(tmp_path: Path, make, expected: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        load_model(path)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message and message.strip() == message
    # The same error (not a traceback from deeper down) reaches users of the Model API.
    with pytest.raises(InputError):
        Model.from_source(path)


def test_every_prefix_of_a_model_is_rejected_cleanly(tmp_path: Path) -> None:
    """No cut point of a valid model makes the loader raise anything but InputError (or load it)."""
    data = conv_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    for cut in range(1, len(data), 7):
        path.write_bytes(data[:cut])
        with pytest.raises(InputError):
            load_model(path)


def test_max_bytes_refuses_larger_files(tmp_path: Path) -> None:
    path = save_model(conv_model(), tmp_path / "m.onnx")
    size = path.stat().st_size
    assert load_model(path, max_bytes=size) is not None
    with pytest.raises(InputError, match="exceeds the limit"):
        load_model(path, max_bytes=size - 1)


# -- reading only regular files, and listing a model's files ------------------------------------------
def test_sha256_of_a_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(InputError, match="not a regular file"):
        sha256_file(pipe)


def test_input_files_lists_the_model_and_its_data_files(tmp_path: Path) -> None:
    from rewriter.io import input_files

    write_with_external_weight(tmp_path / "m.onnx", tmp_path / "weights" / "w.bin", "weights/w.bin")
    assert input_files(tmp_path / "m.onnx") == [tmp_path / "m.onnx", (tmp_path / "weights" / "w.bin").resolve()]


def test_invalid_utf8_in_a_name_is_an_input_error(tmp_path: Path) -> None:
    data = conv_model().SerializeToString()
    assert data.count(b"\x12\x01g") == 1  # GraphProto.name = "g"
    path = tmp_path / "m.onnx"
    path.write_bytes(data.replace(b"\x12\x01g", b"\x12\x01\xff"))
    with pytest.raises(InputError, match="not valid UTF-8"):
        load_model(path)
