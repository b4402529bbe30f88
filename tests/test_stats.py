"""bootstrap_speedup on synthetic paired timings: detection power, false-positive rate, the point estimate.

The timings are seeded, so every rate asserted below is deterministic; the thresholds leave room so that
a change of numpy's generator streams would not flip them. Measured when written (numpy 2.4):
20% slowdown detected in 100/100 trials at both noise levels, identical distributions called different in
6/200 (3%); with shared per-pair drift, 100/100 detected and 0/100 called different.
"""

from __future__ import annotations

import numpy as np
import pytest

from rewriter.validation.stats import RatioCI, bootstrap_speedup

PAIRS = 30


def timings(rng: np.random.Generator, ratio: float, sigma: float, drift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``PAIRS`` paired timings around 1 ms: the candidate takes ``ratio`` times as long as the base, each
    sample with independent lognormal noise ``sigma``, and each pair with a shared lognormal factor
    ``drift`` (machine load that hits both samples of a pair)."""
    shared = np.exp(rng.normal(0.0, drift, PAIRS)) if drift else np.ones(PAIRS)
    base = 1e-3 * shared * np.exp(rng.normal(0.0, sigma, PAIRS))
    cand = 1e-3 * ratio * shared * np.exp(rng.normal(0.0, sigma, PAIRS))
    return base, cand


@pytest.mark.parametrize("sigma", [0.05, 0.1])
def test_twenty_percent_slowdown_is_detected(sigma: float) -> None:
    trials = 100
    detected = 0
    for t in range(trials):
        base, cand = timings(np.random.default_rng(t), 1.2, sigma)
        ci = bootstrap_speedup(base, cand, seed=t)
        detected += ci.slower()
        assert not ci.faster()
    assert detected >= 0.95 * trials, f"slowdown detected in only {detected}/{trials} trials"


def test_identical_distributions_rarely_called_different() -> None:
    trials = 200
    called = 0
    for t in range(trials):
        base, cand = timings(np.random.default_rng(10_000 + t), 1.0, 0.1)
        ci = bootstrap_speedup(base, cand, seed=t)
        called += ci.faster() or ci.slower()
    # Nominal 5% for a 95% interval; allow ~8% for the small-sample bootstrap of a median.
    assert called <= 0.08 * trials, f"identical timings called different in {called}/{trials} trials"


def test_pairing_cancels_shared_drift() -> None:
    """Drift six times the per-sample noise hits both sides of a pair: a 20% slowdown is still found and
    identical timings are still not called different."""
    trials = 100
    detected = called = 0
    for t in range(trials):
        rng = np.random.default_rng(20_000 + t)
        base, cand = timings(rng, 1.2, 0.05, drift=0.3)
        detected += bootstrap_speedup(base, cand, seed=t).slower()
        base, same = timings(rng, 1.0, 0.05, drift=0.3)
        ci = bootstrap_speedup(base, same, seed=t)
        called += ci.faster() or ci.slower()
    assert detected >= 0.95 * trials
    assert called <= 0.08 * trials


def test_speedup_of_one_and_a_half_is_faster() -> None:
    for t in range(20):
        base, cand = timings(np.random.default_rng(t), 1 / 1.5, 0.1)
        ci = bootstrap_speedup(base, cand, seed=t)
        assert ci.faster()
        assert ci.faster(1.2)  # shown above a threshold well below 1.5
        assert not ci.slower()
        assert ci.speedup == pytest.approx(1.5, rel=0.1)


def test_point_estimate_is_the_ratio_of_medians() -> None:
    base = [3.0, 1.0, 2.0, 10.0, 4.0]  # median 3
    cand = [1.0, 1.5, 2.0, 0.5, 9.0]  # median 1.5
    ci = bootstrap_speedup(base, cand)
    assert ci.speedup == 2.0
    assert ci.pairs == 5
    assert ci.low <= ci.speedup <= ci.high
    base2, cand2 = timings(np.random.default_rng(7), 1.1, 0.1)
    assert bootstrap_speedup(base2, cand2).speedup == pytest.approx(np.median(base2) / np.median(cand2), rel=1e-12)


def test_interval_contains_point_and_narrows_with_lower_noise() -> None:
    wide = bootstrap_speedup(*timings(np.random.default_rng(1), 1.0, 0.2))
    narrow = bootstrap_speedup(*timings(np.random.default_rng(1), 1.0, 0.02))
    for ci in (wide, narrow):
        assert ci.low <= ci.speedup <= ci.high
    assert (narrow.high - narrow.low) < (wide.high - wide.low) / 3


def test_deterministic_by_seed() -> None:
    base, cand = timings(np.random.default_rng(3), 1.0, 0.1)
    assert bootstrap_speedup(base, cand, seed=5) == bootstrap_speedup(base, cand, seed=5)
    a, b = bootstrap_speedup(base, cand, seed=5), bootstrap_speedup(base, cand, seed=6)
    assert a.speedup == b.speedup
    assert (a.low, a.high) != (b.low, b.high)


def test_confidence_level_widens_interval() -> None:
    base, cand = timings(np.random.default_rng(4), 1.0, 0.1)
    ci90 = bootstrap_speedup(base, cand, confidence=0.90)
    ci99 = bootstrap_speedup(base, cand, confidence=0.99)
    assert ci99.low < ci90.low and ci99.high > ci90.high
    assert ci90.confidence == 0.90


def test_constant_timings_give_a_degenerate_interval() -> None:
    ci = bootstrap_speedup([2.0] * 10, [1.0] * 10)
    assert (ci.speedup, ci.low, ci.high) == (2.0, 2.0, 2.0)
    assert ci.faster() and ci.faster(1.99) and not ci.faster(2.0)


def test_ratio_ci_decisions_and_str() -> None:
    ci = RatioCI(1.3, 1.1, 1.5, 30)
    assert ci.faster() and ci.faster(1.05) and not ci.faster(1.2)
    assert not ci.slower() and ci.slower(1.6)
    assert str(ci) == "1.300x [1.100, 1.500]"
    straddles = RatioCI(1.0, 0.9, 1.1, 30)
    assert not straddles.faster() and not straddles.slower()


@pytest.mark.parametrize(
    ("base", "cand", "message"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], "equally long"),
        ([1.0], [1.0], "at least two"),
        ([], [], "at least two"),
        ([[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]], "equally long"),
        ([1.0, 0.0], [1.0, 2.0], "positive"),
        ([1.0, 2.0], [1.0, -2.0], "positive"),
    ],
)
def test_input_validation(base: list, cand: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_speedup(base, cand)
