"""Speedup estimate with a bootstrap confidence interval, from paired (interleaved) timings.

``speedup = median(t_base) / median(t_candidate)`` (> 1 means the candidate is faster). The 95% interval
is the percentile bootstrap over *pairs*: each resample draws pair indices with replacement and
recomputes the ratio of medians, so drift that hits both sides of a pair cancels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RatioCI:
    speedup: float
    low: float
    high: float
    pairs: int
    confidence: float = 0.95

    def faster(self, threshold: float = 1.0) -> bool:
        """The whole interval lies above ``threshold``: a speedup shown with the stated confidence."""
        return self.low > threshold

    def slower(self, threshold: float = 1.0) -> bool:
        """The whole interval lies below ``threshold``: a slowdown shown with the stated confidence."""
        return self.high < threshold

    def __str__(self) -> str:
        return f"{self.speedup:.3f}x [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_speedup(
    base: Sequence[float],
    candidate: Sequence[float],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> RatioCI:
    """Ratio of medians base/candidate with a paired percentile-bootstrap interval."""
    b = np.asarray(base, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    if b.shape != c.shape or b.ndim != 1 or b.size < 2:
        raise ValueError("need two equally long sequences of at least two paired timings")
    if np.any(b <= 0) or np.any(c <= 0):
        raise ValueError("timings must be positive")
    point = float(np.median(b) / np.median(c))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, b.size, size=(resamples, b.size))
    ratios = np.median(b[idx], axis=1) / np.median(c[idx], axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha])
    return RatioCI(point, float(low), float(high), int(b.size), confidence)
