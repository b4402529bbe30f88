"""fuse_1x1_kxk: a linear 1x1 convolution followed directly by a KxK convolution -> one KxK convolution.

For ``Y = Conv(Conv(X, W1, b1), W2, b2)`` where the first conv is pointwise (1x1, stride 1, no padding,
group 1), the intermediate tensor is ``W1 x + b1`` at every pixel, so the KxK conv sees a channel mix of
``x`` and folds it into its own weights (``W1`` is ``[M, C, 1, 1]``, ``W2`` is ``[O, M, kh, kw]``)::

    W[o, c, :, :] = sum_m W2[o, m, :, :] * W1[m, c]
    b[o]          = b2[o] + sum_{m, i, j} W2[o, m, i, j] * b1[m]

The fused conv keeps the KxK conv's strides, pads, dilations and auto_pad (the 1x1 keeps the spatial size,
so the KxK conv sees the same geometry on ``x``).

The border case. The bias term assumes every tap of the KxK window reads ``W1 x + b1``. Where the KxK conv
zero-pads, the padded taps read 0 instead, so border outputs would get ``b1``'s contribution through taps
that never had it. No constant padding of ``x`` can fix that in general (``W1 v + b1 = 0`` has no solution
``v`` unless ``b1`` lies in ``W1``'s column space). The fold is therefore exact only when

* the KxK conv does not pad (pads all 0, auto_pad NOTSET or VALID), or
* ``b1`` is absent or all zeros;

otherwise the pass skips: "the first conv's bias would meet the KxK conv's zero padding at the borders".

A grouped KxK conv (group ``g``) fuses into a dense one: output ``o`` reads only the intermediate channels of
its group, but each of those mixes all of ``x``'s channels, so ``W = dense(W2) . W1`` with ``dense`` the
block-diagonal expansion :func:`passes.fuse_1x1_chain.dense_weight`.

MACs, with ``P`` input pixels and ``Q`` output pixels: before ``P*M*C + Q*O*(M/g)*kh*kw``, after
``Q*O*C*kh*kw``. Applied only where MACs do not rise: an expansion into the KxK conv (1x1 4->8 then 3x3
8->4: 320 -> 144 per pixel) fuses, a reduction does not (1x1 64->16 then 3x3 16->16: 3328 -> 9216).
"""

from __future__ import annotations

import numpy as np

from passes._conv_pair import ConvPair, ConvPairFusion
from passes.common import bias_value, conv_padding_free

BORDER_REASON = "the first conv's bias would meet the KxK conv's zero padding at the borders"


def compose_1x1_then_kxk(
    w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(W2 . W1, b2 + sum W2 b1) for a 1x1 weight ``[M, C]`` or ``[M, C, 1, ..]`` and a dense KxK weight ``[O, M, *k]``.

    Returns the ``[O, C, *k]`` weight and ``[O]`` bias (``None`` when neither conv has one), in float64.
    The bias is exact only where the KxK conv sees no zero padding (see the module docstring).
    """
    m = w2.shape[1]
    a = w1.astype(np.float64).reshape(m, -1)
    k2 = w2.astype(np.float64)
    w = np.moveaxis(np.tensordot(k2, a, axes=([1], [0])), -1, 1)  # [O, *k, C] -> [O, C, *k]
    if b1 is None and b2 is None:
        return w, None
    b = np.zeros(w.shape[0]) if b2 is None else b2.astype(np.float64)
    if b1 is not None:
        b = b + k2.reshape(k2.shape[0], m, -1).sum(axis=2) @ b1.astype(np.float64)
    return w, b


class Fuse1x1Kxk(ConvPairFusion):
    name = "fuse_1x1_kxk"
    summary = "Fold a linear 1x1 conv into the KxK conv after it (W = W2*W1), where exact and MACs do not rise."
    pointwise_first = True
    compose = staticmethod(compose_1x1_then_kxk)

    def pair_reason(self, match: ConvPair, w1: np.ndarray, w2: np.ndarray, group: int) -> str | None:
        if w2.ndim < 3 or w2.shape[0] % group or w2.shape[1] * group != w1.shape[0]:
            return f"weight shapes {w1.shape} and {w2.shape} (group {group}) do not chain"
        b1 = bias_value(match.first)
        if b1 is not None and np.any(b1 != 0) and not conv_padding_free(match.second):
            return BORDER_REASON
        return None
