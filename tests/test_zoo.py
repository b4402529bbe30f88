"""A zoo as it comes: per-model input shapes and settings in one optimize-many job (rewriter.zoo).

Three small models whose dynamic inputs have different names (``image``, ``input:0``, ``x``) and two that
share the name ``x`` at different sizes (as PaddleOCR's detector and classifier do). Runs are
numerics-only; each optimize-many run spawns worker processes, so the runs are few and shared.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from rewriter.cli import app
from rewriter.config import load_config
from rewriter.errors import InputError
from rewriter.fleet import optimize_many
from rewriter.job import OptimizeOptions
from rewriter.zoo import ModelSettings, declared_inputs, model_settings, plan_for, plan_models
from tests.helpers import assert_same_outputs, parse

IMAGE = """
<ir_version: 8, opset_import: ["" : 17]>
image_net (float[N, 3, H, W] image) => (float[N, 4, H, W] y) <float[8, 3, 1, 1] w1, float[8] b1, float[4, 8, 1, 1] w2, float[4] b2> {
  h = Conv(image, w1, b1)
  y = Conv(h, w2, b2)
}
"""
NHWC = """
<ir_version: 8, opset_import: ["" : 17]>
nhwc_net (float[batch, H, W, 4] inp) => (float[batch, 8, H, W] y) <float[8, 4, 3, 3] w, float[8] scale, float[8] bias, float[8] mean, float[8] var> {
  t = Transpose<perm = [0, 3, 1, 2]>(inp)
  h = Conv<pads = [1, 1, 1, 1]>(t, w)
  y = BatchNormalization(h, scale, bias, mean, var)
}
"""
X_NET = """
<ir_version: 8, opset_import: ["" : 17]>
x_net (float[N, 4, H, W] x) => (float[N, 4, H, W] y) <float[8, 4, 1, 1] w1, float[4, 8, 1, 1] w2> {
  h = Conv(x, w1)
  y = Conv(h, w2)
}
"""
BATCH_ONLY = """
<ir_version: 8, opset_import: ["" : 17]>
batch_only (float[N, 4, 6, 6] x) => (float[N, 4, 6, 6] y) <float[8, 4, 1, 1] w1, float[4, 8, 1, 1] w2> {
  h = Conv(x, w1)
  y = Conv(h, w2)
}
"""
SHAPES = ("image:1x3x8x16", "input:0:1x6x6x4", "x:1x4x6x6")
QUICK = ("--no-latency", "--num-feeds", "2", "-j", "2")
runner = CliRunner()


def renamed(model: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    """The model with its tensor ``old`` called ``new`` (ONNX text cannot spell ``input:0``)."""
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name == old:
            vi.name = new
    for node in model.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Five model files: three inputs named differently, two detectors/classifiers sharing ``x``."""
    root = tmp_path_factory.mktemp("zoo")
    models = {
        "image_net": parse(IMAGE, 0),
        "tf_net": renamed(parse(NHWC, 1), "inp", "input:0"),
        "x_net": parse(X_NET, 2),
        "ocr-det": parse(X_NET, 3),
        "ocr-cls": parse(X_NET, 4),
    }
    paths = {}
    for stem, model in models.items():
        paths[stem] = root / f"{stem}.onnx"
        onnx.save_model(model, str(paths[stem]))
    return paths


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int = 2) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def summary_rows(out: Path) -> dict[str, dict]:
    data = json.loads((out / "summary.json").read_text())
    assert data["summary_version"] == 3
    return {row["name"]: row for row in data["models"]}


# -- the acceptance: three input names, each shape once ---------------------------------------------------
@pytest.fixture(scope="module")
def three_run(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("three") / "out"
    models = [zoo["image_net"], zoo["tf_net"], zoo["x_net"]]
    result = invoke("optimize-many", *models, "--out-dir", out, *[a for s in SHAPES for a in ("--input-shape", s)], *QUICK)
    return result, out


def test_three_models_with_differently_named_inputs_in_one_command(three_run, zoo: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    result, out = three_run
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].startswith("3 of 3 model(s) ok")
    rows = summary_rows(out)
    expected = {"image_net": {"image": [1, 3, 8, 16]}, "tf_net": {"input:0": [1, 6, 6, 4]}, "x_net": {"x": [1, 4, 6, 6]}}
    for name, shapes in expected.items():
        row = rows[name]
        assert row["status"] == "ok" and row["kept"] >= 1, row
        assert row["settings"] == {"tables": [], "input_shapes": shapes, "options": {}, "input_shape_notes": []}
        report = json.loads(Path(row["report"]).read_text())
        assert report["input_shapes"] == shapes and report["input_shape_notes"] == []
        assert_same_outputs(onnx.load(row["input"]), onnx.load(row["output"]),
                            input_shapes={k: tuple(v) for k, v in shapes.items()})


def test_the_same_from_a_config_file(zoo: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "zoo.toml"
    config.write_text("input-shape = [" + ", ".join(f'"{s}"' for s in SHAPES) + "]\nlatency = false\nnum-feeds = 2\n")
    out = tmp_path / "out"
    result = invoke("optimize-many", zoo["image_net"], zoo["tf_net"], zoo["x_net"], "--out-dir", out, "--config", config, "-j", "2")
    assert result.exit_code == 0, result.output
    rows = summary_rows(out)
    assert {n: r["status"] for n, r in rows.items()} == {"image_net": "ok", "tf_net": "ok", "x_net": "ok"}
    assert rows["tf_net"]["settings"]["input_shapes"] == {"input:0": [1, 6, 6, 4]}


def test_per_model_tables_give_one_input_name_two_shapes(zoo: dict[str, Path], tmp_path: Path) -> None:
    """ocr-det and ocr-cls both take ``x``: a glob table for both, a stem table for one, the flag for the rest."""
    config = tmp_path / "zoo.toml"
    config.write_text(
        'latency = false\nnum-feeds = 2\n\n'
        '[models."ocr-*"]\ninput-shape = "x:1x4x16x16"\npasses = ["fuse_1x1_chain"]\n\n'
        '[models.ocr-cls]\ninput-shape = ["x:1x4x4x12"]\n'
    )
    out = tmp_path / "out"
    models = [zoo["ocr-det"], zoo["ocr-cls"], zoo["image_net"]]
    result = invoke("optimize-many", *models, "--out-dir", out, "--config", config, "--input-shape", "image:1x3x8x8", "-j", "2")
    assert result.exit_code == 0, result.output
    rows = summary_rows(out)
    assert rows["ocr-det"]["settings"] == {"tables": ["ocr-*"], "input_shapes": {"x": [1, 4, 16, 16]},
                                           "options": {"passes": "fuse_1x1_chain"}, "input_shape_notes": []}
    assert rows["ocr-cls"]["settings"]["tables"] == ["ocr-*", "ocr-cls"]  # in file order, the later one winning
    assert rows["ocr-cls"]["settings"]["input_shapes"] == {"x": [1, 4, 4, 12]}
    assert rows["image_net"]["settings"] == {"tables": [], "input_shapes": {"image": [1, 3, 8, 8]}, "options": {}, "input_shape_notes": []}
    cls = json.loads(Path(rows["ocr-cls"]["report"]).read_text())
    assert cls["input_shapes"] == {"x": [1, 4, 4, 12]} and [p["name"] for p in cls["passes"]] == ["fuse_1x1_chain"]


# -- what stays an error --------------------------------------------------------------------------------------
def test_a_shape_no_model_has_is_a_usage_error(zoo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = one_line_error(invoke("optimize-many", zoo["image_net"], zoo["x_net"], "--out-dir", out, "--input-shape", "image:1x3x8x8",
                                 "--input-shape", "images:1x3x8x8", *QUICK))
    assert line == "error: --input-shape names 'images', which is not an input of any of the 2 model(s) (their inputs: ['image', 'x'])"
    assert not out.exists()


def test_a_table_shape_none_of_its_models_has_is_a_usage_error(zoo: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "zoo.toml"
    config.write_text('[models."ocr-*"]\ninput-shape = "image:1x3x8x8"\n')
    line = one_line_error(invoke("optimize-many", zoo["ocr-det"], zoo["image_net"], "--out-dir", tmp_path / "out", "--config", config, *QUICK))
    assert line.startswith("""error: [models."ocr-*"] input-shape names 'image', which is not an input of the 1 model(s) it matches""")


def test_a_tables_bad_option_names_the_model_before_any_job(zoo: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "zoo.toml"
    config.write_text('[models.x_net]\npasses = "nope"\n')
    out = tmp_path / "out"
    line = one_line_error(invoke("optimize-many", zoo["x_net"], "--out-dir", out, "--config", config, "--input-shape", "x:1x4x6x6", *QUICK))
    assert line.startswith(f"error: {zoo['x_net']} (settings of x_net): ") and "unknown pass 'nope'" in line
    assert not out.exists()


def test_optimize_on_one_model_keeps_the_strict_error(zoo: dict[str, Path], tmp_path: Path) -> None:
    line = one_line_error(invoke("optimize", zoo["x_net"], "-o", tmp_path / "o.onnx", "--input-shape", "x:1x4x6x6",
                                 "--input-shape", "image:1x3x8x8", "--no-latency"))
    assert line == "error: --input-shape names 'image', which is not an input (inputs: ['x'])"


def test_a_missing_shape_fails_only_its_model_with_the_flag_to_pass(zoo: dict[str, Path], tmp_path: Path) -> None:
    batch_only = tmp_path / "batch_only.onnx"
    onnx.save_model(parse(BATCH_ONLY, 5), str(batch_only))
    out = tmp_path / "out"
    result = invoke("optimize-many", zoo["image_net"], zoo["tf_net"], batch_only, "--out-dir", out, *QUICK)
    assert result.exit_code == 1, result.output
    rows = summary_rows(out)
    assert rows["image_net"]["status"] == rows["tf_net"]["status"] == "error"
    assert rows["image_net"]["error"].endswith("pass --input-shape image:1x3xHxW")
    assert rows["tf_net"]["error"].endswith("pass --input-shape input:0:1xHxWx4")
    ok = rows["batch_only"]  # a symbolic batch dim alone is taken as 1, with a note
    assert ok["status"] == "ok" and ok["settings"]["input_shapes"] == {}
    note = {"input": "x", "dim": 0, "declared": "N", "value": 1, "note": "symbolic leading (batch) dim N taken as 1"}
    assert ok["settings"]["input_shape_notes"] == [note]
    assert json.loads(Path(ok["report"]).read_text())["input_shape_notes"] == [note]


# -- the library: tables, precedence, names -------------------------------------------------------------------
def test_model_tables_are_read_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "cfg" / "zoo.toml"
    config.parent.mkdir()
    config.write_text(
        'threads = 1\n[models."ppocr*"]\ninput-shape = ["x:1x3x48x192"]\nfeeds = "data/ocr.npz"\nnum-feeds = 4\n'
        'metric = "metrics.py:accuracy"\nmax-error = ["cosine>=0.99", "top1-drop<=0.02"]\n'
        '[models."ppocr*".pass-options.bottleneck]\nrank-fractions = [0.5]\n'
        '[models.resnet50]\ntime-budget = 60\n'
    )
    cfg = load_config(config)
    assert cfg.options == {"threads": 1} and list(cfg.models) == ["ppocr*", "resnet50"]
    ocr, resnet = model_settings(cfg)
    assert ocr.input_shapes == {"x": (1, 3, 48, 192)}
    assert ocr.values == {"feeds": (str(config.parent / "data/ocr.npz"),), "num_feeds": 4,
                          "metric": f"{config.parent / 'metrics.py'}:accuracy", "max_error": "cosine>=0.99,top1-drop<=0.02"}
    assert ocr.pass_options == {"bottleneck": {"rank_fractions": [0.5]}}
    assert resnet.values == {"time_budget": 60.0}
    assert ocr.matches("zoo/ppocr-cls.onnx") and ocr.matches("ppocrv4-det.onnx") and not ocr.matches("PPOCR.onnx")
    assert resnet.matches("a/resnet50.onnx") and not resnet.matches("a/resnet50x.onnx")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[models.a]\nthreads = 2\n', """[models."a"]: unknown key 'threads'; a model's table takes"""),
        ('[models.a]\nnum-feeds = "4"\n', """[models."a"]: key 'num-feeds': expected an integer, got '4'"""),
        ('[models.a]\nnum-feeds = 0\n', "out of range"),
        ('[models.a]\ninput-shape = "x:1xHx3"\n', "dims must be integers"),
        ('[models.a]\nfeeds = 3\n', "expected a string or a list of strings"),
        ('models = 3\n', "'models' must be a table of tables"),
    ],
)
def test_model_table_mistakes_name_the_table_and_key(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "zoo.toml"
    config.write_text(text)
    with pytest.raises(InputError) as info:
        model_settings(load_config(config))
    assert expected in str(info.value) and str(config) in str(info.value)


def test_tables_win_over_the_job_in_file_order() -> None:
    job = OptimizeOptions(input_shapes={"x": (1, 3, 8, 8), "y": (1, 2)}, images="imgs", image_spec="8x8", passes="a", num_feeds=8,
                          pass_options={"p": {"k": 1, "j": 2}})
    tables = [
        ModelSettings("m*", {"passes": "b", "feeds": ("f.npz",)}, {"x": (1, 3, 4, 4)}, {"p": {"k": 5}}),
        ModelSettings("m1", {"passes": "c"}),
        ModelSettings("other", {"passes": "z"}),
    ]
    plan = plan_for("zoo/m1.onnx", job, tables)
    assert plan.tables == ("m*", "m1")
    o = plan.options
    assert (o.passes, o.feeds, o.images, o.image_spec, o.num_feeds) == ("c", ("f.npz",), None, None, 8)  # the table's feed source
    assert o.input_shapes == {"x": (1, 3, 4, 4), "y": (1, 2)} and o.pass_options == {"p": {"k": 5, "j": 2}}
    assert plan.settings()["options"] == {"passes": "c", "feeds": ["f.npz"], "images": None, "image_spec": None,
                                          "pass_options": {"p": {"k": 5, "j": 2}}}
    assert plan_for("zoo/n.onnx", job, tables).options == job  # no table: the job's options as they are


def test_plan_models_cuts_shapes_to_each_models_inputs(zoo: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert declared_inputs(zoo["tf_net"]) == ["input:0"] and declared_inputs(bad) is None
    job = OptimizeOptions(input_shapes={"x": (1, 4, 6, 6), "image": (1, 3, 8, 8), "seq": (1, 5)})
    models = [str(zoo["x_net"]), str(zoo["image_net"]), str(bad)]
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        plans = plan_models(models, job, [ModelSettings("bad", input_shapes={"q": (1,)}), ModelSettings("gone", {"seed": 1})])
    # 'seq' may be bad.onnx's: a warning, not an error; the unreadable model keeps only its table's shapes
    assert [p.options.input_shapes for p in plans] == [{"x": (1, 4, 6, 6)}, {"image": (1, 3, 8, 8)}, {"q": (1,)}]
    assert "--input-shape names 'seq'" in caplog.text and "1 of them could not be read" in caplog.text
    assert """[models."gone"] matches none of the 3 model(s)""" in caplog.text
    with pytest.raises(InputError, match="not an input of any of the 2 model"):
        plan_models(models[:2], job)
    with pytest.raises(InputError, match="names 'x', which is not an input of any of the 1 model"):
        optimize_many([zoo["image_net"]], tmp_path / "out", OptimizeOptions(input_shapes={"x": (1, 4, 6, 6)}, latency=False))
