"""Small helpers the passes share: reading a node's optional inputs, a conv's bias and geometry, the
model's opset, and the BatchNormalization scale/shift formula.

All are pure functions of their arguments (they read a node or an array, never edit one).

Weight math is done in float64 whatever the weights' dtype, and the result is stored back in the dtype of
the weight it replaces (:func:`stored_as`): a float16 model's weights are rounded once, at the end.

Conventions (ONNX): a Conv is ``Conv(X, W, B?)`` with ``W`` shaped ``[C_out, C_in/group, k...]``; an
optional input that is omitted is either missing from the input list or present with an empty name.

Inference BatchNormalization is a per-channel affine map ``BN(y) = y * s + t`` with::

    s = gamma / sqrt(var + eps)
    t = beta - mean * s
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.graph import const_info, const_value
from rewriter.model import Model

# -- inputs ----------------------------------------------------------------------------------------------


def optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` of ``node``, or ``None`` when it is missing or omitted (an empty name)."""
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def weight_value(node: gs.Node) -> np.ndarray | None:
    """The constant value of input 1 (a Conv's ``W``, a Gemm's ``B``), or ``None`` (absent or not constant)."""
    return const_value(node.inputs[1]) if len(node.inputs) > 1 else None


def weight_shape(node: gs.Node) -> tuple[int, ...] | None:
    """The shape of input 1 when it is constant, read without loading its values (:func:`weight_value` copies
    a lazily held weight into an array: a check that needs only its shape should not)."""
    info = const_info(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if info is None else info[1]


def bias_tensor(node: gs.Node) -> gs.Tensor | None:
    """Input 2 (a Conv's ``B``, a Gemm's ``C``) when present, else ``None``."""
    return optional_input(node, 2)


def bias_value(node: gs.Node) -> np.ndarray | None:
    """The constant value of input 2 (a Conv's ``B``, a Gemm's ``C``), or ``None`` when absent or not constant."""
    return const_value(bias_tensor(node))


# -- model -----------------------------------------------------------------------------------------------


def opset(model: Model) -> int:
    """The model's version of the default ONNX domain (``""`` or ``"ai.onnx"``); 1 when it imports none."""
    for entry in model.proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


# -- conv geometry ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """A conv's spatial geometry, one entry per spatial axis (pads in ONNX order: all begins, then all ends)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int


def conv_kernel(node: gs.Node) -> tuple[int, ...] | None:
    """A conv's kernel shape: its ``kernel_shape`` attribute, else ``W.shape[2:]`` of a constant weight
    of rank >= 3; ``None`` when neither is known."""
    kernel = node.attrs.get("kernel_shape")
    if kernel is None:
        w = weight_shape(node)
        if w is None or len(w) < 3:
            return None
        kernel = w[2:]
    return tuple(int(k) for k in kernel)


def conv_auto_pad(node: gs.Node) -> str:
    """A conv's ``auto_pad`` as text (an attribute given as bytes is decoded); ``"NOTSET"`` when absent."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    return auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)


def conv_group(node: gs.Node) -> int:
    """A conv's ``group`` attribute; 1 when absent."""
    return int(node.attrs.get("group", 1))


#: How :func:`conv_geometry` reads explicit ``pads`` beside ``auto_pad=VALID``.
ValidPads = Literal["zero", "attribute"]


def conv_geometry(node: gs.Node, *, valid_pads: ValidPads = "zero") -> ConvGeometry | str:
    """Kernel, strides, explicit pads, dilations and group of a Conv, or the reason they are not known.

    Defaults follow ONNX: strides and dilations 1, pads 0, group 1; with ``n`` the length of the kernel
    (:func:`conv_kernel`), a default has ``n`` entries (pads ``2n``). Lengths are not checked.
    ``auto_pad=VALID`` is no padding; ``SAME_UPPER`` / ``SAME_LOWER`` (pads that depend on the input
    size) are declined.

    ``valid_pads``: ONNX forbids ``pads`` beside an ``auto_pad`` other than NOTSET (onnxruntime refuses
    such a node; onnx shape inference reads the pads as written). Under ``auto_pad=VALID`` they are read
    as ``"zero"`` (every pad 0, what VALID means) or as the ``"attribute"`` says (its default where
    absent). The two agree on every valid model.
    """
    kernel = conv_kernel(node)
    if kernel is None:
        return f"{node.name}: kernel shape unknown"
    n = len(kernel)
    auto_pad = conv_auto_pad(node)
    if auto_pad not in ("NOTSET", "VALID"):
        return f"{node.name}: auto_pad {auto_pad} is not handled"
    if auto_pad == "VALID" and valid_pads == "zero":
        pads = [0] * (2 * n)
    else:
        pads = list(node.attrs.get("pads", [0] * (2 * n)))
    return ConvGeometry(
        kernel,
        tuple(int(s) for s in node.attrs.get("strides", [1] * n)),
        tuple(int(p) for p in pads),
        tuple(int(d) for d in node.attrs.get("dilations", [1] * n)),
        conv_group(node),
    )


def is_pointwise_conv(node: gs.Node) -> bool:
    """A Conv with a weight input whose kernel (see :func:`conv_kernel`) is all ones."""
    if node.op != "Conv" or len(node.inputs) < 2:
        return False
    kernel = conv_kernel(node)
    return kernel is not None and len(kernel) > 0 and all(k == 1 for k in kernel)


def conv_padding_free(node: gs.Node) -> bool:
    """No explicit padding (all ``pads`` 0) and ``auto_pad`` NOTSET or VALID."""
    pads = node.attrs.get("pads", [])
    return all(p == 0 for p in pads) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")


# -- weight math (pure numpy) ----------------------------------------------------------------------------


def batchnorm_scale_shift(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with ``BN(y) = y * s + t``: ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s`` (float64).

    The inputs are not modified; the results are new float64 arrays of the parameters' shape.
    """
    s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + float(eps))
    t = beta.astype(np.float64) - mean.astype(np.float64) * s
    return s, t


def stored_as(values: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """``values`` (weight math done in float64) in ``dtype``, the dtype of the weight they replace: float16
    weights stay float16, rounded once to nearest. Raises ``ValueError`` when a finite value does not fit
    (beyond float16's +-65504 it would become infinite): the rewrite is then refused, never written."""
    values = np.asarray(values)
    with np.errstate(over="ignore"):
        out = values.astype(dtype)
    if out.dtype.kind == "f" and values.dtype.kind == "f" and not np.array_equal(np.isfinite(out), np.isfinite(values)):
        big = float(np.max(np.abs(values[np.isfinite(values)])))
        raise ValueError(f"a rewritten weight ({big:.4g}) does not fit in {out.dtype} (largest {float(np.finfo(out.dtype).max):g})")
    return out
