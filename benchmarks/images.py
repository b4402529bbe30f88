"""Natural-image feeds for benchmarks: random crops and resizes of scikit-image's bundled photographs.

scikit-image ships twelve photographs inside its wheel (no download). They are split **by source image**
into a calibration set and a validation set, so no photograph contributes to both: a lossy rewrite fitted
on calibration crops is judged on crops of other pictures.

* calibration: astronaut, coffee, hubble_deep_field, retina, page, gravel
* validation:  chelsea, rocket, immunohistochemistry, camera, grass, brick

Each set mixes colour and grey pictures, people/objects, micrographs and textures (grey ones are
replicated to three channels). A crop keeps the model's aspect ratio, covers 35-100% of the largest such
box, is flipped left-right with probability 1/2 and is resized with anti-aliasing to the model's input
size; a :class:`rewriter.validation.feeds.ImageSpec` then applies the model's own preprocessing (layout,
channel order, mean/std). Everything is seeded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rewriter.validation.feeds import Feed, FeedSet, ImageSpec

CALIBRATION_PHOTOS = ("astronaut", "coffee", "hubble_deep_field", "retina", "page", "gravel")
VALIDATION_PHOTOS = ("chelsea", "rocket", "immunohistochemistry", "camera", "grass", "brick")

#: ImageNet statistics on [0, 1] pixels (torchvision, PaddleOCR).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_spec(height: int, width: int) -> ImageSpec:
    """NCHW RGB, ``(x / 255 - mean) / std`` with ImageNet's mean and std."""
    return ImageSpec(height, width, "NCHW", "RGB", IMAGENET_MEAN, IMAGENET_STD, 1.0 / 255.0)


def photo(name: str) -> np.ndarray:
    """One of scikit-image's photographs as HxWx3 uint8 RGB."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def random_crop(image: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A crop with the aspect ratio ``width/height`` (35-100% of the largest such box), maybe mirrored,
    resized to ``height x width``; HxWx3 uint8."""
    from skimage.transform import resize

    h, w = image.shape[:2]
    aspect = width / height
    box_h = min(h, w / aspect)
    scale = rng.uniform(0.35, 1.0)
    ch = max(1, int(round(box_h * scale)))
    cw = max(1, min(w, int(round(ch * aspect))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    crop = image[top:top + ch, left:left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    out = resize(crop, (height, width), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def crops(photos: Sequence[str], count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` crops, taken round-robin over ``photos``."""
    rng = np.random.default_rng(seed)
    images = [photo(p) for p in photos]
    return [random_crop(images[i % len(images)], height, width, rng) for i in range(count)]


def image_feeds(spec: ImageSpec, input_name: str, *, calibration: int = 16, validation: int = 8, seed: int = 0) -> FeedSet:
    """Calibration and validation feeds for a single-image-input model, from disjoint photographs."""

    def feeds(photos: Sequence[str], count: int, salt: int) -> list[Feed]:
        return [{input_name: spec.preprocess(rgb)} for rgb in crops(photos, count, spec.height, spec.width, seed + salt)]

    return FeedSet(
        validation=feeds(VALIDATION_PHOTOS, validation, 0),
        calibration=feeds(CALIBRATION_PHOTOS, calibration, 1),
        source=(f"scikit-image photos, seed {seed}: {calibration} calibration crops of {', '.join(CALIBRATION_PHOTOS)}; "
                f"{validation} validation crops of {', '.join(VALIDATION_PHOTOS)}"),
    )
