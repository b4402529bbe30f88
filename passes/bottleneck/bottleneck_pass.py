"""The bottleneck pass: find the dense convs to factorize and their variants, re-express a variant against
an earlier factorization of the same conv, and put the new convs in the graph.

Variants: every mode of ``modes`` at every rank of the grid (fractions of the full rank rounded up to
``rank_multiple``) that lowers the conv's MACs. With ``N x Ho x Wo`` output and ``N x Hi x Wi`` input maps:

* output side: ``N Ho Wo (r C kh kw + O r)``;
* input side: ``N Hi Wi C r + N Ho Wo O r kh kw``;
* Tucker-2 at ``(r1, r2)``: ``N Hi Wi C r1 + N Ho Wo (r2 r1 kh kw + O r2)``;
* spatial: ``N Ho Wi C kh r + N Ho Wo r kw O`` (``kh x 1`` at ``(Ho, Wi)``, then ``1 x kw``).

Candidates are ordered by MACs saved per unit of squared estimated error (see
:meth:`~passes.bottleneck.fit.Fitter.error_proxies`); the layers come from
:class:`~passes.bottleneck.fit.Fitter` on the calibration service handed to the pass (it is
``data_aware``), or from the weights alone without one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace

import onnx_graphsurgeon as gs

from passes.bottleneck.fit import Fitter
from passes.bottleneck.lowrank import ConvGeometry, ErrorProxy, Layer, rank_grid, round_rank
from passes.bottleneck.options import MARK, MODES, BottleneckOptions, Site
from passes.common import bias_tensor, bias_value, conv_auto_pad, conv_geometry, conv_group, stored_as, weight_value
from rewriter.analysis import node_cost
from rewriter.contract import Candidate, Cost, Pass, RewriteError, Skip
from rewriter.graph import NameFactory, constant, dequantized_constant, is_graph_input, replace_nodes
from rewriter.model import Model

log = logging.getLogger(__name__)


def _geometry(node: gs.Node) -> ConvGeometry | str:
    """The conv's 2-D geometry, read by :func:`passes.common.conv_geometry`, or why it is not handled.

    Explicit pads beside ``auto_pad=VALID`` (which ONNX forbids) are read as written, as this pass always
    read them: on a valid model there are none.
    """
    if conv_auto_pad(node) not in ("NOTSET", "VALID"):
        return "auto_pad SAME_* is not handled; export with explicit pads"
    geo = conv_geometry(node, valid_pads="attribute")
    if isinstance(geo, str):
        return geo  # not reached from _site: its weight is a 4-D constant (the kernel is known), auto_pad checked above
    kernel, strides, pads, dil = geo.kernel, geo.strides, geo.pads, geo.dilations
    if len(kernel) != 2 or len(strides) != 2 or len(pads) != 4 or len(dil) != 2:
        return "only 2-D convolutions are handled"
    return ConvGeometry(kernel, strides, pads, dil)  # type: ignore[arg-type]


class Bottleneck(Pass):
    """Insert 1x1 low-rank reductions into expensive dense convs (lossy; see the module docstring)."""

    name = "bottleneck"
    summary = "Factorize dense KxK convs through a narrow 1x1 bottleneck (output/input side, Tucker-2); lossy."
    exact = False
    data_aware = True

    def __init__(self, **options: object) -> None:
        known = BottleneckOptions.__dataclass_fields__
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"bottleneck: unknown option(s) {unknown}; known: {sorted(known)}")
        for key in ("modes", "pointwise_modes", "rank_fractions", "spatial_fractions", "only", "ridge_grid"):
            if key in options and not isinstance(options[key], tuple):
                options[key] = tuple(options[key])  # type: ignore[arg-type]
        self.options = BottleneckOptions(**options)  # type: ignore[arg-type]
        bad = [m for m in self.options.modes + self.options.pointwise_modes if m not in MODES]
        if bad:
            raise TypeError(f"bottleneck: unknown mode(s) {bad}; known: {MODES}")
        self._warned = False

    @property
    def fitter(self) -> Fitter:
        """The fits of this pass's options on the calibration service it was handed (weight-only without one)."""
        return Fitter(self.name, self.options, self.calibration)

    # -- match / check ------------------------------------------------------------------------------
    def _site(self, model: Model, node: gs.Node) -> Site | str | None:
        """The dense conv at ``node`` with its constant weights (match and check); a reason when it is a conv
        this pass declines; ``None`` when it is not one this pass looks at."""
        if node.op != "Conv" or len(node.inputs) < 2 or len(node.outputs) != 1:
            return None
        if self.options.only and node.name not in self.options.only:
            return None
        if MARK in node.name:
            return None  # made by this pass
        w = weight_value(node)
        if w is None and dequantized_constant(node.inputs[1]) is not None:
            return "quantized weights (QDQ): factorize the float model, then quantize it"
        if w is None or is_graph_input(model.graph, node.inputs[1]):
            return "weight is not a constant initializer"
        if w.ndim != 4:
            return "only 2-D convolutions are handled"
        pointwise = w.shape[2] == 1 and w.shape[3] == 1
        if conv_group(node) != 1:
            return None if pointwise else "grouped conv: no dense channel dimension to reduce"
        if pointwise and not self.options.include_pointwise:
            return None
        if not pointwise and max(w.shape[2:]) < self.options.min_kernel:
            return None
        if w.dtype.kind != "f":
            return "weights are not floating point"
        b = bias_value(node)
        if b is None and bias_tensor(node) is not None:
            return "bias is not constant"
        geo = _geometry(node)
        if isinstance(geo, str):
            return geo
        if model.static_shape(node.outputs[0]) is None or model.static_shape(node.inputs[0]) is None:
            return "input or output shape unknown"
        return Site(node, w, b, geo)

    def _macs(self, model: Model, site: Site, mode: str, rank: int) -> int:
        """MACs of the new convs (formulas in the module docstring); ``rank`` is ``(r1, r2)`` for Tucker-2."""
        out = model.static_shape(site.conv.outputs[0])
        inp = model.static_shape(site.conv.inputs[0])
        assert out is not None and inp is not None
        o, c, kh, kw = site.w.shape
        n, _, ho, wo = out
        hi, wi = inp[2], inp[3]
        if mode == "output":
            return n * ho * wo * (rank * c * kh * kw + o * rank)
        if mode == "input":
            return n * hi * wi * c * rank + n * ho * wo * o * rank * kh * kw
        if mode == "spatial":  # kh x 1 at (Ho, Wi), then 1 x kw at (Ho, Wo)
            return n * ho * wi * c * kh * rank + n * ho * wo * rank * kw * o
        r1, r2 = rank
        return n * hi * wi * c * r1 + n * ho * wo * (r2 * r1 * kh * kw + o * r2)  # type: ignore[misc]

    def find(self, model: Model) -> Iterator[Candidate | Skip]:
        """Variants of every dense conv; and, for convs this pass factorized before, the variants that would
        lower MACs further, as replacements of that factorization (see :meth:`refresh`)."""
        sites: list[Site] = []
        for node in list(model.graph.nodes):
            site = self._site(model, node)
            if isinstance(site, str):
                yield Skip(self.name, (node.name,), site)
            elif site is not None:
                sites.append(site)
        redone = {n.name.split(MARK)[0] for n in model.graph.nodes if MARK in n.name}
        again = [found[0] for name in sorted(redone) if (found := self._original(model, name)) is not None]
        proxies = self.fitter.error_proxies(model, sites + again)
        for site in sites:
            found = False
            for cand in self._variants(model, site, proxies[site.conv.name]):
                found = True
                yield cand
            if not found:
                yield Skip(self.name, (site.conv.name,), "no rank in the grid lowers MACs")
        for site in again:
            for cand in self._variants(model, site, proxies[site.conv.name]):
                fresh = self.refresh(model, cand)
                if fresh is not None:
                    yield fresh

    def _variants(self, model: Model, site: Site, errors: ErrorProxy) -> Iterator[Candidate]:
        """Every mode and rank of the grid that lowers the conv's MACs, as candidates."""
        opts = self.options
        node = site.conv
        before = node_cost(model, node)
        o, c = site.w.shape[:2]
        kh, kw = site.geo.kernel
        pointwise = kh == 1 and kw == 1
        for mode in opts.modes:
            if pointwise and mode not in opts.pointwise_modes:
                continue
            if mode == "spatial":
                if kh == 1 or kw == 1:
                    continue
                full = min(c * kh, o * kw)
                grid = [r for r in {round_rank(f * min(c, o), opts.rank_multiple, full) for f in opts.spatial_fractions} if r < full]
            else:
                full = {"output": o, "input": c, "tucker": min(o, c)}[mode]
                grid = rank_grid(full, opts.rank_fractions, opts.rank_multiple)
            for rank in sorted(grid):
                knob = (rank, rank) if mode == "tucker" else rank
                macs = self._macs(model, site, mode, knob)  # type: ignore[arg-type]
                if macs >= before.macs:
                    continue
                params = self._params(site, mode, knob)  # type: ignore[arg-type]
                err = errors(mode, rank)
                yield Candidate(
                    self.name,
                    (node.name,),
                    (f"spatial separation of {node.name} ({c}->{o}, {kh}x{kw} -> {kh}x1, 1x{kw})" if mode == "spatial" else
                     f"{mode}-side bottleneck of {node.name} ({c}->{o}, {kh}x{kw})") + f" at rank {rank} (est. rel. error {err:.3g})",
                    Cost(before.macs, macs, before.params, params),
                    {"mode": mode, "rank": rank},
                    # MACs saved per unit of squared error: squared errors of independent layers add up.
                    priority=(before.macs - macs) / max(err, 1e-3) ** 2,
                    family=f"{node.name}:{mode}",
                    level=-rank,
                    error=err,
                    kind=mode,
                )

    def _params(self, site: Site, mode: str, rank: int | tuple[int, int]) -> int:
        """Parameters (weights and biases) of the new convs."""
        o, c, kh, kw = site.w.shape
        if mode == "output":
            return rank * c * kh * kw + rank + o * rank + o  # type: ignore[operator]
        if mode == "input":
            return c * rank + o * rank * kh * kw + o  # type: ignore[operator]
        if mode == "spatial":
            return rank * c * kh + o * rank * kw + o  # type: ignore[operator]
        r1, r2 = rank  # type: ignore[misc]
        return c * r1 + r2 * r1 * kh * kw + r2 + o * r2 + o

    # -- apply ---------------------------------------------------------------------------------------
    def _group(self, model: Model, conv_name: str) -> list[gs.Node] | None:
        """The convs this pass put in place of ``conv_name``, input to output, while they still form the chain
        it made (each read only by the next)."""
        prefix = f"{conv_name}{MARK}"
        nodes = [n for n in model.graph.nodes if n.name.startswith(prefix) and n.op == "Conv" and n.inputs and n.outputs]
        produced = {n.outputs[0].name: n for n in nodes}
        heads = [n for n in nodes if n.inputs[0].name not in produced]
        if len(heads) != 1:
            return None
        chain = heads
        while len(chain) < len(nodes):
            readers = [r for r in chain[-1].outputs[0].outputs if r in nodes]
            if len(readers) != 1 or len(chain[-1].outputs[0].outputs) != 1:
                return None
            chain.append(readers[0])
        return chain

    def _original(self, model: Model, conv_name: str) -> tuple[Site, list[gs.Node]] | None:
        """The original conv ``conv_name`` (from ``model.root``) and the chain that replaced it in ``model``."""
        root = model.root
        node = root.node(conv_name) if root is not model else None
        site = self._site(root, node) if node is not None else None
        group = self._group(model, conv_name)
        if not isinstance(site, Site) or not group:
            return None
        if group[0].inputs[0].name != site.conv.inputs[0].name or group[-1].outputs[0].name != site.conv.outputs[0].name:
            return None
        return site, group

    def refresh(self, model: Model, candidate: Candidate) -> Candidate | None:
        """A variant of a conv this pass already factorized, as a replacement of that factorization (from the
        original weights) -- offered only where it lowers MACs further."""
        if len(candidate.nodes) != 1 or MARK in candidate.nodes[0]:
            return None
        found = self._original(model, candidate.nodes[0])
        if found is None:
            return None
        site, group = found
        mode, rank = str(candidate.options["mode"]), int(candidate.options["rank"])
        knob = (rank, rank) if mode == "tucker" else rank
        costs = [node_cost(model, n) for n in group]
        before = sum(c.macs for c in costs)
        macs = self._macs(model, site, mode, knob)  # type: ignore[arg-type]
        if macs >= before:
            return None
        return replace(candidate, nodes=tuple(n.name for n in group),
                       description=f"{candidate.description}, in place of its earlier factorization",
                       cost=Cost(before, macs, sum(c.params for c in costs), self._params(site, mode, knob)))  # type: ignore[arg-type]

    def apply(self, model: Model, candidate: Candidate) -> None:
        mode, rank = str(candidate.options["mode"]), int(candidate.options["rank"])
        if MARK in candidate.nodes[0]:  # re-factorizing a conv factorized before (see refresh)
            found = self._original(model, candidate.nodes[0].split(MARK)[0])
            if found is None or tuple(n.name for n in found[1]) != candidate.nodes:
                raise RewriteError(f"bottleneck: the factorization {candidate.nodes} is no longer in the graph")
            site, old = found
        else:
            node = model.node(candidate.nodes[0])
            found_site = self._site(model, node) if node is not None else None
            if not isinstance(found_site, Site):
                raise RewriteError(f"bottleneck: {candidate.nodes[0]} is no longer a dense conv to factorize")
            site, old = found_site, [found_site.conv]
        if self.calibration is None and not self._warned:
            log.warning("bottleneck: no calibration data; using weight-only SVD, which loses much more accuracy on trained networks")
            self._warned = True
        self._rewrite(model, site, self.fitter.layers(model, site, mode, rank), old)

    def prefetch(self, model: Model, candidates: list[Candidate]) -> None:
        """Calibration samples of every conv the candidates touch, in one run of ``model`` (and of the original)."""
        if self.calibration is None or not self.options.refit:
            return
        sites = {}
        for c in candidates:
            node = model.node(c.nodes[0])
            site = self._site(model, node) if node is not None else None
            if isinstance(site, Site):
                sites[site.conv.name] = site
        if sites:
            self.fitter.sample_many(model, list(sites.values()), fetch=False)

    def _rewrite(self, model: Model, site: Site, layers: list[Layer], old: list[gs.Node] | None = None) -> None:
        """``layers`` in place of ``old`` (the conv by default, or the chain that replaced it before), named after the conv."""
        names = NameFactory(model.graph)
        conv = site.conv
        old = old or [conv]
        dtype = site.w.dtype
        new_nodes = []
        current = old[0].inputs[0]
        outputs = list(old[-1].outputs)
        for i, (w, b, g) in enumerate(layers):
            last = i == len(layers) - 1
            inputs = [current, constant(names, f"{conv.name}{MARK}{i}_W", stored_as(w, dtype))]
            if b is not None:
                inputs.append(constant(names, f"{conv.name}{MARK}{i}_B", stored_as(b, dtype)))
            attrs = {"kernel_shape": list(g.kernel), "strides": list(g.strides), "pads": list(g.pads),
                     "dilations": list(g.dilations), "group": 1}
            out = outputs if last else [gs.Variable(names(f"{conv.name}{MARK}{i}_out"), dtype=dtype)]
            new_nodes.append(gs.Node("Conv", name=names(f"{conv.name}{MARK}{i}"), attrs=attrs, inputs=inputs, outputs=out))
            current = out[0]
        replace_nodes(model.graph, old, new_nodes)
