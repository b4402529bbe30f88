"""Helpers shared by the bottleneck tests: reference convolutions, geometries, small conv models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.bottleneck import ConvGeometry, extract_patches, sample_positions
from tests.helpers import parse

GEOMETRIES = [
    ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ConvGeometry((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    ConvGeometry((3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    ConvGeometry((5, 3), (1, 2), (2, 1, 2, 1), (1, 1)),
    ConvGeometry((3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
]


def conv_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, geo: ConvGeometry) -> np.ndarray:
    """Direct convolution through im2col at every output position."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = geo.kernel, geo.strides, geo.pads, geo.dilations
    n, _, h, wd = x.shape
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    pos = sample_positions(n, ho, wo, n * ho * wo, np.random.default_rng(0))
    y = extract_patches(x, geo, pos) @ w.reshape(w.shape[0], -1).T + (0 if b is None else b)
    return y.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)


def pointwise(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    y = np.einsum("oc,nchw->nohw", w.reshape(w.shape[0], w.shape[1]), x)
    return y if b is None else y + b[None, :, None, None]


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def gs_graph(text: str) -> gs.Graph:
    return gs.import_onnx(parse(text))


CONV_MODEL = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 32, 12, 10] X) => (float[1, {o}, {ho}, {wo}] Y)
    <float[{o}, 32, 3, 3] W, float[{o}] B> {{
        Y = Conv <kernel_shape = [3, 3], strides = [{s}, {s}], pads = [{p}, {p}, {p}, {p}], dilations = [{d}, {d}]> (X, W, B)
    }}
"""


def conv_model(s: int = 1, p: int = 1, d: int = 1, o: int = 48) -> onnx.ModelProto:
    """One 32 -> ``o`` 3x3 conv with bias on a 12 x 10 map, at stride ``s``, pads ``p``, dilation ``d``."""
    ho = (12 + 2 * p - d * 2 - 1) // s + 1
    wo = (10 + 2 * p - d * 2 - 1) // s + 1
    return parse(CONV_MODEL.format(s=s, p=p, d=d, ho=ho, wo=wo, o=o))
