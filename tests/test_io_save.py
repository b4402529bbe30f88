"""Atomic saves (rewriter.io.save): round trips, external data, temporary files, and the one writer every
output file (model, report, plan, HTML page) goes through."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from rewriter.errors import InputError
from rewriter.io import load_model, save_model, sha256_file
from tests.io_models import conv_model, run, tensors_by_name


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
def test_save_with_external_data_does_not_modify_the_callers_proto(tmp_path: Path) -> None:
    model = conv_model()
    before = model.SerializeToString()
    save_model(model, tmp_path / "m.onnx", external_data=True)
    assert model.SerializeToString() == before
    assert all(t.data_location == TensorProto.DEFAULT and t.raw_data for t in model.graph.initializer)
