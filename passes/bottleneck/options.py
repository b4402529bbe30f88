"""The bottleneck pass's options, and the conv it works on (a *site*)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from passes.bottleneck.lowrank import ConvGeometry

MODES = ("output", "input", "tucker", "spatial")
#: Suffix of the nodes this pass creates; they are never factorized again.
MARK = "_bneck"


@dataclass(frozen=True)
class BottleneckOptions:
    """Knobs of the bottleneck pass (``[pass-options.bottleneck]`` in a config file)."""

    modes: tuple[str, ...] = ("output", "input", "spatial")
    rank_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    rank_multiple: int = 16
    #: Ranks of the spatial separation, as fractions of min(C, O) (at 1.0 a 3x3 conv keeps 2/3 of its MACs).
    spatial_fractions: tuple[float, ...] = (0.5, 0.75, 1.0)
    min_kernel: int = 3
    #: Also factorize dense 1x1 convs (C -> r -> O), which only pays when r < C*O/(C+O).
    include_pointwise: bool = False
    #: Modes tried on 1x1 convs (of ``modes``). For a 1x1 conv the output and input sides are the same
    #: structure (1x1 C->r, 1x1 r->O) with the kept subspace read on either side; by default only the
    #: output side, chosen in the consumer's norm, is tried (half the candidates to screen and judge).
    pointwise_modes: tuple[str, ...] = ("output",)
    #: Re-fit the data-facing factor by least squares on calibration data.
    refit: bool = True
    #: When the conv feeds a ReLU, fit through it (errors on values the ReLU zeroes anyway are free).
    through_relu: bool = True
    #: Output side / Tucker: choose the subspace in the norm the consumer conv sees (``|Wn e|``, through
    #: a ReLU) instead of plain PCA -- errors in directions the next layer ignores are free.
    consumer_metric: bool = True
    max_samples: int = 8000
    #: Relative ridge of the refits (``lam = ridge * tr(P^T P) / d``) where it cannot be chosen on
    #: held-out calibration feeds (``cv_folds`` 0, or a single feed).
    ridge: float = 1e-4
    #: Ridges tried per refit; the one that best predicts held-out calibration feeds is used. Few samples
    #: per weight (deep layers, small maps) want a strong pull towards the projected weights, many want none.
    ridge_grid: tuple[float, ...] = (1e-4, 1e-2, 0.1, 0.3, 1.0, 3.0)
    #: Folds of whole calibration feeds for choosing the ridge (0: always use ``ridge``).
    cv_folds: int = 2
    #: Rows (spread evenly over the feeds) used for choosing the ridge; the fit itself uses every sample.
    cv_rows: int = 4096
    seed: int = 0
    #: Node names to consider (empty: every eligible conv).
    only: tuple[str, ...] = field(default_factory=tuple)



@dataclass(frozen=True)
class Site:
    """A dense conv the pass may factorize: the node, its constant weight ``[O, C, kh, kw]`` and bias, its geometry."""

    conv: gs.Node
    w: np.ndarray
    b: np.ndarray | None
    geo: ConvGeometry
