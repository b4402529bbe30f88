"""bottleneck: replace a dense KxK convolution by cheaper convolutions through a narrow channel dimension.

A conv ``y = W * x + b`` with ``W`` of shape ``[O, C, kh, kw]`` (group 1) is rewritten, at rank ``r``, as

* **output side** -- KxK ``C -> r`` then 1x1 ``r -> O``. With ``U`` ``[O, r]`` the top-``r`` principal
  directions of the conv's outputs and ``mu`` their mean, ``y ~ U U^T (y - mu) + mu``, so
  ``W1 = U^T W``, ``b1 = U^T (b - mu)``, ``W2 = U``, ``b2 = mu``. With stride > 1 the 1x1 runs at the
  reduced resolution.
* **input side** -- 1x1 ``C -> r`` then KxK ``r -> O``. With ``V`` ``[C, r]`` the top-``r`` eigenvectors of
  the inputs' *uncentred* second moment ``E[x x^T]``, ``x ~ V V^T x``, so ``W1 = V^T`` (no bias) and
  ``W2[o, j] = sum_c W[o, c] V[c, j]``, ``b2 = b``. Uncentred, so the KxK conv's zero padding still sees
  zeros: borders stay exact at full rank.
* **Tucker-2** -- 1x1 ``C -> r1``, KxK ``r1 -> r2``, 1x1 ``r2 -> O``: both of the above, the core
  ``U^T (W x_c V)``.
* **spatial** -- ``kh x 1`` ``C -> r`` then ``1 x kw`` ``r -> O`` (Inception-v3's separation):
  ``W[o,c,h,w] ~ sum_r A[r,c,h] B[o,r,w]`` from the SVD of ``W`` unfolded as ``[(c,h), (o,w)]``; rows'
  stride/pads/dilation go to the first conv, columns' to the second.

Data-aware (the default when real calibration data is given): ``U`` comes from PCA of the conv's outputs
in the *original* model -- in the norm the consumer conv sees, ``|Wn e|``, when one reads it -- and ``V``
from the inputs the *already rewritten* model feeds it; then the factor that touches the data is
re-fitted in closed form by ridge least squares (pulled towards the projected weights) so that, given the
rewritten model's inputs, the new layers reproduce the original model's activations (layer by layer, so
errors do not compound). Without calibration data the bases come from the weights alone (SVD of ``W`` unfolded
along the output or input channels) -- a fallback that loses far more accuracy on trained networks.

Ranks come from a grid of fractions of the full rank, rounded up to a hardware-friendly multiple (16 by
default): odd channel counts can make onnxruntime's CPU kernels slower than the original conv. Strides,
pads, dilations and bias are carried over exactly; at full rank every factorization is exact.

The package, one concern a module:

* :mod:`~passes.bottleneck.lowrank` -- the weight math (bases, factors, spatial split, tap correlation,
  error estimates, the weight-only fallback), pure numpy;
* :mod:`~passes.bottleneck.patches` -- im2col samples of a conv's inputs and outputs, pure numpy;
* :mod:`~passes.bottleneck.ridge` -- closed-form ridge solvers and the held-out choice of the ridge;
* :mod:`~passes.bottleneck.fit` -- fitting on the calibration service (samples, moments, bases, refits,
  error proxies);
* :mod:`~passes.bottleneck.options` -- the options and the conv site;
* :mod:`~passes.bottleneck.bottleneck_pass` -- the pass (find, variants, refresh, apply, the graph rewrite).
"""

from passes.bottleneck.bottleneck_pass import Bottleneck
from passes.bottleneck.fit import Fitter, consumer_metric
from passes.bottleneck.lowrank import (
    POINTWISE,
    ConvGeometry,
    ErrorProxy,
    Layer,
    factor_input,
    factor_output,
    factor_spatial,
    factor_tucker,
    gram,
    input_basis,
    metric_basis,
    metric_root,
    output_basis,
    rank_grid,
    round_rank,
    spatial_errors,
    spectral_proxy,
    spectrum,
    split_geometry,
    tap_correlation,
    tap_products,
    top_eigvecs,
    weight_input_basis,
    weight_only_layers,
    weight_output_basis,
    weight_spectra,
)
from passes.bottleneck.options import MARK, MODES, BottleneckOptions, Site
from passes.bottleneck.patches import channels_last, column_responses, extract_patches, project_taps, sample_positions
from passes.bottleneck.ridge import HeldOut, RidgeSolver, ridge_fit, ridge_fit_through_relu

#: The site's name before it moved out of the pass module (kept for existing imports).
_Site = Site

__all__ = [
    "MARK",
    "MODES",
    "POINTWISE",
    "Bottleneck",
    "BottleneckOptions",
    "ConvGeometry",
    "ErrorProxy",
    "Fitter",
    "HeldOut",
    "Layer",
    "RidgeSolver",
    "Site",
    "channels_last",
    "column_responses",
    "consumer_metric",
    "extract_patches",
    "factor_input",
    "factor_output",
    "factor_spatial",
    "factor_tucker",
    "gram",
    "input_basis",
    "metric_basis",
    "metric_root",
    "output_basis",
    "project_taps",
    "rank_grid",
    "ridge_fit",
    "ridge_fit_through_relu",
    "round_rank",
    "sample_positions",
    "spatial_errors",
    "spectral_proxy",
    "spectrum",
    "split_geometry",
    "tap_correlation",
    "tap_products",
    "top_eigvecs",
    "weight_input_basis",
    "weight_only_layers",
    "weight_output_basis",
    "weight_spectra",
]
