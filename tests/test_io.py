"""Safe model I/O: round trips, external data, atomic saves, and one-line errors for unsafe or broken files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.errors import InputError
from rewriter.io import load_model, save_model, sha256_file
from rewriter.model import Model

# 16*3*3*3 float32 = 1728 bytes: over EXTERNAL_THRESHOLD, so it goes to the data file; the bias stays inline.
W_SHAPE = (16, 3, 3, 3)


def conv_model(seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(W, B) -> Relu -> y, with unnamed nodes (so naming them would show as a change)."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal(W_SHAPE).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8, 8])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tensors_by_name(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def write_with_external_weight(
    model_path: Path, data_path: Path, location: str, *, offset: int = 0, length: int | None = None
) -> None:
    """Write ``conv_model()`` with W's bytes in ``data_path``, referenced by the entry ``location``."""
    model = conv_model()
    weight = next(t for t in model.graph.initializer if t.name == "W")
    blob = weight.raw_data
    data_path.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_bytes(blob)
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(len(blob) if length is None else length)}
    for key, value in entries.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model.SerializeToString())


def run(model_or_path, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    payload = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    sess = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


# -- round trips ---------------------------------------------------------------------------------------
def test_inline_round_trip_is_proto_equal(tmp_path: Path) -> None:
    model = conv_model()
    out = save_model(model, tmp_path / "m.onnx")
    assert out == tmp_path / "m.onnx"
    assert load_model(out) == model
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no data file when not asked for


def test_external_round_trip_writes_data_file_and_gives_identical_tensors(tmp_path: Path) -> None:
    model = conv_model()
    path = save_model(model, tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    assert data.is_file()

    # The model file itself references the data file for W (big) and keeps B (64 bytes) inline.
    raw = onnx.load(str(path), load_external_data=False)
    by_name = {t.name: t for t in raw.graph.initializer}
    assert by_name["W"].data_location == TensorProto.EXTERNAL
    entries = {e.key: e.value for e in by_name["W"].external_data}
    assert entries["location"] == "m.onnx.data"
    assert int(entries["offset"]) + int(entries["length"]) <= data.stat().st_size
    assert by_name["B"].data_location == TensorProto.DEFAULT and len(by_name["B"].raw_data) == 64

    loaded = load_model(path)
    want, got = tensors_by_name(model), tensors_by_name(loaded)
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])
    assert loaded.graph.node == model.graph.node
    assert all(t.data_location == TensorProto.DEFAULT and not t.external_data for t in loaded.graph.initializer)

    # Other readers (onnxruntime from the path) see the same weights.
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(path, x), run(model, x))


def test_external_data_in_a_subfolder_of_the_model_folder_loads(tmp_path: Path) -> None:
    write_with_external_weight(tmp_path / "m.onnx", tmp_path / "weights" / "w.bin", "weights/w.bin")
    loaded = load_model(tmp_path / "m.onnx")
    np.testing.assert_array_equal(tensors_by_name(loaded)["W"], tensors_by_name(conv_model())["W"])


def test_saving_twice_rewrites_the_data_file_instead_of_appending(tmp_path: Path) -> None:
    model = conv_model()
    path = tmp_path / "m.onnx"
    save_model(model, path, external_data=True)
    data = tmp_path / "m.onnx.data"
    first_size, first_sha = data.stat().st_size, sha256_file(data)
    save_model(model, path, external_data=True)
    assert data.stat().st_size == first_size
    assert sha256_file(data) == first_sha
    # A different model with the same tensor sizes replaces the bytes, still without growing the file.
    save_model(conv_model(seed=1), path, external_data=True)
    assert data.stat().st_size == first_size
    assert sha256_file(data) != first_sha
    np.testing.assert_array_equal(tensors_by_name(load_model(path))["W"], tensors_by_name(conv_model(seed=1))["W"])


def test_save_leaves_no_temp_files_and_moves_into_place_with_os_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real_replace = os.replace

    def recording_replace(src, dst):  # type: ignore[no-untyped-def]
        calls.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)  # rewriter.io calls os.replace
    path = tmp_path / "m.onnx"
    save_model(conv_model(), path, external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    # Data file first, then the model; both from temporary files in the destination folder.
    assert [Path(dst) for _, dst in calls] == [tmp_path / "m.onnx.data", path]
    assert all(Path(src).parent == tmp_path and Path(src).name.endswith(".tmp") for src, _ in calls)


def test_failed_save_keeps_the_old_file_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    save_model(conv_model(seed=0), path)
    before = sha256_file(path)

    def failing_replace(src, dst):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_model(conv_model(seed=1), path, external_data=True)
    assert sha256_file(path) == before
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_save_into_a_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        save_model(conv_model(), tmp_path / "nope" / "m.onnx")


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


def test_save_with_external_data_does_not_modify_the_callers_proto(tmp_path: Path) -> None:
    model = conv_model()
    before = model.SerializeToString()
    save_model(model, tmp_path / "m.onnx", external_data=True)
    assert model.SerializeToString() == before
    assert all(t.data_location == TensorProto.DEFAULT and t.raw_data for t in model.graph.initializer)


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
