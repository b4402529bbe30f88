"""Fitting the bottleneck factors to calibration data: the pass's use of the calibration service.

Data-aware (when real calibration data is given): ``U`` comes from PCA of the conv's outputs in the
*original* model -- in the norm the consumer conv sees, ``|Wn e|`` with ``K = sum_n Wn^T Wn``, when one reads
it -- and ``V`` from the inputs the *already rewritten* model feeds it; then the factor that touches the
data is re-fitted in closed form by ridge least squares (pulled towards the projected weights, the ridge
chosen on held-out calibration feeds) so that, given the rewritten model's inputs, the new layers
reproduce the original model's activations (layer by layer, so errors do not compound):

* output side: ``W1, b1`` fit ``patches -> P^T (y - mu)`` (``P`` reads coordinates in ``U``);
* input side: ``W2, b2`` fit ``V``-projected patches ``-> y``;
* Tucker-2: the core fits ``V``-projected patches ``-> P^T (y - mu)``;
* spatial: ``B`` and the bias fit ``A``'s column responses ``-> y``.

Through a following ReLU the fit ignores values both sides clip (see
:func:`~passes.bottleneck.ridge.ridge_fit_through_relu`). Without calibration data the bases come from the
weights alone (:func:`~passes.bottleneck.lowrank.weight_only_layers`) -- a fallback that loses far more
accuracy on trained networks.

Samples are ``max_samples`` output positions spread evenly over every calibration feed (seeded): the conv's
input patches in the current model and its output in the original, cached in the service (per version,
and by lineage across versions) so that whole activations are never kept.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from passes.bottleneck.lowrank import (
    POINTWISE,
    ErrorProxy,
    Layer,
    factor_input,
    factor_output,
    factor_spatial,
    factor_tucker,
    gram,
    metric_basis,
    metric_root,
    round_rank,
    spatial_errors,
    spectral_proxy,
    spectrum,
    split_geometry,
    tap_correlation,
    tap_products,
    weight_only_layers,
    weight_spectra,
)
from passes.bottleneck.options import BottleneckOptions, Site
from passes.bottleneck.patches import channels_last, column_responses, extract_patches, project_taps, sample_positions
from passes.bottleneck.ridge import HeldOut, RidgeSolver, ridge_fit_through_relu
from rewriter.contract import CalibrationData
from rewriter.graph import const_value
from rewriter.model import Model

log = logging.getLogger(__name__)

#: ``(patches [m, C*kh*kw], y [m, O], feed [m])`` of one conv: see :meth:`Fitter.samples`.
Samples = tuple[np.ndarray, np.ndarray, np.ndarray]


def consumer_metric(conv: gs.Node) -> np.ndarray | None:
    """``K = sum_n Wn^T Wn`` (over the consumers' output channels and taps) of the convs that read this
    conv's output, directly or through one ReLU; ``None`` when any reader is something else."""
    tensor = conv.outputs[0]
    readers = tensor.outputs
    if len(readers) == 1 and readers[0].op == "Relu":
        tensor = readers[0].outputs[0]
        readers = tensor.outputs
    total = None
    for node in readers:
        w = const_value(node.inputs[1]) if node.op == "Conv" and len(node.inputs) > 1 else None
        if w is None or w.ndim != 4 or int(node.attrs.get("group", 1)) != 1 or node.inputs[0] is not tensor:
            return None
        unfolded = np.moveaxis(w.astype(np.float64), 1, 0).reshape(w.shape[1], -1)
        k = unfolded @ unfolded.T
        total = k if total is None else total + k
    return total


#: Bytes of samples held in memory while a calibration run gathers them: past it, each feed's rows go to a
#: file per conv and are read back one conv at a time (a search that screens every conv at once would
#: otherwise hold all their patches together, ~800 MB on open-nsfw).
GATHER_BYTES = 64 << 20


def gathered(cal: CalibrationData, version: Model, names: list[str], rows: Callable[[int, dict[str, np.ndarray]], list[np.ndarray]],
             count: int, nbytes: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(i, rows_i)`` for each of ``count`` row sets that ``rows(feed_index, tensors)`` makes per feed, over one
    run of ``version`` on every calibration feed (``names``: the tensors it reads), joined across feeds. Held
    in memory when ``nbytes`` fits :data:`GATHER_BYTES`, else spooled to files and read back one at a time."""
    if nbytes <= GATHER_BYTES:
        per_feed = cal.map(version, names, rows)
        for i in range(count):
            joined = np.concatenate([feed[i] for feed in per_feed])
            for feed in per_feed:
                feed[i] = None  # (copied: freed as we go)
            yield i, joined
        return
    with tempfile.TemporaryDirectory(prefix="onnx-bottleneck-samples-") as tmp:
        paths = [os.path.join(tmp, f"{i}.f32") for i in range(count)]
        widths: dict[int, int] = {}

        def spool(k: int, tensors: dict[str, np.ndarray]) -> None:
            for i, r in enumerate(rows(k, tensors)):
                widths[i] = r.shape[1]
                with open(paths[i], "ab") as fh:
                    fh.write(np.ascontiguousarray(r, np.float32).tobytes())

        cal.map(version, names, spool)
        for i in range(count):
            yield i, np.fromfile(paths[i], np.float32).reshape(-1, widths[i])
            os.unlink(paths[i])


def width(site: Site, inputs: bool) -> int:
    """Floats per sample row: an input patch (``C*kh*kw``) or an output position (``O``)."""
    o, c, kh, kw = site.w.shape
    return c * kh * kw if inputs else o


def _gone(key: str) -> np.ndarray:
    raise RuntimeError(f"bottleneck: calibration samples {key!r} were evicted before use")


@dataclass(frozen=True)
class Fitter:
    """The new layers of a site, fitted on the calibration service when there is one (weight-only otherwise),
    and the error estimates that rank a site's variants. Holds no state: what it derives from activations is
    cached in the service (keys start with the pass ``name``)."""

    name: str
    options: BottleneckOptions
    calibration: CalibrationData | None = None

    @property
    def _cal(self) -> CalibrationData:
        if self.calibration is None:
            raise RuntimeError(f"{self.name}: no calibration data was handed to the pass")
        return self.calibration

    # -- layers --------------------------------------------------------------------------------------
    def layers(self, model: Model, site: Site, mode: str, rank: int) -> list[Layer]:
        """The new convs as (weight [o, i, kh, kw], bias, geometry), first to last: weight-only without
        calibration data; else :meth:`fit`, kept in the service by the lineage of the conv's input (the same
        fit whenever that input is computed the same way, e.g. screened, then judged)."""
        cal = self.calibration
        if cal is None:
            return weight_only_layers(site.w, site.b, site.geo, mode, rank)
        key = f"{self.name}:layers:{site.conv.name}:{mode}:{rank}:{hash(self.options)}:{cal.lineage(model, site.conv.inputs[0].name)}"
        return cal.lasting(key, lambda: self.fit(model, site, mode, rank))

    def fit(self, model: Model, site: Site, mode: str, rank: int) -> list[Layer]:
        """The data-aware layers (uncached; see :meth:`layers`).

        Refits start from the projected weights and are pulled back to them by the ridge
        (a prior), so a conv with few calibration samples per weight stays close to plain PCA.
        """
        w, b, opts, geo = site.w, site.b, self.options, site.geo
        o, c, kh, kw = w.shape
        users = site.conv.outputs[0].outputs
        relu = opts.through_relu and len(users) == 1 and users[0].op == "Relu"
        if mode == "spatial":
            return self._fit_spatial(model, site, rank, relu)
        v = self.input_basis(model, site, rank) if mode in ("input", "tucker") else None
        u, mu, coords = self.output_basis(model, site, rank) if mode in ("output", "tucker") else (None, None, None)
        if mode == "output":
            w1, b1, w2, b2 = factor_output(w, b, u, mu, coords)
            prior = w1.reshape(rank, -1)
        elif mode == "input":
            w1, w2 = factor_input(w, v)
            b2 = None if b is None else b.astype(np.float64)
            prior = w2.reshape(o, -1)
        else:
            w1, core, b_core, w3, b3 = factor_tucker(w, b, v, u, mu, coords)
            prior = core.reshape(rank, -1)
        if opts.refit:
            p, y_s, groups = self.samples(model, site)
            basis, mean = (None, None) if mode == "input" else (u, mu)
            read = basis if coords is None else coords
            target = y_s if read is None else (y_s - mean) @ read
            # The KxK factor reads the patches (output side) or the reduced channels, projected tap by tap.
            design = p if mode == "output" else project_taps(p, c, kh * kw, v.astype(np.float32))
            solver, ridge = self.solver(design, groups, target, prior)
            if relu:
                a, bias = ridge_fit_through_relu(solver, y_s, basis, mean, ridge, prior=prior, coords=read)
            else:
                a, bias = solver.fit(target, prior)
            if mode == "output":
                w1, b1 = a.reshape((rank, c, kh, kw)), bias
            elif mode == "input":
                w2, b2 = a.reshape((o, rank, kh, kw)), bias
            else:
                core, b_core = a.reshape((rank, rank, kh, kw)), bias
        if mode == "output":
            return [(w1, b1, geo), (w2.reshape(o, rank, 1, 1), b2, POINTWISE)]
        if mode == "input":
            return [(w1.reshape(rank, c, 1, 1), None, POINTWISE), (w2, b2, geo)]
        return [(w1.reshape(rank, c, 1, 1), None, POINTWISE), (core, b_core, geo), (w3.reshape(o, rank, 1, 1), b3, POINTWISE)]

    def _fit_spatial(self, model: Model, site: Site, rank: int, relu: bool) -> list[Layer]:
        """Spatial separation: ``A`` (``kh x 1``) from the SVD of the weights; ``B`` (``1 x kw``) and the bias
        re-fitted so that, from the rewritten model's inputs, the pair reproduces the original output."""
        w, b, opts = site.w, site.b, self.options
        o, c, kh, kw = w.shape
        a, bw = factor_spatial(w, rank)
        rows, cols = split_geometry(site.geo)
        bias = None if b is None else b.astype(np.float64)
        if opts.refit:
            p, y_s, groups = self.samples(model, site)
            # The 1 x kw factor reads A's responses at the kw taps of each output position: A applied to
            # the columns of the full kh x kw input patch (zero where the patch is padding, as A has no bias).
            z = column_responses(p, (c, kh, kw), a[..., 0].astype(np.float32))
            prior = bw.reshape(o, -1)
            solver, ridge = self.solver(z, groups, y_s, prior)
            fit, bias = ridge_fit_through_relu(solver, y_s, None, None, ridge, prior=prior) if relu else solver.fit(y_s, prior)
            bw = fit.reshape(o, rank, 1, kw)
        return [(a, None, rows), (bw, bias, cols)]

    # -- calibration samples and bases ---------------------------------------------------------------
    def samples(self, model: Model, site: Site) -> Samples:
        """``(patches [m, C*kh*kw], y [m, O], feed [m])``: the conv's input patches in ``model`` and its
        output in the *original* model, at the same ``max_samples`` output positions spread evenly over
        every calibration feed (seeded), and the feed each row came from. Cached per model version;
        whole activations are never kept."""
        return self.sample_many(model, [site])[0]

    def sample_many(self, model: Model, sites: list[Site], fetch: bool = True) -> list[Samples]:
        """:meth:`samples` of several convs, those not cached yet gathered in runs of each model (of at most
        :data:`GATHER_BYTES`). ``fetch=False``: only gather them (none returned: asked for all at once, they
        would all be in memory at once)."""
        cal = self._cal
        per_feed = max(1, math.ceil(self.options.max_samples / len(cal.feeds)))
        seed = self.options.seed
        tag = f"{self.name}:{per_feed}:{seed}:"

        def positions(site: Site, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            shape = model.static_shape(site.conv.outputs[0])
            assert shape is not None
            return sample_positions(shape[0], shape[2], shape[3], per_feed, np.random.default_rng((seed, k)))

        def gather(version: Model, todo: list[Site], tensor: Callable[[Site], str], key: Callable[[Site], str],
                   take: Callable[[Site, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]], np.ndarray],
                   inputs: bool) -> list[np.ndarray]:
            # Inputs: this version's (until it changes), and -- by the lineage of the tensor -- for later
            # versions that compute it the same way (rewrites downstream of it leave it as it was).
            lasting = {key(s): f"{key(s)}:{cal.lineage(version, tensor(s))}" for s in todo} if inputs else {}
            for s in todo:
                if inputs and not cal.cached(version, key(s)) and cal.has_lasting(lasting[key(s)]):
                    found = cal.lasting(lasting[key(s)], lambda: _gone(key(s)))
                    cal.memo(version, key(s), lambda found=found: found, while_current=True)
            missing = [s for s in {key(s): s for s in todo}.values() if not cal.cached(version, key(s))]
            if missing:
                size = sum(per_feed * len(cal.feeds) * width(s, inputs) * 4 for s in missing)
                for i, rows in gathered(cal, version, [tensor(s) for s in missing],
                                        lambda k, t: [take(s, t[tensor(s)], positions(s, k)).astype(np.float32) for s in missing],
                                        len(missing), size):
                    s = missing[i]
                    cal.memo(version, key(s), lambda rows=rows: rows, while_current=inputs)
                    if inputs:
                        cal.lasting(lasting[key(s)], lambda rows=rows: rows)
            return [cal.memo(version, key(s), lambda: _gone(key(s))) for s in todo] if fetch else []

        # Targets: the original's outputs (kept for the whole run); inputs: this version's.
        ys = gather(cal.original, sites, lambda s: s.conv.outputs[0].name, lambda s: tag + "y:" + s.conv.outputs[0].name,
                    lambda s, t, pos: channels_last(t, pos), False)
        xs = gather(model, sites, lambda s: s.conv.inputs[0].name, lambda s: tag + "x:" + s.conv.name,
                    lambda s, t, pos: extract_patches(t, s.geo, pos), True)
        if not fetch:
            return []
        return [(x, y, np.repeat(np.arange(len(cal.feeds)), len(positions(s, 0)[0]))) for s, x, y in zip(sites, xs, ys)]

    def solver(self, design: np.ndarray, groups: np.ndarray, target: np.ndarray, prior: np.ndarray) -> tuple[RidgeSolver, float]:
        """A ridge solver for ``design``, with the ridge that best predicts held-out calibration feeds for
        ``target`` (see :class:`HeldOut`), or the fixed ``ridge`` option when none can be held out."""
        opts = self.options
        ridge = opts.ridge
        if opts.cv_folds >= 2 and opts.ridge_grid:
            rows = slice(None) if len(design) <= opts.cv_rows else np.linspace(0, len(design) - 1, opts.cv_rows).astype(np.int64)
            ridge, err = HeldOut(design[rows], groups[rows], opts.cv_folds).best(target[rows], opts.ridge_grid, prior, default=opts.ridge)
            log.debug("bottleneck: ridge %g (held-out relative error %s)", ridge, err)
        return RidgeSolver(design, ridge), ridge

    def output_basis(self, model: Model, site: Site, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(U, mu, P)`` from the covariance of the conv's output in the original model (all calibration
        feeds): plain PCA (``P`` None), or with ``consumer_metric`` PCA in the norm the consumer conv sees."""
        cal = self._cal
        yname = site.conv.outputs[0].name
        metric = consumer_metric(site.conv) if self.options.consumer_metric else None
        mean, second = cal.moments(cal.original, [yname])[yname]
        if metric is not None:
            u, coords = metric_basis(second - np.outer(mean, mean), metric, rank)
            return u, mean, coords

        def eig() -> np.ndarray:
            values, vectors = np.linalg.eigh(second - np.outer(mean, mean))
            return vectors[:, np.argsort(values)[::-1]]

        return cal.memo(cal.original, f"{self.name}:eig:{yname}", eig)[:, :rank], mean, None

    def input_basis(self, model: Model, site: Site, rank: int) -> np.ndarray:
        """``V``: leading eigenvectors of the uncentred second moment of the conv's input in ``model`` (from
        the patches' centre taps when refitting: the samples are at hand; else from the channel moments)."""
        cal = self._cal
        xname = site.conv.inputs[0].name

        def eig() -> np.ndarray:
            if self.options.refit:
                o, c, kh, kw = site.w.shape
                p = self.samples(model, site)[0]
                centre = np.ascontiguousarray(p.reshape(len(p), c, kh * kw)[:, :, (kh // 2) * kw + kw // 2])
                second = gram(centre).astype(np.float64) / max(1, len(centre))
            else:
                second = cal.moments(model, [xname])[xname][1]
            values, vectors = np.linalg.eigh(second)
            return vectors[:, np.argsort(values)[::-1]]

        return cal.memo(model, f"{self.name}:eig:{xname}", eig)[:, :rank]

    # -- error estimates -----------------------------------------------------------------------------
    def error_proxies(self, model: Model, sites: list[Site]) -> dict[str, ErrorProxy]:
        """Per conv, a function (mode, rank) -> estimated relative error of its output (before any refit).

        Data-aware: the residual energy of the output's principal components (output side, Tucker; in the
        consumer's norm with ``consumer_metric``) or of the input's uncentred second moment (input side),
        from channel moments gathered in one run. Weight-only: the residual energy of ``W``'s singular
        values unfolded along outputs or inputs. Spatial: :func:`~passes.bottleneck.lowrank.spatial_errors`.
        """
        if self.calibration is None:
            return {s.conv.name: self._proxy(s, *weight_spectra(s.w), None, None) for s in sites}
        if not sites:
            return {}
        cal = self._cal
        # Estimates only rank candidates (screening measures them): a sparser grid of positions will do.
        ys = cal.moments(cal.original, [s.conv.outputs[0].name for s in sites], flops_per_feed=1e7)
        xs = cal.moments(model, [s.conv.inputs[0].name for s in sites], flops_per_feed=1e7)
        taps = self.tap_correlations(model, sites) if "spatial" in self.options.modes else {}
        out = {}
        for site in sites:
            yname, xname = site.conv.outputs[0].name, site.conv.inputs[0].name
            mean, second = ys[yname]
            metric = consumer_metric(site.conv) if self.options.consumer_metric else None
            if metric is None:  # convs reading one tensor share its spectra (cached per version)
                spec_out = cal.memo(cal.original, f"{self.name}:spectrum:{yname}", lambda: spectrum(second - np.outer(mean, mean)))
                total_out = float(np.trace(second))
            else:  # in the consumer's norm, like the basis the rewrite will use
                root = metric_root(metric)[0]
                spec_out = cal.memo(model, f"{self.name}:spectrum:{site.conv.name}", lambda: spectrum(root @ (second - np.outer(mean, mean)) @ root))
                total_out = float(np.trace(root @ second @ root))
            spec_in = cal.memo(model, f"{self.name}:spectrum:{xname}", lambda: spectrum(xs[xname][1]))
            out[site.conv.name] = self._proxy(site, spec_out, total_out, spec_in, xs[xname][1], taps.get(site.conv.name))
        return out

    def _proxy(self, site: Site, spec_out: np.ndarray, total_out: float, spec_in: np.ndarray,
               second_in: np.ndarray | None, taps: np.ndarray | None) -> ErrorProxy:
        return spectral_proxy(np.clip(spec_out, 0, None), max(total_out, 1e-12), np.clip(spec_in, 0, None),
                              self.spatial_proxy(site, second_in, taps))

    def tap_correlations(self, model: Model, sites: list[Site]) -> dict[str, np.ndarray]:
        """Per KxK conv, the correlation between its patch taps on calibration data (one run per version)."""
        cal = self._cal
        wanted = [s for s in sites if min(s.geo.kernel) > 1]

        def compute() -> dict[str, np.ndarray]:
            def per_feed(_: int, tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
                return [tap_products(tensors[s.conv.inputs[0].name].astype(np.float32), s.geo.kernel, s.geo.dilations) for s in wanted]

            feeds = cal.map(model, [s.conv.inputs[0].name for s in wanted], per_feed) if wanted else []
            return {s.conv.name: tap_correlation(sum(f[i] for f in feeds), s.geo.kernel) for i, s in enumerate(wanted)}

        key = ",".join(f"{s.conv.name}/{s.geo.kernel}/{s.geo.dilations}" for s in wanted)
        return cal.memo(model, f"{self.name}:taps:{key}", compute)

    def spatial_proxy(self, site: Site, second: np.ndarray | None, taps: np.ndarray | None = None) -> Callable[[int], float]:
        """rank -> estimated relative error of the spatial separation (one SVD, on first use)."""
        cache: dict[int, float] = {}

        def error(rank: int) -> float:
            if rank not in cache:
                o, c = site.w.shape[:2]
                ranks = sorted({round_rank(f * min(c, o), self.options.rank_multiple, 10**9) for f in self.options.spatial_fractions} | {rank})
                cache.update(spatial_errors(site.w, second, ranks, taps))
            return cache[rank]

        return error
