"""Validation feeds: random feeds by dtype and shape, .npy/.npz files, image folders, splitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rewriter.errors import InputError
from rewriter.shapes import resolve_input_shapes
from rewriter.validation.feeds import (
    FeedSet,
    ImageSpec,
    InputSpec,
    input_specs,
    load_array_feeds,
    load_image_feeds,
    random_feeds,
    split_feeds,
)
from tests.helpers import parse, run_reference

MULTI_DTYPE = """
<ir_version: 8, opset_import: ["" : 17]>
multi (float[N, 3, 4] x, float16[2, 3] h, int64[5] i, int32[2, 2] j, bool[3] b)
    => (float[N, 3, 4] x2, float16[2, 3] h2, int64[5] i2, int32[2, 2] j2, bool[3] b2) {
  x2 = Identity(x)
  h2 = Identity(h)
  i2 = Identity(i)
  j2 = Identity(j)
  b2 = Identity(b)
}
"""

SPECS = [
    InputSpec("x", np.dtype(np.float32), (1, 3, 4)),
    InputSpec("h", np.dtype(np.float16), (2, 3)),
    InputSpec("i", np.dtype(np.int64), (5,)),
    InputSpec("j", np.dtype(np.int32), (2, 2)),
    InputSpec("b", np.dtype(np.bool_), (3,)),
]


def spec(name: str, dtype: type, shape: tuple[int, ...]) -> InputSpec:
    return InputSpec(name, np.dtype(dtype), shape)


# -- input specs and random feeds ----------------------------------------------------------------------


def test_input_specs_from_model() -> None:
    model = parse(MULTI_DTYPE)
    assert input_specs(model, resolve_input_shapes(model)) == SPECS


def test_random_feeds_respect_dtype_and_shape() -> None:
    feeds = random_feeds(SPECS, 3, seed=0)
    assert len(feeds) == 3
    for feed in feeds:
        assert set(feed) == {s.name for s in SPECS}
        for s in SPECS:
            assert feed[s.name].dtype == s.dtype, s.name
            assert feed[s.name].shape == s.shape, s.name


def test_random_feeds_run_through_onnxruntime() -> None:
    model = parse(MULTI_DTYPE)
    feeds = random_feeds(SPECS, 2, seed=0)
    outs = run_reference(model, feeds)
    for feed, out in zip(feeds, outs):
        for s, got in zip(SPECS, out):
            np.testing.assert_array_equal(got, feed[s.name])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_float_feeds_are_standard_normal(dtype: type) -> None:
    (feed,) = random_feeds([spec("x", dtype, (100, 100))], 1, seed=1)
    x = feed["x"].astype(np.float64)
    assert abs(x.mean()) < 0.05
    assert abs(x.std() - 1.0) < 0.05
    assert np.all(np.isfinite(x))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8, np.uint8])
def test_integer_feeds_are_valid_small_values(dtype: type) -> None:
    (feed,) = random_feeds([spec("i", dtype, (2000,))], 1, seed=1)
    i = feed["i"]
    assert i.dtype == np.dtype(dtype)
    assert i.min() >= 1 and i.max() <= 8  # never zero, valid as an index into a dim of 9 or more
    assert set(np.unique(i).tolist()) == set(range(1, 9))


def test_integer_scalar_and_tiny_feeds_are_not_zero() -> None:
    for seed in range(20):
        (feed,) = random_feeds([spec("k", np.int64, ()), spec("n", np.int32, (1,))], 1, seed=seed)
        assert feed["k"].shape == () and feed["k"] != 0
        assert feed["n"][0] != 0


def test_bool_feeds_hold_both_values() -> None:
    (feed,) = random_feeds([spec("b", np.bool_, (1000,))], 1, seed=1)
    b = feed["b"]
    assert b.dtype == np.bool_
    assert 0.4 < b.mean() < 0.6


def test_unsupported_dtype_is_an_input_error() -> None:
    with pytest.raises(InputError, match="'s'.*--feeds"):
        random_feeds([spec("s", np.str_, (2,))], 1)


def test_random_feeds_deterministic_by_seed() -> None:
    a, b = random_feeds(SPECS, 2, seed=42), random_feeds(SPECS, 2, seed=42)
    for fa, fb in zip(a, b):
        for name in fa:
            np.testing.assert_array_equal(fa[name], fb[name])


def test_different_seeds_and_feeds_differ() -> None:
    big = [spec("x", np.float32, (4, 8)), spec("i", np.int64, (32,))]
    a, b = random_feeds(big, 2, seed=1), random_feeds(big, 2, seed=2)
    for name in ("x", "i"):
        assert not np.array_equal(a[0][name], b[0][name])
        assert not np.array_equal(a[0][name], a[1][name])  # the feeds of one call differ too


def test_feedset_random_calibration_and_validation_differ() -> None:
    fs = FeedSet.random(SPECS[:1], count=4, calibration_count=3, seed=0)
    assert len(fs.validation) == 4 and len(fs.calibration) == 3
    for v in fs.validation:
        for c in fs.calibration:
            assert not np.array_equal(v["x"], c["x"])
    again = FeedSet.random(SPECS[:1], count=4, calibration_count=3, seed=0)
    np.testing.assert_array_equal(again.calibration[0]["x"], fs.calibration[0]["x"])
    assert "seed 0" in fs.source


# -- split_feeds ---------------------------------------------------------------------------------------


def numbered(n: int) -> list[dict[str, np.ndarray]]:
    return [{"x": np.array([i])} for i in range(n)]


@pytest.mark.parametrize(("n", "fraction", "n_cal"), [(10, 0.5, 5), (10, 0.3, 3), (10, 0.01, 1), (10, 0.99, 9), (2, 0.5, 1), (7, 0.5, 4)])
def test_split_feeds_disjoint_and_covering(n: int, fraction: float, n_cal: int) -> None:
    feeds = numbered(n)
    cal, val = split_feeds(feeds, fraction, seed=3)
    assert len(cal) == n_cal and len(val) == n - n_cal
    cal_ids, val_ids = {int(f["x"][0]) for f in cal}, {int(f["x"][0]) for f in val}
    assert not cal_ids & val_ids
    assert cal_ids | val_ids == set(range(n))


def test_split_feeds_seeded() -> None:
    feeds = numbered(20)
    ids = lambda fs: [int(f["x"][0]) for f in fs]  # noqa: E731
    a, b = split_feeds(feeds, seed=1), split_feeds(feeds, seed=1)
    assert ids(a[0]) == ids(b[0])
    assert ids(split_feeds(feeds, seed=2)[0]) != ids(a[0])
    assert ids(a[0]) != list(range(10))  # shuffled, not the first half


@pytest.mark.parametrize(("n", "fraction", "message"), [(10, 0.0, "between 0 and 1"), (10, 1.0, "between 0 and 1"), (1, 0.5, "at least two"), (0, 0.5, "at least two")])
def test_split_feeds_errors(n: int, fraction: float, message: str) -> None:
    with pytest.raises(InputError, match=message):
        split_feeds(numbered(n), fraction)


# -- .npy / .npz ---------------------------------------------------------------------------------------

X = spec("x", np.float32, (1, 3, 4, 4))
IDX = spec("idx", np.int64, (5,))


def test_npy_single_sample(tmp_path: Path) -> None:
    a = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", a)
    feeds = load_array_feeds(tmp_path / "x.npy", [X])
    assert len(feeds) == 1
    np.testing.assert_array_equal(feeds[0]["x"], a)


def test_npy_with_sample_axis(tmp_path: Path) -> None:
    a = np.random.default_rng(0).standard_normal((6, 1, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", a)
    feeds = load_array_feeds(tmp_path / "x.npy", [X])
    assert len(feeds) == 6
    for k, feed in enumerate(feeds):
        assert feed["x"].shape == X.shape and feed["x"].flags.c_contiguous
        np.testing.assert_array_equal(feed["x"], a[k])


def test_npy_float64_is_cast(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((1, 3, 4, 4)))
    (feed,) = load_array_feeds(tmp_path / "x.npy", [X])
    assert feed["x"].dtype == np.float32


def test_npz_several_inputs_with_sample_axis(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((3, 1, 3, 4, 4)).astype(np.float32)
    idx = np.arange(15, dtype=np.int32).reshape(3, 5)  # int32 for an int64 input: cast
    np.savez(tmp_path / "f.npz", x=x, idx=idx, unused=np.zeros(2))
    feeds = load_array_feeds(tmp_path / "f.npz", [X, IDX])
    assert len(feeds) == 3
    for k, feed in enumerate(feeds):
        assert set(feed) == {"x", "idx"}
        np.testing.assert_array_equal(feed["x"], x[k])
        assert feed["idx"].dtype == np.int64
        np.testing.assert_array_equal(feed["idx"], idx[k])


def test_npz_several_inputs_without_sample_axis(tmp_path: Path) -> None:
    x = np.ones((1, 3, 4, 4), np.float32)
    idx = np.array([1, 2, 3, 4, 5], np.int64)
    np.savez(tmp_path / "f.npz", x=x, idx=idx)
    (feed,) = load_array_feeds(tmp_path / "f.npz", [X, IDX])
    np.testing.assert_array_equal(feed["idx"], idx)
    np.testing.assert_array_equal(feed["x"], x)


def test_npz_mixed_sample_axis_must_agree_on_count(tmp_path: Path) -> None:
    # One sample given plainly, two along a sample axis: the counts differ.
    np.savez(tmp_path / "f.npz", x=np.ones((1, 3, 4, 4), np.float32), idx=np.ones((2, 5), np.int64))
    with pytest.raises(InputError, match="different numbers of samples"):
        load_array_feeds(tmp_path / "f.npz", [X, IDX])


def test_npz_missing_input(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", x=np.ones((1, 3, 4, 4), np.float32))
    with pytest.raises(InputError, match="idx"):
        load_array_feeds(tmp_path / "f.npz", [X, IDX])


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.ones((1, 3, 5, 4), np.float32), "shape"),
        (np.ones((2, 1, 3, 4, 5), np.float32), "shape"),
        (np.ones((3, 4, 4), np.float32), "rank"),
        (np.ones((1, 1, 1, 3, 4, 4), np.float32), "rank"),
        (np.ones((1, 3, 4, 4), np.int64), "dtype"),
        (np.ones((1, 3, 4, 4), np.bool_), "dtype"),
    ],
)
def test_npy_wrong_array(tmp_path: Path, array: np.ndarray, message: str) -> None:
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(InputError, match=message):
        load_array_feeds(tmp_path / "x.npy", [X])


def test_npy_for_a_multi_input_model(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((1, 3, 4, 4), np.float32))
    with pytest.raises(InputError, match="single-input"):
        load_array_feeds(tmp_path / "x.npy", [X, IDX])


def test_missing_or_bad_feeds_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such feeds file"):
        load_array_feeds(tmp_path / "nope.npz", [X])
    (tmp_path / "bad.npy").write_bytes(b"not numpy at all")
    with pytest.raises(InputError, match="not a .npy/.npz"):
        load_array_feeds(tmp_path / "bad.npy", [X])


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError):
        load_array_feeds(tmp_path / "o.npy", [spec("o", np.float32, (1,))])


def test_feedset_from_files_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.standard_normal((4, 1, 3, 4, 4)).astype(np.float32))
    np.savez(tmp_path / "b.npz", x=rng.standard_normal((2, 1, 3, 4, 4)).astype(np.float32))
    fs = FeedSet.from_files([tmp_path / "a.npy", tmp_path / "b.npz"], [X], calibration_fraction=0.5)
    assert fs.sizes() == {"calibration": 2, "validation": 2, "test": 2}  # a quarter held out (rounded), the rest halved
    seen = [f["x"].tobytes() for f in fs.calibration + fs.validation + fs.test]
    assert len(set(seen)) == 6
    assert "a.npy" in fs.source and "b.npz" in fs.source
    whole = FeedSet.from_files([tmp_path / "a.npy", tmp_path / "b.npz"], [X], calibration_fraction=0.5, holdout_fraction=0.0)
    assert whole.sizes() == {"calibration": 3, "validation": 3, "test": 0}


# -- image folders -------------------------------------------------------------------------------------

PIXEL = (10, 20, 30)  # RGB at row 1, column 2
MEAN, STD = (1.0, 2.0, 3.0), (3.0, 2.0, 1.0)


def write_png(path: Path, size: tuple[int, int] = (4, 3), mode: str = "RGB") -> None:
    """A W x H image, black but for ``PIXEL`` at row 1, column 2 (skips the test without Pillow)."""
    Image = pytest.importorskip("PIL.Image")
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[1, 2] = PIXEL
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    write_png(folder / "b.png")
    write_png(folder / "a.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()  # a folder with an image suffix is skipped
    return folder


def test_images_nchw_rgb(image_folder: Path) -> None:
    feeds = load_image_feeds(image_folder, ImageSpec(3, 4, mean=MEAN, std=STD), "input")
    assert len(feeds) == 2
    x = feeds[0]["input"]
    assert x.shape == (1, 3, 3, 4) and x.dtype == np.float32
    # value = (pixel - mean) / std per channel: R (10-1)/3, G (20-2)/2, B (30-3)/1
    np.testing.assert_allclose(x[0, :, 1, 2], [3.0, 9.0, 27.0])
    # A black pixel: -mean / std
    np.testing.assert_allclose(x[0, :, 0, 0], [-1 / 3, -1.0, -3.0])


def test_images_nhwc_bgr(image_folder: Path) -> None:
    feeds = load_image_feeds(image_folder, ImageSpec(3, 4, layout="NHWC", channels="BGR", mean=MEAN, std=STD), "input")
    x = feeds[0]["input"]
    assert x.shape == (1, 3, 4, 3)
    # Channel 0 is blue: (30-1)/3, then green (20-2)/2, then red (10-3)/1.
    np.testing.assert_allclose(x[0, 1, 2, :], [29 / 3, 9.0, 7.0], rtol=1e-6)


def test_images_scale_then_normalize(image_folder: Path) -> None:
    spec_ = ImageSpec(3, 4, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), scale=1 / 255)
    x = load_image_feeds(image_folder, spec_, "input")[0]["input"]
    expected = [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225]
    np.testing.assert_allclose(x[0, :, 1, 2], expected, rtol=1e-5)


def test_images_resized_to_spec_and_sorted_with_limit(tmp_path: Path) -> None:
    write_png(tmp_path / "2.png", size=(16, 12))
    write_png(tmp_path / "1.png", size=(4, 3))
    write_png(tmp_path / "3.png", size=(5, 9), mode="L")  # grayscale becomes three equal channels
    feeds = load_image_feeds(tmp_path, ImageSpec(6, 8), "img")
    assert [f["img"].shape for f in feeds] == [(1, 3, 6, 8)] * 3
    gray = feeds[2]["img"][0]
    np.testing.assert_array_equal(gray[0], gray[1])
    np.testing.assert_array_equal(gray[1], gray[2])
    # Sorted by name: the 4x3 source (only upscaled) is first; limit keeps the first ones.
    limited = load_image_feeds(tmp_path, ImageSpec(6, 8), "img", limit=1)
    assert len(limited) == 1
    np.testing.assert_array_equal(limited[0]["img"], feeds[0]["img"])


def test_image_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a folder"):
        load_image_feeds(tmp_path / "missing", ImageSpec(3, 4), "input")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no image files"):
        load_image_feeds(tmp_path, ImageSpec(3, 4), "input")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(InputError, match="broken.png"):
        load_image_feeds(tmp_path, ImageSpec(3, 4), "input")


@pytest.mark.parametrize(("kwargs", "message"), [({"layout": "CHW"}, "layout"), ({"channels": "RGBA"}, "channel order")])
def test_image_spec_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        ImageSpec(3, 4, **kwargs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("224x224", ImageSpec(224, 224)),
        ("3X4, nhwc, bgr", ImageSpec(3, 4, layout="NHWC", channels="BGR")),
        ("224x224,NHWC,BGR,mean=104/117/123", ImageSpec(224, 224, "NHWC", "BGR", mean=(104.0, 117.0, 123.0))),
        ("8x8,std=2,scale=0.5", ImageSpec(8, 8, std=(2.0, 2.0, 2.0), scale=0.5)),
    ],
)
def test_image_spec_parse(text: str, expected: ImageSpec) -> None:
    assert ImageSpec.parse(text) == expected


@pytest.mark.parametrize("text", ["", "224", "axb", "3x4,CHW", "3x4,mean=1/2", "3x4,std=a/b/c", "3x4,scale=", "3x4,gamma=2"])
def test_image_spec_parse_errors(text: str) -> None:
    with pytest.raises(InputError, match="--image-spec"):
        ImageSpec.parse(text)


def test_feedset_from_images(tmp_path: Path) -> None:
    for k in range(4):
        write_png(tmp_path / f"{k}.png")
    specs = [spec("input", np.float32, (1, 3, 3, 4))]
    fs = FeedSet.from_images(tmp_path, ImageSpec(3, 4), specs)
    assert fs.sizes() == {"calibration": 2, "validation": 1, "test": 1}
    assert str(tmp_path) in fs.source
    with pytest.raises(InputError, match="shape"):
        FeedSet.from_images(tmp_path, ImageSpec(3, 4, layout="NHWC"), specs)
    with pytest.raises(InputError, match="single-input"):
        FeedSet.from_images(tmp_path, ImageSpec(3, 4), specs + [spec("other", np.float32, (1,))])


def test_huge_declared_inputs_are_refused_before_allocating() -> None:
    huge = [InputSpec("x", np.dtype(np.float32), (1, 3, 100_000, 100_000))]  # 112 GiB per feed
    with pytest.raises(InputError, match=r"random feeds would take .* GiB .*'x' of shape 1x3x100000x100000.*--input-shape"):
        random_feeds(huge, 8)
    assert len(random_feeds([InputSpec("x", np.dtype(np.float32), (1, 3, 64, 64))], 8, max_bytes=8 * 3 * 64 * 64 * 4)) == 8
    with pytest.raises(InputError):
        random_feeds([InputSpec("x", np.dtype(np.float32), (1, 3, 64, 64))], 8, max_bytes=8 * 3 * 64 * 64 * 4 - 1)
