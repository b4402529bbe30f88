"""Atomic saves (rewriter.io.save): round trips, external data, temporary files, and the one writer every
output file (model, report, plan, HTML page) goes through."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from rewriter.errors import InputError
from rewriter.io import load_model, save_model, sha256_file, write_atomically
from rewriter.report import write_json, write_text
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


# -- one writer for every output file --------------------------------------------------------------------
def test_report_writers_move_a_temporary_file_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real_replace = os.replace

    def recording_replace(src, dst):  # type: ignore[no-untyped-def]
        calls.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    report, page = tmp_path / "report.json", tmp_path / "page.html"
    write_json({"a": [1, 2], "b": np.float32(0.5)}, report)
    write_text("<p>\u00e9</p>", page)
    assert sorted(os.listdir(tmp_path)) == ["page.html", "report.json"]
    assert report.read_text(encoding="utf-8") == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 0.5\n}\n'
    assert page.read_bytes() == "<p>\u00e9</p>".encode()
    assert [Path(dst) for _, dst in calls] == [report, page]
    pid = os.getpid()
    assert [Path(src).parent for src, _ in calls] == [tmp_path, tmp_path]
    assert [Path(src).name.startswith(f".{Path(dst).name}.{pid}.") and src.endswith(".tmp") for src, dst in calls] == [True, True]


def test_failed_report_write_keeps_the_old_file_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = tmp_path / "report.json"
    write_json({"run": 1}, report)
    with pytest.raises(ValueError):
        write_json({"run": float("nan")}, report)  # not JSON: refused half way through writing
    assert json.loads(report.read_text()) == {"run": 1}

    def failing_replace(src, dst):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text("new", report)
    assert json.loads(report.read_text()) == {"run": 1}
    assert os.listdir(tmp_path) == ["report.json"]


def test_write_into_a_missing_folder_or_onto_a_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"output folder .* does not exist"):
        write_atomically(tmp_path / "nope" / "r.json", lambda fh: fh.write(b"{}"))
    with pytest.raises(InputError, match="is a directory"):
        write_atomically(tmp_path, lambda fh: fh.write(b"{}"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mask", [0o027, 0o002, 0o077], ids=["umask027", "umask002", "umask077"])
def test_report_files_get_the_same_mode_as_model_files(mask: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every writer makes ``0o666 & ~umask`` (not mkstemp's 0600), reading the umask without setting it:
    setting it to read it would race with other threads creating files meanwhile."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the umask from /proc")

    def no_umask(_: int) -> int:
        raise AssertionError("the umask was set while writing")

    old = os.umask(mask)
    try:
        monkeypatch.setattr(os, "umask", no_umask)
        save_model(conv_model(), tmp_path / "m.onnx", external_data=True)
        write_json({"kept": 1}, tmp_path / "report.json")
        write_text("<html></html>", tmp_path / "report.html")
    finally:
        monkeypatch.undo()
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["m.onnx", "m.onnx.data", "report.json", "report.html"], 0o666 & ~mask)
