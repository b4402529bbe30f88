"""The weight math of ``merge_parallel_branches`` (pure numpy): parallel conv kernels on one input
merged into one kernel.

Per spatial axis, branch ``i`` (kernel ``k``, pads ``p_b, p_e``) reads, for output ``y`` and tap ``u``,
the input row ``s*y - p_b + u``. In a merged kernel of size ``K`` with begin pad ``P_b`` that row is tap
``u + d`` with ``d = P_b - p_b``, so the branch kernel is zero-padded into ``K`` at offset ``d``::

    summed branches:        W = sum_i pad(W_i, K, d_i)     b = sum_i b_i        (a missing bias is 0)
    concatenated branches:  W = concat_o(W_i)              b = concat(b_i)      (a missing bias is zeros)

valid when ``0 <= d <= K - k`` on every axis and every branch has the same output size for every input
size, ``p_b + p_e - k = P_b + P_e - K`` (:func:`align_branches`). The identity of ``C`` channels in a conv
with ``group`` groups is the kernel ``I[o, o mod (C/group), d] = 1`` (:func:`identity_kernel`), scaled per
channel for a BatchNormalization of the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

def pad_kernel_to(w: np.ndarray, kernel_shape: Sequence[int], offsets: Sequence[int] | None = None) -> np.ndarray:
    """``w`` ``[O, I, k...]`` zero-padded to ``[O, I, K...]`` with its taps starting at ``offsets``.

    ``offsets`` default to the centre, ``(K - k) // 2`` per axis. A new array; ``w`` is not modified.
    """
    kernel = tuple(int(k) for k in w.shape[2:])
    target = tuple(int(k) for k in kernel_shape)
    if len(target) != len(kernel):
        raise ValueError(f"kernel {kernel} and target {target} have different ranks")
    offs = tuple((big - small) // 2 for big, small in zip(target, kernel)) if offsets is None else tuple(offsets)
    if len(offs) != len(kernel) or any(o < 0 or o + k > big for o, k, big in zip(offs, kernel, target)):
        raise ValueError(f"kernel {kernel} at offsets {offs} does not fit in {target}")
    out = np.zeros(tuple(w.shape[:2]) + target, dtype=w.dtype)
    out[(slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(offs, kernel))] = w
    return out


def identity_kernel(
    channels: int,
    group: int,
    kernel_shape: Sequence[int],
    offsets: Sequence[int] | None = None,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """The ``[C, C/group, K...]`` kernel of ``y = X`` (or ``y[o] = scale[o] * X[o]``), float64.

    ``I[o, o mod (C/group), d] = 1`` with ``d`` the offsets (default: the centre).
    """
    if group < 1 or channels % group:
        raise ValueError(f"{channels} channels do not split into {group} groups")
    per_group = channels // group
    ndim = len(kernel_shape)
    w = np.zeros((channels, per_group) + (1,) * ndim, dtype=np.float64)
    o = np.arange(channels)
    w[(o, o % per_group) + (0,) * ndim] = 1.0 if scale is None else np.asarray(scale, dtype=np.float64).reshape(channels)
    return pad_kernel_to(w, kernel_shape, offsets)


def merge_branches(
    branches: Sequence[tuple[np.ndarray, np.ndarray | None]],
    kernel_shape: Sequence[int],
    offsets: Sequence[Sequence[int] | None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(sum_i pad(W_i, K, d_i), sum_i b_i)`` in float64; the bias is ``None`` when no branch has one."""
    if not branches:
        raise ValueError("no branches to merge")
    offs = list(offsets) if offsets is not None else [None] * len(branches)
    if len(offs) != len(branches):
        raise ValueError("one offset per branch")
    shapes = {tuple(w.shape[:2]) for w, _ in branches}
    if len(shapes) != 1:
        raise ValueError(f"branches disagree on [C_out, C_in/group]: {sorted(shapes)}")
    w = sum(pad_kernel_to(wi.astype(np.float64), kernel_shape, off) for (wi, _), off in zip(branches, offs))
    biases = [bi.astype(np.float64).reshape(-1) for _, bi in branches if bi is not None]
    b = sum(biases[1:], biases[0].copy()) if biases else None
    return np.asarray(w), b


def concat_branches(
    branches: Sequence[tuple[np.ndarray, np.ndarray | None]],
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(concat_o W_i, concat b_i)`` in float64; a missing bias is zeros, ``None`` when no branch has one."""
    if not branches:
        raise ValueError("no branches to concatenate")
    w = np.concatenate([wi.astype(np.float64) for wi, _ in branches], axis=0)
    if all(bi is None for _, bi in branches):
        return w, None
    b = np.concatenate(
        [np.zeros(wi.shape[0]) if bi is None else bi.astype(np.float64).reshape(-1) for wi, bi in branches]
    )
    return w, b


def align_branches(
    kernels: Sequence[Sequence[int]], pads: Sequence[Sequence[int]]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """The merged kernel, its pads (ONNX order: begins then ends) and each branch's offset in it.

    Raises ``ValueError`` (with the reason) when a branch's taps do not line up with the merged kernel.
    """
    n = len(kernels[0])
    if any(len(k) != n for k in kernels) or any(len(p) != 2 * n for p in pads):
        raise ValueError("branches have different spatial ranks")
    big = tuple(max(int(k[a]) for k in kernels) for a in range(n))
    begin, end = [], []
    for a in range(n):
        ref = next(i for i, k in enumerate(kernels) if k[a] == big[a])
        begin.append(int(pads[ref][a]))
        end.append(int(pads[ref][n + a]))
    offsets = []
    for i, (k, p) in enumerate(zip(kernels, pads)):
        off = []
        for a in range(n):
            if p[a] + p[n + a] - k[a] != begin[a] + end[a] - big[a]:
                raise ValueError(
                    f"branch {i} (kernel {tuple(k)}, pads {list(p)}) has another output size than the "
                    f"{big} kernel with pads {begin + end} along spatial axis {a}"
                )
            d = begin[a] - int(p[a])
            if not 0 <= d <= big[a] - k[a]:
                raise ValueError(
                    f"branch {i} (kernel {tuple(k)}, pads {list(p)}) is shifted by {d} against the "
                    f"{big} kernel with pads {begin + end} along spatial axis {a}"
                )
            off.append(d)
        offsets.append(tuple(off))
    return big, tuple(begin + end), tuple(offsets)
