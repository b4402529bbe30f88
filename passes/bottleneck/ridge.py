"""Closed-form ridge least squares for the bottleneck pass's refits (pure numpy).

A refit solves ``min_A,c |P A^T + c - Z|^2 + lam |A - A0|^2`` with ``P`` ``[n, d]`` the inputs of the new
factor, ``Z`` ``[n, r]`` its targets and ``A0`` a prior (the projected weights; default 0). With ``P``
centred (``Pc``): ``A^T = (Pc^T Pc + lam I)^-1 (Pc^T (Z - mean Z) + lam A0^T)``, ``c = mean Z - A mean P``;
the ridge is relative, ``lam = ridge * tr(Pc^T Pc) / d``, and the intercept is never penalized.

:class:`HeldOut` chooses ``ridge`` by the error on whole calibration feeds held out; :func:`ridge_fit_through_relu`
fits through a following ReLU by iteratively re-targeted least squares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from passes.bottleneck.lowrank import gram


class RidgeSolver:
    """Closed-form ridge regression ``z ~ p A^T + c`` for one input matrix and any number of targets.

    ``p`` ``[n, d]`` is centred once and ``(P^T P + lam I)^-1`` formed once, so re-fitting to new targets
    costs two matrix products. The ridge is relative, ``lam = ridge * tr(P^T P) / d``, and pulls ``A``
    towards a *prior* ``A0`` when one is given (``|P A^T - Z|^2 + lam |A - A0|^2``): with few samples per
    feature the fit then stays near the projected weights instead of shrinking to zero. The intercept
    ``c`` is never penalized.
    """

    def __init__(self, p: np.ndarray, ridge: float = 1e-4) -> None:
        p32 = np.asarray(p, np.float32)
        self.samples, self.features = p32.shape
        self.p_mean = p32.mean(axis=0, dtype=np.float64)
        self.pc = p32 - self.p_mean.astype(np.float32)
        g = gram(self.pc).astype(np.float64)
        self.lam = ridge * max(np.trace(g) / max(1, g.shape[0]), 1e-12)
        g[np.diag_indices_from(g)] += self.lam
        self.inverse = np.linalg.inv(g)

    def fit(self, z: np.ndarray, prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        z = np.asarray(z, np.float64)
        z_mean = z.mean(axis=0)
        rhs = (self.pc.T @ (z - z_mean).astype(np.float32)).astype(np.float64)
        if prior is not None:
            rhs += self.lam * prior.T
        a = (self.inverse @ rhs).T
        return a, z_mean - a @ self.p_mean

    def predict(self, a: np.ndarray, c: np.ndarray) -> np.ndarray:
        """``p A^T + c`` on the fitted samples."""
        return (self.pc @ a.T.astype(np.float32)).astype(np.float64) + (a @ self.p_mean + c)


@dataclass(frozen=True)
class _Fold:
    train: np.ndarray  # row masks
    test: np.ndarray
    pc: np.ndarray  # centred training rows
    ptest: np.ndarray  # held-out rows, centred by the training mean
    left: np.ndarray  # [n_train, k]: coefficients of a residual R are left^T R
    right: np.ndarray  # [n_test, k]: held-out predictions are right diag(1 / (e + lam)) left^T R
    e: np.ndarray  # [k] eigenvalues of the training Gram (squared singular values)
    scale: float  # sum(e) / d: what a relative ridge is relative to


class HeldOut:
    """Held-out error of ridge fits ``z ~ p A^T + c`` (pulled to a prior ``A0``), whole calibration feeds
    held out at a time, for choosing the ridge.

    ``groups`` gives each row's feed; fold ``f`` holds out the feeds with ``feed % folds == f`` (rows of one
    picture are correlated, so holding out single rows would reward over-fitting). Per fold, with the
    training rows ``P`` centred and ``R = Z - P A0^T`` the residual of the prior, the ridge solution is
    ``A^T = A0^T + (P^T P + lam I)^-1 P^T R``, ``lam = ridge * tr(P^T P) / d`` (relative, as in
    :class:`RidgeSolver`). One eigendecomposition per fold -- of ``P^T P = V E V^T``, or of ``P P^T = U E U^T``
    when there are fewer rows than features -- serves every target and every ridge:
    ``(P^T P + lam I)^-1 P^T = V (E + lam)^-1 (P V)^T = P^T U (E + lam)^-1 U^T``.
    """

    def __init__(self, p: np.ndarray, groups: np.ndarray, folds: int = 2) -> None:
        self.folds: list[_Fold] = []
        k = min(folds, len(np.unique(groups)))
        for f in range(k if k >= 2 else 0):
            test = (groups % k) == f
            if not test.any() or test.all():
                continue
            pt = np.asarray(p[~test], np.float32)
            mean = pt.mean(axis=0, dtype=np.float64).astype(np.float32)
            pc = pt - mean
            ptest = np.asarray(p[test], np.float32) - mean
            n, d = pc.shape
            # float32 throughout: the error only has to rank the ridges of the grid.
            if n >= d:
                e, v = np.linalg.eigh(gram(pc))
                left, right = pc @ v, ptest @ v
            else:
                e, left = np.linalg.eigh(pc @ pc.T)  # (syrk, as gram)
                right = (ptest @ np.ascontiguousarray(pc.T)) @ left
            e = np.maximum(e.astype(np.float64), 0.0)
            self.folds.append(_Fold(~test, test, pc, ptest, left, right, e, max(float(e.sum()) / d, 1e-30)))

    @property
    def usable(self) -> bool:
        return bool(self.folds)

    def errors(self, z: np.ndarray, grid: tuple[float, ...], prior: np.ndarray | None = None) -> dict[float, float]:
        """``{ridge: held-out squared error / held-out variance of z}`` (empty when nothing can be held out)."""
        z = np.asarray(z, np.float64)
        err = np.zeros(len(grid))
        total = 0.0
        for fold in self.folds:
            pc, ptest = fold.pc, fold.ptest
            zt = z[fold.train]
            z_mean = zt.mean(axis=0)
            resid = zt - z_mean
            base = np.broadcast_to(z_mean, (len(ptest), z.shape[1])).copy()
            if prior is not None:
                a0t = np.asarray(prior, np.float32).T
                resid = resid - (pc @ a0t).astype(np.float64)
                base += (ptest @ a0t).astype(np.float64)
            coef = np.ascontiguousarray(fold.left.T) @ resid.astype(np.float32)
            target = z[fold.test]
            total += float(((target - target.mean(axis=0)) ** 2).sum())
            miss = (target - base).astype(np.float32)
            for i, rel in enumerate(grid):
                shrink = (1.0 / (fold.e + rel * fold.scale)).astype(np.float32)
                err[i] += float(np.square(fold.right @ (coef * shrink[:, None]) - miss, dtype=np.float32).sum(dtype=np.float64))
        if total <= 0:
            return {}
        return {rel: float(e / total) for rel, e in zip(grid, err)}

    def best(self, z: np.ndarray, grid: tuple[float, ...], prior: np.ndarray | None = None, default: float = 1e-4) -> tuple[float, float | None]:
        """``(ridge, its relative held-out error)`` with the least held-out error (the larger ridge on a
        tie); ``(default, None)`` when nothing can be held out."""
        scores = self.errors(z, grid, prior) if grid else {}
        if not scores:
            return default, None
        rel = min(scores, key=lambda r: (scores[r], -r))
        return rel, scores[rel]


def ridge_fit(p: np.ndarray, z: np.ndarray, ridge: float = 1e-4, prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(A, c)`` minimising ``|p A^T + c - z|^2 + lam |A - A0|^2``, ``lam = ridge * tr(P^T P)/d`` (closed form).

    ``p`` ``[n, d]`` inputs, ``z`` ``[n, r]`` targets, ``prior`` ``A0`` (default 0); ``A`` is ``[r, d]``, ``c`` ``[r]``.
    """
    return RidgeSolver(p, ridge).fit(z, prior)


def ridge_fit_through_relu(
    p: np.ndarray | RidgeSolver,
    y: np.ndarray,
    basis: np.ndarray | None,
    mu: np.ndarray | None,
    ridge: float = 1e-4,
    iterations: int = 2,
    prior: np.ndarray | None = None,
    coords: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``relu(U (p A^T + c) + mu) ~ relu(y)`` (``U``/``mu`` absent: ``relu(p A^T + c) ~ relu(y)``).

    Where the original output ``y`` and the current prediction are both negative, the ReLU maps both to
    zero, so the target there is released to the prediction itself; the fit is repeated a few times
    (iteratively re-targeted least squares). Without a following ReLU, use :func:`ridge_fit` alone.
    ``p`` may be a ready :class:`RidgeSolver` (shared between ranks of one conv); ``coords`` reads
    coordinates in a non-orthonormal ``U`` (see :func:`factor_output`).
    """
    u = basis
    read = basis if coords is None else coords
    m = np.zeros(y.shape[1]) if mu is None else mu
    solver = p if isinstance(p, RidgeSolver) else RidgeSolver(p, ridge)

    def to_fit(t: np.ndarray) -> np.ndarray:
        return t - m if read is None else (t - m) @ read

    a, c = solver.fit(to_fit(y), prior)
    for _ in range(iterations):
        z = solver.predict(a, c)
        pred = (z if u is None else z @ u.T) + m
        target = np.where((y <= 0) & (pred <= 0), pred, y)
        a, c = solver.fit(to_fit(target), prior)
    if u is None and mu is not None:
        c = c + m
    return a, c
