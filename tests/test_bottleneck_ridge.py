"""bottleneck ridge solvers alone (passes/bottleneck/ridge.py): closed-form fits, the prior's pull, fits
through a ReLU, and the held-out choice of the ridge."""

from __future__ import annotations

import numpy as np
import pytest

from passes.bottleneck import HeldOut, RidgeSolver, ridge_fit, ridge_fit_through_relu

RNG = np.random.default_rng(0)


def test_ridge_fit_recovers_a_linear_map_and_relu_fit_ignores_dead_zone() -> None:
    p = RNG.standard_normal((2000, 5))
    a_true, c_true = RNG.standard_normal((3, 5)), RNG.standard_normal(3)
    a, c = ridge_fit(p, p @ a_true.T + c_true, ridge=1e-9)
    np.testing.assert_allclose(a, a_true, atol=1e-6)
    np.testing.assert_allclose(c, c_true, atol=1e-6)
    # Through a ReLU: targets below zero may be matched by anything below zero.
    y = p @ a_true.T + c_true
    a2, c2 = ridge_fit_through_relu(p, y, None, None, ridge=1e-9)
    pred = p @ a2.T + c2
    np.testing.assert_allclose(np.maximum(pred, 0), np.maximum(y, 0), atol=1e-5)


def test_ridge_prior_pulls_towards_the_projected_weights_when_data_are_scarce() -> None:
    p = RNG.standard_normal((12, 40))  # fewer samples than features: the data alone cannot fix A
    a_prior = RNG.standard_normal((3, 40))
    z = p @ a_prior.T + 0.01 * RNG.standard_normal((12, 3))
    solver = RidgeSolver(p, ridge=1.0)
    a_zero, _ = solver.fit(z)
    a_near, _ = solver.fit(z, a_prior)
    assert np.linalg.norm(a_near - a_prior) < 0.2 * np.linalg.norm(a_zero - a_prior)
    # Plenty of data: the prior hardly matters and the map is recovered either way.
    p = RNG.standard_normal((4000, 6))
    a_true = RNG.standard_normal((2, 6))
    solver = RidgeSolver(p, ridge=1e-6)
    for prior in (None, np.zeros((2, 6)), 5 * a_true):
        a, c = solver.fit(p @ a_true.T + 1.5, prior)
        np.testing.assert_allclose(a, a_true, atol=1e-4)
        np.testing.assert_allclose(c, 1.5, atol=1e-4)
        np.testing.assert_allclose(solver.predict(a, c), p @ a.T + c, atol=1e-4)


@pytest.mark.parametrize("features", [15, 200])  # more / fewer training rows (120 per fold) than features
def test_held_out_error_matches_a_ridge_fit_on_the_other_feeds(features: int) -> None:
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(6), 40)
    p = rng.standard_normal((240, features)).astype(np.float32)
    z = p @ rng.standard_normal((features, 4)) + 0.3 * rng.standard_normal((240, 4))
    prior = rng.standard_normal((4, features))
    held = HeldOut(p, groups, folds=2)
    errors = held.errors(z, (1e-3, 0.5), prior)
    for ridge in (1e-3, 0.5):  # the SVD shortcut equals fitting on even feeds, predicting odd ones (and back)
        num = den = 0.0
        for f in (0, 1):
            test = groups % 2 == f
            a, c = RidgeSolver(p[~test], ridge).fit(z[~test], prior)
            num += float(((p[test] @ a.T + c - z[test]) ** 2).sum())
            den += float(((z[test] - z[test].mean(axis=0)) ** 2).sum())
        assert errors[ridge] == pytest.approx(num / den, rel=1e-3)


def test_held_out_ridge_is_small_with_plenty_of_data_and_large_when_data_are_scarce() -> None:
    rng = np.random.default_rng(4)
    grid = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 3.0)
    # Plenty of samples per weight and a clean linear target: no pull towards the (wrong) prior.
    groups = np.repeat(np.arange(8), 500)
    p = rng.standard_normal((4000, 6))
    a_true = rng.standard_normal((3, 6))
    ridge, err = HeldOut(p, groups).best(p @ a_true.T, grid, prior=np.zeros((3, 6)))
    assert ridge == 1e-4 and err is not None and err < 1e-6
    # Fewer samples than weights, truth near the prior: a strong pull predicts unseen feeds far better.
    groups = np.repeat(np.arange(8), 10)
    p = rng.standard_normal((80, 200))
    prior = rng.standard_normal((3, 200))
    z = p @ (prior + 0.05 * rng.standard_normal((3, 200))).T + rng.standard_normal((80, 3))
    held = HeldOut(p, groups)
    ridge, err = held.best(z, grid, prior)
    scores = held.errors(z, grid, prior)
    assert ridge >= 0.1 and err == min(scores.values()) < scores[1e-4]
    # One feed: nothing to hold out, the default comes back.
    assert HeldOut(p, np.zeros(80, dtype=int)).best(z, grid, prior, default=7.0) == (7.0, None)


def test_relu_fit_through_a_basis_matches_where_the_relu_passes() -> None:
    """``relu(U (p A^T + c) + mu) ~ relu(y)`` for ``y`` that such a map produces exactly: recovered where y > 0."""
    rng = np.random.default_rng(6)
    p = rng.standard_normal((3000, 5))
    u = np.linalg.qr(rng.standard_normal((8, 3)))[0]  # orthonormal [O, r]
    mu = rng.standard_normal(8)
    z = p @ rng.standard_normal((3, 5)).T + rng.standard_normal(3)
    y = z @ u.T + mu
    a, c = ridge_fit_through_relu(p, y, u, mu, ridge=1e-9)
    pred = (p @ a.T + c) @ u.T + mu
    np.testing.assert_allclose(np.maximum(pred, 0), np.maximum(y, 0), atol=1e-5)
    # A ready solver gives the same fit as the raw inputs.
    a2, c2 = ridge_fit_through_relu(RidgeSolver(p, 1e-9), y, u, mu, ridge=1e-9)
    np.testing.assert_allclose(a2, a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(c2, c, rtol=1e-9, atol=1e-12)


def test_held_out_needs_two_feeds() -> None:
    p = RNG.standard_normal((40, 3))
    assert not HeldOut(p, np.zeros(40, dtype=int)).usable
    assert HeldOut(p, np.repeat(np.arange(2), 20)).usable
