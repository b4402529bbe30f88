"""Input feeds for validation and calibration.

Sources:

* seeded random feeds that respect each input's dtype and resolved shape -- floats ~ N(0, 1),
  integers uniform in [1, 8] (never all zero, small enough to be valid indices or sizes for most
  models), booleans fair coin flips;
* ``.npy`` (single-input models) and ``.npz`` files keyed by input name; an array with one more dim
  than the input holds several samples along its first axis;
* a folder of images plus an :class:`ImageSpec` (size, resize mode -- stretch, letterbox, center-crop or
  pad --, layout, channel order, mean/std or scale);
* a user's data-loader script (:func:`load_loader_feeds`) for any other preprocessing.

User data (files, images, a data loader) is split three ways without overlap: a held-out *test* split
(:func:`split_holdout`, ``holdout_fraction`` of the feeds, 1/4 by default; the search never sees it, see
:mod:`rewriter.holdout`), then calibration feeds (for data-aware passes) and judging (validation) feeds
(:func:`split_feeds`). Random feeds are not data: they have no test split, and the feeds of the two roles
come from different seeds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from rewriter.errors import InputError
from rewriter.shapes import Shape, graph_inputs

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: Shape


def input_specs(model: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> list[InputSpec]:
    """Name, dtype and resolved shape of every input (an input without a resolved shape is an :class:`InputError`)."""
    specs = []
    for vi in graph_inputs(model):
        if vi.name not in input_shapes:
            raise InputError(f"input {vi.name!r} has no resolved shape; pass --input-shape")
        elem = vi.type.tensor_type.elem_type
        specs.append(InputSpec(vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(elem)), tuple(input_shapes[vi.name])))
    return specs


def random_feed(specs: Sequence[InputSpec], rng: np.random.Generator) -> Feed:
    feed: Feed = {}
    for spec in specs:
        kind = spec.dtype.kind
        if kind == "f":
            feed[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
        elif kind in "iu":
            feed[spec.name] = rng.integers(1, 9, size=spec.shape).astype(spec.dtype)
        elif kind == "b":
            feed[spec.name] = rng.random(spec.shape) < 0.5
        else:
            raise InputError(f"input {spec.name!r} has dtype {spec.dtype}, for which no random feed can be made; pass --feeds")
    return feed


#: Most bytes of random feeds made for one run (all feeds together); beyond it, a declared input shape is
#: taken for a mistake rather than filling memory.
MAX_RANDOM_FEED_BYTES = 2 << 30


def random_feeds(specs: Sequence[InputSpec], count: int, seed: int = 0, max_bytes: int = MAX_RANDOM_FEED_BYTES) -> list[Feed]:
    """``count`` seeded random feeds (refused with an :class:`InputError` above ``max_bytes`` in all)."""
    per_feed = sum(int(np.prod(spec.shape, dtype=np.float64)) * spec.dtype.itemsize for spec in specs)
    if per_feed * count > max_bytes:
        big = max(specs, key=lambda spec: int(np.prod(spec.shape, dtype=np.float64)) * spec.dtype.itemsize)
        raise InputError(f"random feeds would take {per_feed * count / 2**30:.1f} GiB ({count} x input {big.name!r} "
                         f"of shape {'x'.join(map(str, big.shape))}); set a smaller --input-shape, fewer --num-feeds, or pass --feeds")
    rng = np.random.default_rng(seed)
    return [random_feed(specs, rng) for _ in range(count)]


def _samples(spec: InputSpec, array: np.ndarray, source: str) -> list[np.ndarray]:
    if array.ndim == len(spec.shape) + 1:
        items = list(array)
    elif array.ndim == len(spec.shape):
        items = [array]
    else:
        raise InputError(f"{source}: array for input {spec.name!r} has rank {array.ndim}, expected {len(spec.shape)} (or one more for several samples)")
    out = []
    for item in items:
        if tuple(item.shape) != spec.shape:
            raise InputError(f"{source}: input {spec.name!r} has shape {tuple(item.shape)}, the model is resolved to {spec.shape}")
        if item.dtype != spec.dtype:
            if item.dtype.kind != spec.dtype.kind and not (item.dtype.kind in "iu" and spec.dtype.kind in "iu"):
                raise InputError(f"{source}: input {spec.name!r} has dtype {item.dtype}, the model wants {spec.dtype}")
            item = item.astype(spec.dtype)
        out.append(np.ascontiguousarray(item))
    return out


def load_array_feeds(path: str | Path, specs: Sequence[InputSpec]) -> list[Feed]:
    """Feeds from one ``.npy`` or ``.npz`` file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such feeds file")
    try:
        data = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"{p}: not a .npy/.npz file ({exc})") from None
    if isinstance(data, np.ndarray):
        if len(specs) != 1:
            raise InputError(f"{p}: a .npy file can only feed a single-input model; use .npz keyed by input name")
        arrays = {specs[0].name: data}
    else:
        arrays = {k: data[k] for k in data.files}
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise InputError(f"{p}: no array for input(s) {missing} (arrays: {sorted(arrays)})")
    per_input = {s.name: _samples(s, arrays[s.name], str(p)) for s in specs}
    counts = {len(v) for v in per_input.values()}
    if len(counts) != 1:
        raise InputError(f"{p}: inputs hold different numbers of samples {sorted(counts)}")
    n = counts.pop()
    return [{name: per_input[name][i] for name in per_input} for i in range(n)]


#: How a picture is brought to the input's size (see :func:`fit_box`).
RESIZE_MODES = ("stretch", "letterbox", "crop", "pad")


def fit_box(mode: str, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int]]:
    """Where a ``src_hw`` picture goes in a ``dst_hw`` input: ``(resized_hw, offset_yx, crop_box)``.

    * ``stretch``: resized to ``dst_hw`` (aspect ratio not kept);
    * ``letterbox``: scaled by ``s = min(H/h, W/w)`` (the whole picture fits), centered, the rest filled;
    * ``crop``: scaled by ``s = max(H/h, W/w)`` (the picture covers the input), the center ``H x W`` kept;
    * ``pad``: scaled by ``min(1, H/h, W/w)`` (shrunk to fit, never enlarged), at the top left, the rest
      filled (text detectors pad their input to a multiple of 32 this way).

    ``crop_box`` is ``(top, left, bottom, right)`` of the resized picture that lands in the input.
    """
    (h, w), (dh, dw) = src_hw, dst_hw
    if mode == "stretch":
        return (dh, dw), (0, 0), (0, 0, dh, dw)
    if mode in ("letterbox", "pad"):
        s = min(dh / h, dw / w) if mode == "letterbox" else min(1.0, dh / h, dw / w)
        rh, rw = min(dh, max(1, round(h * s))), min(dw, max(1, round(w * s)))
        offset = ((dh - rh) // 2, (dw - rw) // 2) if mode == "letterbox" else (0, 0)
        return (rh, rw), offset, (0, 0, rh, rw)
    if mode == "crop":
        s = max(dh / h, dw / w)
        rh, rw = max(dh, round(h * s)), max(dw, round(w * s))
        top, left = (rh - dh) // 2, (rw - dw) // 2
        return (rh, rw), (0, 0), (top, left, top + dh, left + dw)
    raise InputError(f"image resize mode must be one of {', '.join(RESIZE_MODES)}, not {mode!r}")


@dataclass(frozen=True)
class ImageSpec:
    """How to turn an image file into a model input.

    The picture is brought to ``height x width`` by ``resize`` (:func:`fit_box`: ``stretch``, ``letterbox``,
    ``crop`` or ``pad``; uncovered pixels get ``fill``, 0-255 per channel), then
    ``value = (pixel * scale - mean) / std`` per channel, with pixels in [0, 255] in the stated
    ``channels`` order ("RGB" or "BGR"), laid out as ``NCHW`` or ``NHWC`` with batch 1.
    """

    height: int
    width: int
    layout: str = "NCHW"
    channels: str = "RGB"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1.0
    resize: str = "stretch"
    fill: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise InputError(f"image layout must be NCHW or NHWC, not {self.layout!r}")
        if self.channels not in ("RGB", "BGR"):
            raise InputError(f"image channel order must be RGB or BGR, not {self.channels!r}")
        if self.resize not in RESIZE_MODES:
            raise InputError(f"image resize mode must be one of {', '.join(RESIZE_MODES)}, not {self.resize!r}")
        if any(not 0.0 <= v <= 255.0 for v in self.fill):
            raise InputError(f"image fill must lie in [0, 255], not {self.fill}")

    def fit(self, image: Any) -> np.ndarray:
        """A PIL image -> ``height x width x 3`` uint8 RGB, by the spec's resize mode."""
        from PIL import Image

        (rh, rw), (oy, ox), (top, left, bottom, right) = fit_box(self.resize, (image.height, image.width), (self.height, self.width))
        resized = np.asarray(image.convert("RGB").resize((rw, rh), Image.BILINEAR))[top:bottom, left:right]
        out = np.empty((self.height, self.width, 3), np.uint8)
        out[...] = np.asarray(np.round(self.fill), np.uint8)
        out[oy : oy + resized.shape[0], ox : ox + resized.shape[1]] = resized
        return out

    @classmethod
    def parse(cls, text: str) -> ImageSpec:
        """``HxW[,NCHW|NHWC][,RGB|BGR][,mean=a/b/c][,std=a/b/c][,scale=s][,resize=MODE][,fill=v|r/g/b]``, e.g.
        ``224x224,NHWC,BGR,mean=104/117/123`` or ``192x192,resize=letterbox,fill=255``."""
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise InputError("--image-spec is empty")
        try:
            h, w = (int(v) for v in parts[0].lower().split("x"))
        except ValueError:
            raise InputError(f"--image-spec {text!r}: must start with HEIGHTxWIDTH, e.g. 224x224") from None
        kw: dict = {}
        for part in parts[1:]:
            key, eq, value = part.partition("=")
            try:
                if not eq and key.upper() in ("NCHW", "NHWC"):
                    kw["layout"] = key.upper()
                elif not eq and key.upper() in ("RGB", "BGR"):
                    kw["channels"] = key.upper()
                elif key == "resize":
                    kw["resize"] = value.strip().lower()
                elif key in ("mean", "std", "fill"):
                    vals = tuple(float(v) for v in value.split("/"))
                    kw[key] = vals * 3 if len(vals) == 1 else vals
                    if len(kw[key]) != 3:
                        raise ValueError
                elif key == "scale":
                    kw["scale"] = float(value)
                else:
                    raise ValueError
            except ValueError:
                raise InputError(f"--image-spec {text!r}: cannot read {part!r}") from None
        return cls(h, w, **kw)

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB (already resized) -> a float32 tensor of batch 1."""
        x = rgb.astype(np.float32)
        if self.channels == "BGR":
            x = x[..., ::-1]
        x = (x * self.scale - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x[None])


def load_image_feeds(folder: str | Path, spec: ImageSpec, input_name: str, limit: int | None = None) -> list[Feed]:
    """One feed per image file in ``folder`` (sorted by name), resized to the spec's size."""
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading image folders needs Pillow: pip install 'onnx-bottleneck[images]'") from None
    p = Path(folder)
    if not p.is_dir():
        raise InputError(f"{p}: not a folder of images")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise InputError(f"{p}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    feeds = []
    for f in files[:limit]:
        try:
            with Image.open(f) as im:
                rgb = spec.fit(im)
        except OSError as exc:
            raise InputError(f"{f}: cannot read image ({exc})") from None
        feeds.append({input_name: spec.preprocess(rgb)})
    return feeds


#: Most feeds taken from a data loader (it may yield forever).
MAX_LOADER_FEEDS = 4096


def load_loader_feeds(spec: str, specs: Sequence[InputSpec], limit: int = MAX_LOADER_FEEDS) -> list[Feed]:
    """Feeds from a user's data loader (``--data-loader-script``, after Polygraphy's): ``file.py`` (its
    ``load_data`` function) or ``file.py:function`` / ``module:function``, called with no arguments, yielding
    (or returning) dicts of input name -> array, as many as the run should use (at most ``limit`` are
    taken). Each array must fit the input's resolved shape (or hold several samples along one more leading
    axis) and dtype kind; every input must be fed."""
    from rewriter.validation.user_code import import_function

    fn = import_function(spec, "--data-loader-script", default="load_data")
    feeds: list[Feed] = []
    try:
        for i, item in enumerate(fn()):
            if len(feeds) >= limit:
                log.warning("--data-loader-script %s: took the first %d feeds", spec, limit)
                break
            if not isinstance(item, Mapping):
                raise InputError(f"--data-loader-script {spec!r}: item {i} is a {type(item).__name__}, not a dict of input name -> array")
            missing = [s.name for s in specs if s.name not in item]
            if missing:
                raise InputError(f"--data-loader-script {spec!r}: item {i} has no array for input(s) {missing}")
            per_input = {s.name: _samples(s, np.asarray(item[s.name]), f"--data-loader-script item {i}") for s in specs}
            counts = {len(v) for v in per_input.values()}
            if len(counts) != 1:
                raise InputError(f"--data-loader-script {spec!r}: item {i}'s inputs hold different numbers of samples {sorted(counts)}")
            feeds.extend({name: per_input[name][j] for name in per_input} for j in range(counts.pop()))
    except InputError:
        raise
    except Exception as exc:  # user code: any failure is a usage error
        raise InputError(f"--data-loader-script {spec!r} raised {type(exc).__name__}: {exc}") from None
    if not feeds:
        raise InputError(f"--data-loader-script {spec!r} yielded no feeds")
    return feeds[:limit]


#: The share of the user's feeds held out as the test split by default.
DEFAULT_HOLDOUT_FRACTION = 0.25
#: Fewest feeds a three-way split (calibration, validation, test) takes: one of each.
MIN_SPLIT_FEEDS = 3


def split_holdout(feeds: Sequence[Feed], fraction: float = DEFAULT_HOLDOUT_FRACTION, seed: int = 0,
                  what: str = "the data") -> tuple[list[Feed], list[Feed]]:
    """Disjoint (test, rest) sets by a seeded permutation: ``max(1, round(n * fraction))`` test feeds (at most
    ``n - 2``, leaving one calibration and one validation feed), in their original order; the rest keep
    theirs, so a ``fraction`` of 0 (no test split) leaves :func:`split_feeds` the very list it had before.
    Too few feeds for three splits is an :class:`InputError` naming the minimum."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"--holdout-fraction must be at least 0 and below 1, not {fraction:g}")
    if fraction == 0.0:
        return [], list(feeds)
    n = len(feeds)
    if n < MIN_SPLIT_FEEDS:
        raise InputError(f"{what} gives {n} feed(s); a calibration, validation and test split needs at least {MIN_SPLIT_FEEDS} "
                         "(give more, or --holdout-fraction 0 to hold none out)")
    n_test = min(n - 2, max(1, round(n * fraction)))
    held = set(int(i) for i in np.random.default_rng([seed, 0x7E57]).permutation(n)[:n_test])
    return [feeds[i] for i in range(n) if i in held], [feeds[i] for i in range(n) if i not in held]


def split_feeds(feeds: Sequence[Feed], calibration_fraction: float = 0.5, seed: int = 0) -> tuple[list[Feed], list[Feed]]:
    """Disjoint (calibration, validation) sets from one list, by a seeded permutation."""
    if not 0.0 < calibration_fraction < 1.0:
        raise InputError("calibration fraction must be strictly between 0 and 1")
    if len(feeds) < 2:
        raise InputError("need at least two feeds to split into calibration and validation sets")
    order = np.random.default_rng(seed).permutation(len(feeds))
    n_cal = min(len(feeds) - 1, max(1, round(len(feeds) * calibration_fraction)))
    return [feeds[i] for i in order[:n_cal]], [feeds[i] for i in order[n_cal:]]


@dataclass
class FeedSet:
    """Feeds for three roles. ``validation`` judges numerics; ``calibration`` is for data-aware passes;
    ``test`` is held out from the search and confirms its result (:mod:`rewriter.holdout`)."""

    validation: list[Feed]
    calibration: list[Feed]
    source: str
    #: Random feeds stand in for data: fine for proving exact rewrites, useless for fitting lossy ones.
    synthetic: bool = False
    #: The held-out test split: the search never runs it (empty: nothing held out).
    test: list[Feed] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        """How many feeds each split holds."""
        return {"calibration": len(self.calibration), "validation": len(self.validation), "test": len(self.test)}

    def rebatched(self, batch: int) -> FeedSet:
        """These feeds with the validation and test splits as feeds of ``batch`` rows (the same rows, in order;
        see :func:`~rewriter.validation.deployment.rebatched`); calibration feeds are rows to fit on and stay."""
        from rewriter.validation.deployment import rebatched

        validation, test = rebatched(self.validation, batch), rebatched(self.test, batch)
        if validation is self.validation and test is self.test:
            return self
        return replace(self, validation=list(validation), test=list(test))

    def for_search(self) -> FeedSet:
        """These feeds without the test split: all the search may see."""
        return replace(self, test=[]) if self.test else self

    @classmethod
    def _split(cls, feeds: Sequence[Feed], source: str, what: str, calibration_fraction: float, seed: int, holdout_fraction: float) -> FeedSet:
        test, rest = split_holdout(feeds, holdout_fraction, seed, what)
        cal, val = split_feeds(rest, calibration_fraction, seed)
        return cls(val, cal, source, test=test)

    @classmethod
    def random(cls, specs: Sequence[InputSpec], count: int = 8, calibration_count: int = 0, seed: int = 0) -> FeedSet:
        """``count`` seeded random validation feeds (and ``calibration_count`` calibration ones: none by default --
        random inputs are not data, so nothing calibrates on them; they would only hold memory)."""
        return cls(
            random_feeds(specs, count, seed=seed),
            random_feeds(specs, calibration_count, seed=seed + 1_000_003),
            f"random (seed {seed})",
            synthetic=True,
        )

    @classmethod
    def from_images(cls, folder: str | Path, spec: ImageSpec, specs: Sequence[InputSpec], calibration_fraction: float = 0.5, seed: int = 0,
                    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION) -> FeedSet:
        if len(specs) != 1:
            raise InputError("an image folder can only feed a single-input model")
        feeds = load_image_feeds(folder, spec, specs[0].name)
        want = specs[0].shape
        got = tuple(feeds[0][specs[0].name].shape)
        if got != want:
            raise InputError(f"--image-spec gives inputs of shape {got}, the model is resolved to {want}")
        return cls._split(feeds, f"images in {folder}", f"--images {folder}", calibration_fraction, seed, holdout_fraction)

    @classmethod
    def from_loader(cls, spec: str, specs: Sequence[InputSpec], calibration_fraction: float = 0.5, seed: int = 0,
                    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION) -> FeedSet:
        """Feeds from a data-loader script (:func:`load_loader_feeds`), split like files."""
        return cls._split(load_loader_feeds(spec, specs), f"data loader {spec}", f"--data-loader-script {spec}", calibration_fraction, seed,
                          holdout_fraction)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], specs: Sequence[InputSpec], calibration_fraction: float = 0.5, seed: int = 0,
                   holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION) -> FeedSet:
        feeds: list[Feed] = []
        for path in paths:
            feeds.extend(load_array_feeds(path, specs))
        source = ", ".join(str(p) for p in paths)
        return cls._split(feeds, source, f"--feeds {source}", calibration_fraction, seed, holdout_fraction)


def feedset_for(
    specs: Sequence[InputSpec],
    *,
    feeds: Sequence[str | Path] | None = None,
    images: str | Path | None = None,
    image_spec: str | None = None,
    data_loader: str | None = None,
    count: int = 8,
    seed: int = 0,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
) -> FeedSet:
    """The feeds a command judges on: an image folder, ``.npy``/``.npz`` files or a data-loader script
    (``holdout_fraction`` of them held out as the test split, the rest split into calibration and
    validation halves), else ``count`` seeded random validation feeds (no calibration or test split: random
    feeds are not data)."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise InputError(f"--holdout-fraction must be at least 0 and below 1, not {holdout_fraction:g}")
    given = [flag for flag, value in (("--feeds", feeds), ("--images", images), ("--data-loader-script", data_loader)) if value]
    if len(given) > 1:
        raise InputError(f"give one of --feeds, --images and --data-loader-script, not {' and '.join(given)}")
    if data_loader is not None:
        if image_spec is not None:
            raise InputError("--image-spec needs --images DIR")
        return FeedSet.from_loader(data_loader, specs, seed=seed, holdout_fraction=holdout_fraction)
    if images is not None:
        if image_spec is None:
            raise InputError("--images needs --image-spec, e.g. 224x224,NCHW,RGB,scale=0.00392")
        return FeedSet.from_images(images, ImageSpec.parse(image_spec), specs, seed=seed, holdout_fraction=holdout_fraction)
    if image_spec is not None:
        raise InputError("--image-spec needs --images DIR")
    if feeds:
        return FeedSet.from_files(feeds, specs, seed=seed, holdout_fraction=holdout_fraction)
    return FeedSet.random(specs, count=count, seed=seed)
