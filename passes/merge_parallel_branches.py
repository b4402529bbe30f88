"""merge_parallel_branches: parallel convolutions that read the same tensor -> one convolution.

Three kinds of candidate, all exact up to float rounding.

**sum** (RepVGG, ACNet, Diverse Branch Block). An ``Add``, or a tree of ``Add`` nodes, whose leaves are
branches on one tensor ``X``: ``Conv(X, W_i, b_i)`` with the same stride and group and dilation 1, the
identity ``X`` itself, or an inference ``BatchNormalization(X)`` (the identity scaled per channel).
Per spatial axis, the merged kernel has size ``K = max_i k_i`` and the begin/end pads ``P_b, P_e`` of
the branch with the largest kernel on that axis. Branch ``i`` (kernel ``k``, pads ``p_b, p_e``) reads,
for output ``y`` and tap ``u``, the input row ``s*y - p_b + u``; in the merged kernel that row is tap
``u + d`` with ``d = P_b - p_b``. So the branch kernel is zero-padded into ``K`` at offset ``d``::

    W = sum_i pad(W_i, K, d_i)          b = sum_i b_i   (a missing bias is 0)

valid when ``0 <= d <= K - k`` on every axis and every branch has the same output size for every input
size, ``p_b + p_e - k = P_b + P_e - K`` (strides being equal). RepVGG: 3x3 pads 1 + 1x1 pads 0 (+
identity) put the small kernels at the centre; ACNet: 3x3 pads (1,1) + 1x3 pads (0,1) + 3x1 pads (1,0).
The identity is a 1x1 kernel with pads 0, so it needs stride 1 and ``C_in == C_out``. In a conv with
``group`` groups of ``C/group`` channels, output channel ``o`` reads input channel ``o`` as index
``o mod (C/group)`` of its group::

    I[o, o mod (C/group), d] = 1        BN(X) = s*X + t:  s[o] in place of the 1, bias t
    with s = gamma / sqrt(var + eps), t = beta - mean * s

Merged MACs are those of the largest kernel alone, so they fall (or stay level when only identities are
merged in); they must not rise (1x3 + 3x1 alone would become a 3x3). A ``BatchNormalization`` *after* a
conv branch must be folded into the conv first: the default pipeline runs ``fold_batchnorm`` before this
pass.

**concat** (sibling convs concatenated). A run of two or more consecutive ``Concat`` inputs (axis 1)
produced by convs on the same ``X`` with identical kernel, strides, pads, dilations and group 1::

    W = concat_o(W_i)                   b = concat(b_i)  (a missing bias is zeros)

**split** (Inception-style sibling convs feeding different consumers). The same merged conv followed by
a ``Split`` along channels that hands each original output tensor to its consumers. MACs do not change;
it saves reading ``X`` once per sibling and launching several small convs, which the latency gate judges.

All merged weights are computed in float64 (:mod:`passes.branch_kernels`) and stored in the weights' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod

import numpy as np
import onnx_graphsurgeon as gs

from passes.branch_kernels import align_branches, concat_branches, identity_kernel, merge_branches
from passes.common import ConvGeometry, batchnorm_scale_shift, bias_value, conv_geometry, opset, stored_as, weight_value
from rewriter.analysis import node_cost
from rewriter.contract import Candidate, Cost, PatternPass
from rewriter.graph import (
    NameFactory,
    const_value,
    constant,
    constant_operands_reason,
    is_graph_input,
    is_graph_output,
    producer,
    replace_nodes,
    single_consumer,
)
from rewriter.model import Model

# -- pattern / check / rewrite ----------------------------------------------------------------------

SUM, CONCAT, SPLIT = "sum", "concat", "split"
CONV, IDENTITY, BN = "conv", "identity", "batchnorm"


@dataclass(frozen=True)
class Branches:
    """One place to merge: the shared input ``x``, the branches and the node(s) joining them."""

    kind: str  # SUM | CONCAT | SPLIT
    x: gs.Tensor
    #: (CONV | IDENTITY | BN, node); the node is None for a bare identity. CONCAT / SPLIT: convs only.
    leaves: tuple[tuple[str, gs.Node | None], ...]
    #: SUM: the Add nodes, root first; CONCAT: the Concat; SPLIT: none.
    joins: tuple[gs.Node, ...]
    #: Every replaced node, in graph order.
    order: tuple[gs.Node, ...]
    #: CONCAT: the merged run of Concat inputs, [start, stop).
    span: tuple[int, int] = (0, 0)

    @property
    def convs(self) -> list[gs.Node]:
        return [n for kind, n in self.leaves if kind == CONV and n is not None]


def _graph_order(model: Model, nodes: Sequence[gs.Node]) -> tuple[gs.Node, ...]:
    pos = {id(n): i for i, n in enumerate(model.graph.nodes)}
    unique = list({id(n): n for n in nodes}.values())
    return tuple(sorted(unique, key=lambda n: pos.get(id(n), -1)))


def _single_output_of(tensor: gs.Tensor, op: str) -> gs.Node | None:
    """The ``op`` node producing ``tensor`` as its only output, with at least one input."""
    p = producer(tensor)
    if p is None or p.op != op or len(p.outputs) != 1 or p.outputs[0] is not tensor or not p.inputs:
        return None
    return p


def _is_add(node: gs.Node | None) -> bool:
    return node is not None and node.op == "Add" and len(node.inputs) == 2 and len(node.outputs) == 1


def _taps(node: gs.Node | None) -> int:
    """Kernel taps of a conv (0 for anything else), to list the largest branch first."""
    if node is None or node.op != "Conv":
        return 0
    g = conv_geometry(node)
    return prod(g.kernel) if isinstance(g, ConvGeometry) else 0


def _signature(node: gs.Node) -> ConvGeometry | None:
    g = conv_geometry(node)
    return g if isinstance(g, ConvGeometry) else None


class MergeParallelBranches(PatternPass[Branches]):
    name = "merge_parallel_branches"
    summary = (
        "Merge parallel convs on one input: summed branches (RepVGG/ACNet, identity included) into one KxK "
        "conv; concatenated or sibling convs into one conv (+ Split)."
    )
    exact = True

    def __init__(self, split_siblings: bool = False) -> None:
        #: Also merge sibling convs that feed different consumers into one conv + Split. Off by default:
        #: it saves reads of X but measured slower end to end on Inception-style blocks (0.95x).
        self.split_siblings = split_siblings

    def anchor(self, candidate: Candidate) -> str:
        # The root Add, the Concat, or the last sibling conv: each is last in graph order.
        return candidate.nodes[-1]

    # -- pattern -----------------------------------------------------------------------------------
    def match(self, model: Model, node: gs.Node) -> Branches | None:
        if node.op == "Add":
            return self._match_sum(model, node)
        if node.op == "Concat":
            return self._match_concat(model, node)
        if node.op == "Conv" and self.split_siblings:
            return self._match_split(model, node)
        return None

    def _sum_tree(self, model: Model, root: gs.Node) -> Branches | None:
        """The Add tree under ``root`` (through Adds read only by their parent) if all leaves are branches on one X."""
        if not _is_add(root):
            return None
        graph = model.graph
        adds: list[gs.Node] = []
        leaves: list[gs.Tensor] = []
        stack = [root]
        while stack:
            add = stack.pop()
            adds.append(add)
            for t in add.inputs:
                p = producer(t)
                if _is_add(p) and p.outputs[0] is t and single_consumer(graph, t):  # type: ignore[union-attr]
                    stack.append(p)  # type: ignore[arg-type]
                else:
                    leaves.append(t)
        # The shared input: the input of a conv leaf, or a leaf itself (an identity branch).
        options: list[gs.Tensor] = []
        for t in leaves:
            p = producer(t)
            if p is not None and p.op in ("Conv", "BatchNormalization") and p.inputs:
                options.append(p.inputs[0])
            options.append(t)
        for x in {id(t): t for t in options}.values():
            if not isinstance(x, gs.Variable):
                continue
            kinds = []
            for t in leaves:
                if t is x:
                    kinds.append((IDENTITY, None))
                elif (conv := _single_output_of(t, "Conv")) is not None and len(conv.inputs) >= 2 and conv.inputs[0] is x:
                    kinds.append((CONV, conv))
                elif (bn := _single_output_of(t, "BatchNormalization")) is not None and bn.inputs[0] is x:
                    kinds.append((BN, bn))
                else:
                    break
            else:
                if any(kind == CONV for kind, _ in kinds):
                    order = _graph_order(model, [n for _, n in kinds if n is not None] + adds)
                    pos = {id(n): i for i, n in enumerate(order)}
                    # convs (largest kernel first, then graph order), then BN identities, then bare identities
                    kinds.sort(key=lambda kn: ((CONV, BN, IDENTITY).index(kn[0]), -_taps(kn[1]), pos.get(id(kn[1]), 0)))
                    return Branches(SUM, x, tuple(kinds), tuple(adds), order)
        return None

    def _match_sum(self, model: Model, add: gs.Node) -> Branches | None:
        m = self._sum_tree(model, add)
        if m is None:
            return None
        out = add.outputs[0]
        if single_consumer(model.graph, out):
            parent = out.outputs[0]
            if parent is not add and self._sum_tree(model, parent) is not None:
                return None  # part of a larger tree: matched at its root
        return m

    def _match_concat(self, model: Model, concat: gs.Node) -> Branches | None:
        if len(concat.outputs) != 1:
            return None
        keys: list[tuple[int, ConvGeometry, gs.Node] | None] = []
        for t in concat.inputs:
            conv = _single_output_of(t, "Conv")
            sig = _signature(conv) if conv is not None and len(conv.inputs) >= 2 else None
            keys.append(None if sig is None else (id(conv.inputs[0]), sig, conv))  # type: ignore[union-attr]
        start = 0
        while start < len(keys):
            stop = start + 1
            if keys[start] is not None:
                while stop < len(keys) and keys[stop] is not None and keys[stop][:2] == keys[start][:2]:  # type: ignore[index]
                    stop += 1
                if stop - start >= 2:
                    convs = [k[2] for k in keys[start:stop]]  # type: ignore[index]
                    x = convs[0].inputs[0]
                    order = _graph_order(model, convs + [concat])
                    return Branches(CONCAT, x, tuple((CONV, c) for c in convs), (concat,), order, (start, stop))
            start = stop
        return None

    def _match_split(self, model: Model, conv: gs.Node) -> Branches | None:
        if len(conv.inputs) < 2 or len(conv.outputs) != 1 or not isinstance(conv.inputs[0], gs.Variable):
            return None
        x = conv.inputs[0]
        sig = _signature(conv)
        if sig is None:
            return None
        siblings = [
            n for n in {id(n): n for n in x.outputs}.values()
            if n.op == "Conv" and len(n.inputs) >= 2 and n.inputs[0] is x and len(n.outputs) == 1 and _signature(n) == sig
        ]
        if len(siblings) < 2:
            return None
        # Only siblings that feed different consumers; those joined by one Add or Concat are the other kinds.
        users = {id(n): {id(u) for u in n.outputs[0].outputs} for n in siblings}
        keep = [n for n in siblings if all(not (users[id(n)] & users[id(m)]) for m in siblings if m is not n)]
        if len(keep) < 2 or not any(n is conv for n in keep):
            return None
        order = _graph_order(model, keep)
        if order[-1] is not conv:
            return None  # matched at the last sibling
        return Branches(SPLIT, x, tuple((CONV, n) for n in order), (), order)

    def nodes(self, match: Branches) -> tuple[gs.Node, ...]:
        return match.order

    # -- check -------------------------------------------------------------------------------------
    def check(self, model: Model, match: Branches) -> str | None:
        graph = model.graph
        dtypes = set()
        for conv in match.convs:
            reason = constant_operands_reason(graph, conv)
            if reason is not None:
                return reason
            w = weight_value(conv)
            assert w is not None
            if w.ndim < 3:
                return f"{conv.name}: weight of rank {w.ndim}"
            dtypes.add(w.dtype)
            if match.kind != SPLIT:
                out = conv.outputs[0]
                if is_graph_output(graph, out):
                    return f"branch output {out.name!r} is a graph output"
                if len(out.outputs) != 1:
                    return f"branch output {out.name!r} is used elsewhere ({len(out.outputs)} consumers)"
        if len(dtypes) > 1:
            return f"branch weights have different dtypes: {sorted(str(d) for d in dtypes)}"
        if match.kind == SUM:
            return self._check_sum(model, match)
        return self._check_stacked(model, match)

    def _check_sum(self, model: Model, match: Branches) -> str | None:
        graph = model.graph
        geoms = []
        for conv in match.convs:
            g = conv_geometry(conv)
            if isinstance(g, str):
                return g
            if any(d != 1 for d in g.dilations):
                return f"{conv.name}: dilations {list(g.dilations)} are not handled"
            w = weight_value(conv)
            assert w is not None
            if tuple(w.shape[2:]) != g.kernel:
                return f"{conv.name}: kernel_shape {list(g.kernel)} disagrees with weight {tuple(w.shape)}"
            geoms.append((conv, g, w))
        first, g0, w0 = geoms[0]
        for conv, g, w in geoms[1:]:
            if g.strides != g0.strides:
                return f"branches have different strides: {first.name} {list(g0.strides)}, {conv.name} {list(g.strides)}"
            if g.group != g0.group:
                return f"branches have different groups: {first.name} {g0.group}, {conv.name} {g.group}"
            if tuple(w.shape[:2]) != tuple(w0.shape[:2]):
                return f"branches have different channels: {first.name} {tuple(w0.shape[:2])}, {conv.name} {tuple(w.shape[:2])}"
        c_out, c_in = int(w0.shape[0]), int(w0.shape[1]) * g0.group
        for kind, node in match.leaves:
            if kind == CONV:
                continue
            what = "identity branch" if node is None else f"{node.name} (BatchNormalization of the input)"
            if any(s != 1 for s in g0.strides):
                return f"{what} needs stride 1, the convs have strides {list(g0.strides)}"
            if c_in != c_out:
                return f"{what} needs C_in == C_out, the convs map {c_in} -> {c_out} channels"
            if node is not None:
                reason = self._check_bn(graph, node, c_out)
                if reason is not None:
                    return reason
        kernels, pads = self._branch_geometry(match, g0)
        try:
            align_branches(kernels, pads)
        except ValueError as exc:
            return f"padding misaligned: {exc}"
        per_pixel_before = sum(c_out * (c_in // g0.group) * prod(k) for (kind, _), k in zip(match.leaves, kernels) if kind == CONV)
        per_pixel_after = c_out * (c_in // g0.group) * prod(max(k[a] for k in kernels) for a in range(len(kernels[0])))
        if per_pixel_after > per_pixel_before:
            return f"merging would raise MACs per output pixel from {per_pixel_before} to {per_pixel_after}"
        return None

    @staticmethod
    def _check_bn(graph: gs.Graph, bn: gs.Node, channels: int) -> str | None:
        if len(bn.inputs) != 5:
            return f"{bn.name}: {len(bn.inputs)} inputs, expected 5"
        if int(bn.attrs.get("training_mode", 0)) != 0:
            return f"{bn.name}: training_mode is set"
        if int(bn.attrs.get("spatial", 1)) == 0:
            return f"{bn.name}: spatial=0 (per-element statistics) is not handled"
        out = bn.outputs[0]
        if is_graph_output(graph, out):
            return f"branch output {out.name!r} is a graph output"
        if len(out.outputs) != 1:
            return f"branch output {out.name!r} is used elsewhere ({len(out.outputs)} consumers)"
        values = []
        for t in bn.inputs[1:5]:
            if is_graph_input(graph, t):
                return f"{bn.name}: parameter {t.name!r} is a graph input, not a constant"
            v = const_value(t)
            if v is None or v.dtype.kind != "f":
                return f"{bn.name}: parameter {t.name!r} is not a floating-point constant"
            if v.size != channels:
                return f"{bn.name}: parameter {t.name!r} has {v.size} values, expected {channels}"
            values.append(v)
        if not np.all(values[3].astype(np.float64) + float(bn.attrs.get("epsilon", 1e-5)) > 0):
            return f"{bn.name}: var + epsilon is not positive everywhere"
        return None

    @staticmethod
    def _branch_geometry(match: Branches, g0: ConvGeometry) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """Kernel and pads of every leaf; an identity is a 1x1 kernel with no padding."""
        n = len(g0.kernel)
        kernels, pads = [], []
        for kind, node in match.leaves:
            if kind == CONV:
                g = conv_geometry(node)  # type: ignore[arg-type]
                assert isinstance(g, ConvGeometry)
                kernels.append(g.kernel)
                pads.append(g.pads)
            else:
                kernels.append((1,) * n)
                pads.append((0,) * (2 * n))
        return kernels, pads

    def _check_stacked(self, model: Model, match: Branches) -> str | None:
        convs = match.convs
        g = conv_geometry(convs[0])
        if isinstance(g, str):
            return g
        if g.group != 1:
            return f"{convs[0].name}: grouped conv (group {g.group})"
        for conv in convs:
            w = weight_value(conv)
            assert w is not None
            if tuple(w.shape[2:]) != g.kernel or w.shape[1] != weight_value(convs[0]).shape[1]:  # type: ignore[union-attr]
                return f"{conv.name}: weight {tuple(w.shape)} disagrees with its siblings"
        if match.kind == CONCAT:
            concat = match.joins[0]
            rank = len(g.kernel) + 2
            axis = int(concat.attrs.get("axis", 1))
            if axis < 0:
                axis += rank
            if axis != 1:
                return f"{concat.name}: concatenates along axis {concat.attrs.get('axis')}, not channels"
        return None

    # -- cost and description ----------------------------------------------------------------------
    def describe(self, model: Model, match: Branches) -> str:
        if match.kind == SUM:
            parts = []
            for kind, node in match.leaves:
                if kind == CONV:
                    w = weight_value(node)  # type: ignore[arg-type]
                    parts.append("x".join(str(k) for k in w.shape[2:]) if w is not None else "conv")
                else:
                    parts.append("identity" if kind == IDENTITY else "bn(identity)")
            return f"merge {len(parts)} summed branches ({' + '.join(parts)}) at {match.joins[0].name} into one conv"
        names = ", ".join(c.name for c in match.convs)
        if match.kind == CONCAT:
            return f"merge concatenated convs {names} into one conv at {match.joins[0].name}"
        return f"merge sibling convs {names} on {match.x.name!r} into one conv + Split"

    def cost(self, model: Model, match: Branches) -> Cost:
        costs = [node_cost(model, n) for _, n in match.leaves if n is not None]
        macs_before = sum(c.macs for c in costs)
        params_before = sum(c.params for c in costs)
        convs = match.convs
        w0 = weight_value(convs[0])
        assert w0 is not None
        if match.kind == SUM:
            g0 = conv_geometry(convs[0])
            assert isinstance(g0, ConvGeometry)
            kernels, _ = self._branch_geometry(match, g0)
            big = tuple(max(k[a] for k in kernels) for a in range(len(kernels[0])))
            params_after = int(w0.shape[0] * w0.shape[1] * prod(big)) + int(w0.shape[0])
            out = model.static_shape(match.joins[0].outputs[0])
            macs_after = prod(out) * int(w0.shape[1]) * prod(big) if out is not None else 0
            if out is None or any(c.macs == 0 for c in costs if c.op == "Conv"):
                return Cost(0, 0, params_before, params_after)
            return Cost(macs_before, macs_after, params_before, params_after)
        has_bias = any(bias_value(c) is not None for c in convs)
        params_after = sum(int(weight_value(c).size) + (int(weight_value(c).shape[0]) if has_bias else 0) for c in convs)  # type: ignore[union-attr]
        return Cost(macs_before, macs_before, params_before, params_after)

    # -- rewrite -----------------------------------------------------------------------------------
    def rewrite(self, model: Model, match: Branches) -> None:
        if match.kind == SUM:
            self._rewrite_sum(model, match)
        else:
            self._rewrite_stacked(model, match)

    def _rewrite_sum(self, model: Model, match: Branches) -> None:
        convs = match.convs
        g0 = conv_geometry(convs[0])
        assert isinstance(g0, ConvGeometry)
        w0 = weight_value(convs[0])
        assert w0 is not None
        channels = int(w0.shape[0])
        kernels, pads = self._branch_geometry(match, g0)
        big, merged_pads, offsets = align_branches(kernels, pads)
        ones = (1,) * len(big)
        branches: list[tuple[np.ndarray, np.ndarray | None]] = []
        for kind, node in match.leaves:
            if kind == CONV:
                w = weight_value(node)  # type: ignore[arg-type]
                assert w is not None
                branches.append((w, bias_value(node)))  # type: ignore[arg-type]
            elif kind == IDENTITY:
                branches.append((identity_kernel(channels, g0.group, ones), None))
            else:
                gamma, beta, mean, var = (const_value(t) for t in node.inputs[1:5])  # type: ignore[union-attr]
                assert gamma is not None and beta is not None and mean is not None and var is not None
                s, t = batchnorm_scale_shift(gamma.reshape(-1), beta.reshape(-1), mean.reshape(-1), var.reshape(-1),
                                        float(node.attrs.get("epsilon", 1e-5)))  # type: ignore[union-attr]
                branches.append((identity_kernel(channels, g0.group, ones, scale=s), t))
        w, b = merge_branches(branches, big, offsets)
        root = match.joins[0]
        names = NameFactory(model.graph)
        inputs = [match.x, constant(names, f"{root.name}_merged_W", stored_as(w, w0.dtype))]
        if b is not None:
            inputs.append(constant(names, f"{root.name}_merged_B", stored_as(b, w0.dtype)))
        merged = gs.Node(
            "Conv",
            name=names(f"{root.name}_merged"),
            attrs={"kernel_shape": list(big), "strides": list(g0.strides), "pads": list(merged_pads),
                   "dilations": [1] * len(big), "group": g0.group},
            inputs=inputs,
            outputs=list(root.outputs),
        )
        replace_nodes(model.graph, list(match.order), [merged])

    def _rewrite_stacked(self, model: Model, match: Branches) -> None:
        convs = match.convs
        weights = [weight_value(c) for c in convs]
        w, b = concat_branches([(wi, bias_value(c)) for wi, c in zip(weights, convs)])  # type: ignore[misc]
        dtype = weights[0].dtype  # type: ignore[union-attr]
        names = NameFactory(model.graph)
        first = convs[0]
        base = match.joins[0].name if match.kind == CONCAT else first.name
        inputs = [match.x, constant(names, f"{base}_merged_W", stored_as(w, dtype))]
        if b is not None:
            inputs.append(constant(names, f"{base}_merged_B", stored_as(b, dtype)))
        attrs = {k: v for k, v in first.attrs.items() if k != "kernel_shape"}
        attrs["kernel_shape"] = list(w.shape[2:])
        new: list[gs.Node] = []
        if match.kind == CONCAT:
            concat = match.joins[0]
            start, stop = match.span
            ins = list(concat.inputs)
            if start == 0 and stop == len(ins):
                out = list(concat.outputs)
            else:
                merged_out = gs.Variable(names(f"{concat.name}_merged_out"), dtype=dtype)
                out = [merged_out]
                new.append(gs.Node("Concat", name=names(f"{concat.name}_rest"), attrs=dict(concat.attrs),
                                   inputs=ins[:start] + [merged_out] + ins[stop:], outputs=list(concat.outputs)))
            new.insert(0, gs.Node("Conv", name=names(f"{base}_merged"), attrs=attrs, inputs=inputs, outputs=out))
        else:
            merged_out = gs.Variable(names(f"{first.name}_merged_out"), dtype=dtype)
            new.append(gs.Node("Conv", name=names(f"{base}_merged"), attrs=attrs, inputs=inputs, outputs=[merged_out]))
            sizes = [int(wi.shape[0]) for wi in weights]  # type: ignore[union-attr]
            outputs = [c.outputs[0] for c in convs]
            if opset(model) >= 13:
                split_inputs = [merged_out, constant(names, f"{base}_split_sizes", np.asarray(sizes, dtype=np.int64))]
                split_attrs: dict = {"axis": 1}
            else:
                split_inputs, split_attrs = [merged_out], {"axis": 1, "split": sizes}
            new.append(gs.Node("Split", name=names(f"{base}_split"), attrs=split_attrs, inputs=split_inputs, outputs=outputs))
        replace_nodes(model.graph, list(match.order), new)
