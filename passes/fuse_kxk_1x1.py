"""fuse_kxk_1x1: a KxK convolution followed directly by a linear 1x1 convolution -> one KxK convolution.

For ``Y = Conv(Conv(X, W1, b1), W2, b2)`` where the second conv is pointwise (1x1, stride 1, no padding,
group 1), the 1x1 mixes the channels of every output pixel of the KxK conv, so it folds into the KxK
weights (``W1`` is ``[M, C, kh, kw]``, ``W2`` is ``[O, M, 1, 1]``)::

    W[o, c, :, :] = sum_m W2[o, m] * W1[m, c, :, :]     # W2 @ W1.reshape(M, C*kh*kw)
    b[o]          = sum_m W2[o, m] * b1[m] + b2[o]

The fused conv keeps the KxK conv's strides, pads, dilations and auto_pad. Zero padding is no problem
here: it sits in front of the KxK conv, whose every output (border pixels included) is ``W1 * x + b1``
before the 1x1 sees it.

A grouped KxK conv (group ``g``) fuses too, but only into a *dense* conv: the 1x1 mixes output channels
across groups, so the result is ``W2 @ dense(W1)`` with ``dense(W1)`` the block-diagonal ``[M, C, kh, kw]``
expansion of the grouped weight (``dense(W1)[m, c] = W1[m, c - g(m)*C/g]`` when input channel ``c`` lies in
``m``'s group ``g(m) = m // (M/g)``, else 0). The fusion stays grouped only if ``W2`` happened to be
block-diagonal itself, which is not assumed.

MACs, per output pixel (the 1x1 keeps the KxK's output size): before ``M*(C/g)*kh*kw + O*M``, after
``O*C*kh*kw``. The fusion is applied only where it does not raise MACs, e.g. a KxK expansion followed by a
1x1 projection (3x3 16->64 then 1x1 64->16: 10240 -> 2304 per pixel), not the reverse (3x3 16->16 then
1x1 16->64: 3328 -> 9216). A 1x1 followed by a 1x1 belongs to ``fuse_1x1_chain``.
"""

from __future__ import annotations

import numpy as np

from passes._conv_pair import ConvPair, ConvPairFusion
from passes.fuse_1x1_chain import compose_pointwise


def compose_kxk_then_1x1(
    w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(W2 @ W1, W2 b1 + b2) for a dense KxK weight ``[M, C, *k]`` and a 1x1 weight ``[O, M]`` or ``[O, M, 1, ..]``.

    Returns the ``[O, C, *k]`` weight and ``[O]`` bias (``None`` when neither conv has one), in float64.
    """
    m, kernel = w1.shape[0], w1.shape[1:]
    w, b = compose_pointwise(w1.reshape(m, -1), b1, w2.reshape(w2.shape[0], m), b2)
    return w.reshape((w.shape[0],) + kernel), b


class FuseKxk1x1(ConvPairFusion):
    name = "fuse_kxk_1x1"
    summary = "Fold a linear 1x1 conv into the KxK conv before it (W = W2*W1), where it does not raise MACs."
    pointwise_first = False
    compose = staticmethod(compose_kxk_then_1x1)

    def pair_reason(self, match: ConvPair, w1: np.ndarray, w2: np.ndarray, group: int) -> str | None:
        if w1.ndim < 3 or w1.shape[0] % group or w2.shape[1] != w1.shape[0]:
            return f"weight shapes {w1.shape} (group {group}) and {w2.shape} do not chain"
        return None
