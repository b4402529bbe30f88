"""The digits CNN's task, as ``optimize`` takes it: its real images as data and its top-1 as the metric.

``make demo`` runs the bottleneck pass on the trained digits CNN (``models/digits/digits_cnn.onnx``) with::

    onnx-bottleneck optimize models/digits/digits_cnn.onnx -o build/digits.opt.onnx \\
        --passes bottleneck --max-error "cosine>=0.999" --input-shape input:8x1x32x32 \\
        --data-loader-script examples/digits_task.py:load_data \\
        --metric examples/digits_task.py:top1 --max-metric-drop 0.01 --html build/digits.report.html

The data are scikit-learn's bundled 8x8 digits (no download), upscaled as ``models/digits.py`` trained on
them. Three disjoint sets of images, none of them seen twice:

- ``load_data`` yields ``N_FEEDS`` batches of *training* images: the tool splits them into calibration
  (what the factorizations are fitted on), validation (numerics) and a held-out test split
  (``--holdout-fraction``).
- ``top1(session, split="validation")`` scores the first half of the model's *held-out* test digits: the
  search gates each rewrite on it (``--max-metric-drop``).
- ``top1(session, split="test")`` scores the other half, which the search never saw: the held-out
  confirmation after the search (``rewriter.holdout``) checks the result on it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for models.digits

from models.digits import load_split  # noqa: E402

#: Images per feed (the demo fixes the model's batch dim to this with --input-shape input:8x1x32x32).
BATCH = 8
#: Feeds of training images handed to the tool (calibration, validation and its held-out test split).
N_FEEDS = 16


@functools.lru_cache(maxsize=1)
def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return load_split()


def load_data() -> Iterator[dict[str, np.ndarray]]:
    """``N_FEEDS`` batches of ``BATCH`` training digits, ``{"input": [8, 1, 32, 32] float32}`` each."""
    x_train = _data()[0]
    for i in range(N_FEEDS):
        yield {"input": x_train[i * BATCH:(i + 1) * BATCH]}


def _held_out(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The half of the held-out test digits a split scores: ``validation`` the first, ``test`` the second."""
    _, _, x_test, y_test = _data()
    half = len(y_test) // 2
    return (x_test[:half], y_test[:half]) if split == "validation" else (x_test[half:], y_test[half:])


def top1(session: Any, split: str = "validation") -> float:
    """Top-1 accuracy of an onnxruntime session on the held-out digits of ``split`` (higher is better)."""
    x, y = _held_out(split)
    inp = session.get_inputs()[0]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) else len(x)
    logits = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        logits.append(session.run(None, {inp.name: padded})[0][:len(chunk)])
    return float(np.mean(np.concatenate(logits).argmax(axis=1) == y))
