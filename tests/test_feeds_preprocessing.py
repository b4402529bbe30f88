"""The user's own preprocessing: image resize modes (stretch, letterbox, center-crop, pad) and a data-loader
script; each drives a lossy run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rewriter.errors import InputError
from rewriter.validation.feeds import FeedSet, ImageSpec, InputSpec, feedset_for, fit_box, load_loader_feeds

Image = pytest.importorskip("PIL.Image")


@pytest.mark.parametrize("mode, src, dst, resized, offset, box", [
    ("stretch", (100, 50), (32, 32), (32, 32), (0, 0), (0, 0, 32, 32)),
    ("letterbox", (100, 50), (32, 32), (32, 16), (0, 8), (0, 0, 32, 16)),  # tall picture: bars left and right
    ("letterbox", (50, 100), (32, 64), (32, 64), (0, 0), (0, 0, 32, 64)),  # same aspect ratio: no bars
    ("crop", (100, 50), (32, 32), (64, 32), (0, 0), (16, 0, 48, 32)),  # covers, the middle rows kept
    ("pad", (100, 50), (32, 32), (32, 16), (0, 0), (0, 0, 32, 16)),  # shrunk to fit, top left
    ("pad", (10, 20), (32, 64), (10, 20), (0, 0), (0, 0, 10, 20)),  # never enlarged
])
def test_fit_box(mode: str, src: tuple, dst: tuple, resized: tuple, offset: tuple, box: tuple) -> None:
    assert fit_box(mode, src, dst) == (resized, offset, box)


def _picture(h: int, w: int, rgb: tuple[int, int, int] = (200, 10, 10)) -> object:
    return Image.fromarray(np.full((h, w, 3), rgb, np.uint8))


def test_letterbox_fills_the_bars_and_keeps_the_picture() -> None:
    spec = ImageSpec.parse("32x32,resize=letterbox,fill=255")
    out = spec.fit(_picture(100, 50))
    assert out.shape == (32, 32, 3)
    assert (out[:, :8] == 255).all() and (out[:, 24:] == 255).all()  # white bars
    assert (out[:, 8:24] == (200, 10, 10)).all()


def test_crop_and_pad_and_stretch() -> None:
    half = np.zeros((40, 40, 3), np.uint8)
    half[:20] = 255  # top half white, bottom black
    picture = Image.fromarray(half)
    crop = ImageSpec(20, 40, resize="crop").fit(picture)  # the middle band of rows: half white, half black
    assert crop.shape == (20, 40, 3) and crop[0].mean() > 200 and crop[-1].mean() < 50
    pad = ImageSpec(64, 64, resize="pad", fill=(7.0, 7.0, 7.0)).fit(picture)
    assert (pad[:40, :40] == half).all() and (pad[40:] == 7).all() and (pad[:, 40:] == 7).all()
    stretch = ImageSpec(20, 10).fit(picture)
    assert stretch.shape == (20, 10, 3) and stretch[0].mean() > 200 and stretch[-1].mean() < 50


@pytest.mark.parametrize("text, message", [
    ("32x32,resize=squash", "resize mode"),
    ("32x32,fill=300", "fill must lie"),
    ("32x32,fill=1/2", "cannot read"),
])
def test_resize_spec_errors(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        ImageSpec.parse(text)


SPECS = [InputSpec("x", np.dtype(np.float32), (1, 3, 4, 4))]


def _loader(tmp_path: Path, body: str, name: str = "loader.py") -> Path:
    path = tmp_path / name
    path.write_text("import numpy as np\n" + body, encoding="utf-8")
    return path


def test_a_data_loader_yields_feeds_and_samples_along_a_leading_axis(tmp_path: Path) -> None:
    path = _loader(tmp_path, """
def load_data():
    for i in range(3):
        yield {"x": np.full((1, 3, 4, 4), i, np.float64)}
def batches():
    return [{"x": np.zeros((5, 1, 3, 4, 4), np.float32)}]
""")
    feeds = load_loader_feeds(str(path), SPECS)
    assert [float(f["x"][0, 0, 0, 0]) for f in feeds] == [0.0, 1.0, 2.0] and feeds[0]["x"].dtype == np.float32
    assert len(load_loader_feeds(f"{path}:batches", SPECS)) == 5
    fs = FeedSet.from_loader(str(path), SPECS)
    assert fs.sizes() == {"calibration": 1, "validation": 1, "test": 1} and not fs.synthetic and fs.source == f"data loader {path}"


@pytest.mark.parametrize("body, message", [
    ("def load_data():\n    yield [1, 2]\n", "not a dict"),
    ("def load_data():\n    yield {'y': np.zeros((1, 3, 4, 4), np.float32)}\n", "no array for input"),
    ("def load_data():\n    yield {'x': np.zeros((1, 3, 5, 5), np.float32)}\n", "shape"),
    ("def load_data():\n    return []\n", "yielded no feeds"),
    ("def load_data():\n    raise RuntimeError('boom')\n", "raised RuntimeError: boom"),
    ("x = 1\n", "is not a function"),
])
def test_data_loader_errors_are_one_line_usage_errors(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_loader_feeds(str(_loader(tmp_path, body)), SPECS)


def test_a_data_loader_excludes_the_other_sources(tmp_path: Path) -> None:
    path = _loader(tmp_path, "def load_data():\n    yield {'x': np.zeros((1, 3, 4, 4), np.float32)}\n")
    with pytest.raises(InputError, match="not --images and --data-loader-script"):
        feedset_for(SPECS, images=str(tmp_path), data_loader=str(path))


# -- each drives a lossy run --------------------------------------------------------------------------------
CONV = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 16, 16] x) => (float[1, 64, 16, 16] y)
    <float[64, 3, 3, 3] W1, float[64, 64, 3, 3] W2> {
        h = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W1)
        r = Relu (h)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, W2)
    }
"""


def _lossy_run(tmp_path: Path, **feeds: object):  # type: ignore[no-untyped-def]
    import onnx

    from rewriter.job import OptimizeOptions, optimize_model
    from tests.helpers import parse

    path = tmp_path / "conv.onnx"
    onnx.save(parse(CONV), path)
    options = OptimizeOptions(passes=("bottleneck",), max_error="cosine>=0.5", latency=False, **feeds)  # type: ignore[arg-type]
    return optimize_model(path, options)


def test_a_data_loader_drives_a_lossy_run(tmp_path: Path) -> None:
    path = _loader(tmp_path, """
def load_data():
    rng = np.random.default_rng(0)
    for _ in range(8):
        yield {"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}
""")
    outcome = _lossy_run(tmp_path, data_loader_script=str(path))
    assert outcome.feeds.source == f"data loader {path}" and outcome.feeds.sizes() == {"calibration": 3, "validation": 3, "test": 2}
    assert outcome.result.feeds == f"data loader {path}"
    assert outcome.result.decisions and all(d.tried for d in outcome.result.decisions)
    assert not outcome.gate


def test_a_letterbox_image_spec_drives_a_lossy_run(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # portrait pictures: letterboxed into the square input with white bars
        Image.fromarray(rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    outcome = _lossy_run(tmp_path, images=str(folder), image_spec="16x16,resize=letterbox,fill=255,scale=0.00392")
    x = outcome.feeds.validation[0]["x"]
    assert x.shape == (1, 3, 16, 16) and np.allclose(x[..., :4], 255 * 0.00392) and np.allclose(x[..., 12:], 255 * 0.00392)
    assert outcome.result.decisions and all(d.tried for d in outcome.result.decisions)
    assert not outcome.gate
