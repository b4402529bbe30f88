"""The guarded int8 search (rewriter.precision): onnxruntime's quantize_static on tiny conv chains, one node made
int8-sensitive by an outlier channel, the bisection's trial count, the held-out back-off and the island hook."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rewriter.errors import InputError
from rewriter.precision import (
    BudgetCheck,
    Int8Options,
    Precision,
    Quantizer,
    guarded_int8,
    islands,
    prepare,
    quantize_int8,
    search_int8,
    smallest_holding,
)
from rewriter.validation.numerics import Budget
from tests.helpers import parse
from tests.test_qdq import QDQ

BUDGET = Budget.parse("cosine>=0.999")


def chain(n: int, sensitive: int | None = None, opset: int = 17) -> onnx.ModelProto:
    """``n`` 3x3 convs (8 channels, Relu between them) on a 1x8x8x8 input; with ``sensitive = s``, conv ``s``
    writes channel 0 about 1000x larger than the rest and conv ``s + 1`` scales it back, so the uint8 tensor
    between them keeps channel 0 and loses the others."""
    decl, body, prev = [], [], "X"
    for i in range(n):
        decl.append(f"float[8, 8, 3, 3] W{i}, float[8] B{i}")
        out = "Y" if i == n - 1 else f"R{i}"
        body.append(f"{'A' + str(i) if i < n - 1 else 'Y'} = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> ({prev}, W{i}, B{i})")
        if i < n - 1:
            body.append(f"{out} = Relu (A{i})")
        prev = out
    model = parse(f"""<ir_version: 8, opset_import: ["" : {opset}]>
        g (float[1, 8, 8, 8] X) => (float[1, 8, 8, 8] Y) <{', '.join(decl)}> {{ {' '.join(body)} }}""")
    weights = {t.name: t for t in model.graph.initializer}

    def edit(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        weights[name].CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(weights[name]).copy()).astype(np.float32), name))

    for i in range(n):
        edit(f"W{i}", lambda a: a / math.sqrt(72))
        edit(f"B{i}", lambda a: a * 0.1)
    if sensitive is not None:
        edit(f"W{sensitive}", lambda a: np.concatenate([a[:1] * 1000, a[1:]]))
        edit(f"B{sensitive}", lambda a: np.concatenate([np.full(1, 1000.0), a[1:]]))
        edit(f"W{sensitive + 1}", lambda a: np.concatenate([a[:, :1] * 1e-3, a[:, 1:]], axis=1))
    return model


def feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"X": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(count)]


def float_convs(model: onnx.ModelProto) -> int:
    """Convs whose weight is a float initializer (kept float by the quantizer)."""
    weights = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return sum(n.op_type == "Conv" and n.input[1] in weights for n in model.graph.node)


def test_quantization_is_deterministic_and_reuses_one_calibration() -> None:
    model, cal = chain(4), feeds(4, 0)
    first, _ = quantize_int8(model, cal)
    second, _ = quantize_int8(model, cal)
    assert first.SerializeToString() == second.SerializeToString()
    assert float_convs(first) == 0 and sum(n.op_type == "DequantizeLinear" for n in first.graph.node) >= 8
    prepared = prepare(model)
    with Quantizer(prepared, cal) as q:
        full = q.quantize()
        assert q.cache.is_file()  # the calibration ranges, written once
        stamp = q.cache.stat().st_mtime_ns
        partial = q.quantize([prepared.model.graph.node[0].name])
        assert q.cache.stat().st_mtime_ns == stamp  # reused, not recomputed
    assert full.SerializeToString() == first.SerializeToString()
    assert float_convs(partial) == 1
    weights = [t for t in first.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert weights and all(len(numpy_helper.to_array(s)) == 8 for s in first.graph.initializer if s.name.endswith("W0_scale"))


def test_a_quantized_model_is_refused() -> None:
    with pytest.raises(InputError, match="already quantized"):
        prepare(parse(QDQ))


def test_opset_11_is_converted_and_reported() -> None:
    prepared = prepare(chain(3, opset=11))
    assert any("opset 11 to 13" in note for note in prepared.normalizations)
    assert max(o.version for o in prepared.model.opset_import if o.domain in ("", "ai.onnx")) == 13
    model, _ = quantize_int8(chain(3, opset=11), feeds(2, 0))
    assert any(n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute) for n in model.graph.node)


def test_the_sensitive_node_stays_float_and_the_rest_goes_int8() -> None:
    model = chain(8, sensitive=4)
    full, _ = quantize_int8(model, feeds(8, 0))
    check = BudgetCheck(model, {"validation": feeds(8, 1), "test": feeds(8, 2)}, BUDGET)
    assert check(full, "validation")  # plain int8 breaks the budget
    result = guarded_int8(model, feeds(8, 0), feeds(8, 1), feeds(8, 2), BUDGET)
    by_rank = {d.rank: d for d in result.nodes}
    assert by_rank[1].precision is Precision.FLOAT and "rank 1" in by_rank[1].reason
    assert sorted(result.float_nodes) == sorted([by_rank[1].node, *[d.node for d in result.nodes if "produces the input" in d.reason]])
    assert result.counts == {"int8": 6, "float": 2} and result.status == "mixed"
    assert float_convs(result.model) == 2
    assert not check(result.model, "validation") and not check(result.model, "test")
    # The sensitive pair is convs 4 and 5 of the chain: the 5th and 6th units in graph order.
    assert [d.node for d in result.nodes][4:6] == sorted(result.float_nodes, key=[d.node for d in result.nodes].index)


def test_full_int8_is_kept_when_it_holds() -> None:
    model = chain(4)
    result = guarded_int8(model, feeds(8, 0), feeds(8, 1), feeds(8, 2), Budget.parse("cosine>=0.99"))
    assert result.status == "int8" and result.counts["float"] == 0
    assert [(t.purpose, t.split) for t in result.trials] == [("full int8", "validation"), ("k=0 held-out confirmation", "test")]


@pytest.mark.parametrize("n", [1, 2, 7, 64, 100])
def test_smallest_holding_takes_logarithmically_many_trials(n: int) -> None:
    bound = 2 * math.ceil(math.log2(max(n, 2))) + 1
    for threshold in range(1, n + 2):
        calls: list[int] = []

        def holds(k: int, t: int = threshold) -> bool:
            calls.append(k)
            return k >= t

        found = smallest_holding(holds, 0, n)
        assert found == (threshold if threshold <= n else None)
        assert len(calls) <= bound, (threshold, calls)
        assert len(set(calls)) == len(calls)


def _fake_check(validation_needs: int, test_needs: int) -> Callable[[onnx.ModelProto, str], Sequence[str]]:
    """A budget that holds when at least ``*_needs`` convs are float (validation / test)."""

    def check(model: onnx.ModelProto, split: str) -> list[str]:
        need = validation_needs if split == "validation" else test_needs
        have = float_convs(model)
        return [] if have >= need else [f"{split}: {have} float conv(s), {need} needed"]

    return check


def test_the_search_takes_logarithmically_many_trials() -> None:
    n = 32
    result = search_int8(chain(n), feeds(4, 0), _fake_check(11, 0))
    bisection = [t for t in result.trials if t.purpose.endswith("on validation")]
    refinement = [t for t in result.trials if t.purpose.startswith("refine")]
    assert 5 <= len(bisection) <= 2 * math.ceil(math.log2(n)) + 1  # galloping to k >= 11, then bisection
    assert 1 <= len(refinement) <= 2 * math.ceil(math.log2(2 * n)) + 1
    assert len(result.trials) == 1 + len(bisection) + len(refinement) + 1  # with full int8 and the held-out check
    assert float_convs(result.model) == 11  # the refinement put back every unit the budget did not need
    assert not result.trials[-1].failures


def test_a_held_out_failure_keeps_more_nodes_float() -> None:
    model = chain(12)
    only_validation = search_int8(model, feeds(4, 0), _fake_check(2, 0), has_test=False)
    result = search_int8(model, feeds(4, 0), _fake_check(2, 5))
    assert float_convs(only_validation.model) == 2
    assert float_convs(result.model) >= 5
    assert any(t.split == "test" and not t.holds for t in result.trials)
    assert any("held-out split failed" in d.reason for d in result.nodes if d.precision is Precision.FLOAT)
    assert result.trials[-1].split == "test" and result.trials[-1].holds


def test_islands_that_do_not_pay_go_float() -> None:
    model = chain(6)
    prepared = prepare(model)
    units = [n.name for n in prepared.model.graph.node if n.op_type == "Conv"]
    assert islands(prepared.model, units) == [frozenset(units)]
    assert len(islands(prepared.model, units[:2] + units[3:])) == 2
    asked: list[frozenset[str]] = []

    def pays(island: frozenset[str], with_int8: onnx.ModelProto, without: onnx.ModelProto) -> bool:
        asked.append(island)
        assert float_convs(without) == float_convs(with_int8) + len(island)
        return len(island) > 2  # islands of one or two nodes do not pay

    result = search_int8(model, feeds(4, 0), _fake_check(1, 0), has_test=False, island_pays=pays)
    assert asked and all(len(i) <= 5 for i in asked)
    small = [i for i in asked if len(i) <= 2]
    assert small and len(asked) == 2, asked
    assert result.rolled_back_islands == [tuple(sorted(i)) for i in small]
    for island in small:
        assert all(d.precision is Precision.FLOAT and "island" in d.reason for d in result.nodes if d.node in island)


def test_activations_option_is_checked() -> None:
    with pytest.raises(InputError):
        Int8Options(activations="int4")
    model, _ = quantize_int8(chain(2), feeds(2, 0), options=Int8Options(activations="int8"))
    zero_points = [t for t in model.graph.initializer if t.name in ("X_zero_point", "R0_zero_point")]
    assert len(zero_points) == 2 and all(t.data_type == onnx.TensorProto.INT8 for t in zero_points)


def test_calibration_in_chunks_gives_the_same_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import rewriter.precision.int8 as int8

    model, cal = chain(3), feeds(8, 0)
    chunked, _ = quantize_int8(model, cal)  # ranges merged every 4 feeds
    monkeypatch.setattr(int8, "CALIBRATION_CHUNK", 8)
    whole, _ = quantize_int8(model, cal)
    monkeypatch.setattr(int8, "CALIBRATION_CHUNK", 1)
    single, _ = quantize_int8(model, cal[:1])
    assert chunked.SerializeToString() == whole.SerializeToString()
    assert single.SerializeToString() != whole.SerializeToString()  # the ranges do depend on the feeds


def test_a_budget_no_model_holds_returns_the_input() -> None:
    model = chain(4)
    result = search_int8(model, feeds(4, 0), lambda m, split: [f"{split}: never"])
    assert result.status == "broken" and result.model is model
    assert result.counts == {"int8": 0, "float": 4} and all("even with every node in float" in d.reason for d in result.nodes)
    assert len(result.trials) <= 1 + 2 * math.ceil(math.log2(4)) + 1


def test_full_int8_failing_only_the_held_out_split_is_backed_off() -> None:
    result = search_int8(chain(8), feeds(4, 0), _fake_check(0, 3))
    assert result.trials[0].purpose == "full int8" and result.trials[0].holds
    assert float_convs(result.model) >= 3 and result.status == "mixed"
    assert all(d.rank is not None for d in result.nodes)  # ranked once the held-out split failed


def test_nsr_is_the_worst_channels() -> None:
    from rewriter.precision.sensitivity import nsr

    ref = np.array([[1.0, 1e-3], [0.99, 2e-3]])  # class scores: one near 1, one near 0
    cand = np.array([[1.0, 0.0], [0.99, 3.9e-3]])  # the small one lost to 8-bit steps
    assert nsr([cand], [ref]) == pytest.approx((1e-6 + 1.9e-3**2) / (1e-6 + 4e-6))
    assert nsr([ref], [ref]) == 0.0
    assert nsr([np.ones(3)], [np.zeros(3)]) == math.inf


def test_the_refinement_puts_unneeded_float_nodes_back_in_int8() -> None:
    result = search_int8(chain(8), feeds(4, 0), _fake_check(1, 0))
    assert float_convs(result.model) == 1 and result.counts == {"int8": 7, "float": 1}
    back = [d for d in result.nodes if "put back in int8 by the refinement" in d.reason]
    assert back and all(d.precision is Precision.INT8 for d in back)
    sensitive = search_int8(chain(8, sensitive=4), feeds(8, 0), BudgetCheck(chain(8, sensitive=4), {"validation": feeds(8, 1)}, BUDGET),
                            has_test=False)
    assert [t.holds for t in sensitive.trials if t.purpose.startswith("refine")] == [False]  # its producer is needed
    assert sensitive.counts == {"int8": 6, "float": 2}


def test_without_the_calibration_cache_each_call_calibrates_to_the_same_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import rewriter.precision.int8 as int8

    model, cal = chain(3), feeds(4, 0)
    cached, _ = quantize_int8(model, cal, exclude=["Conv_2"])
    monkeypatch.setattr(int8, "_cache_supported", lambda: False)  # an onnxruntime before calibration_cache_path
    prepared = prepare(model)
    with Quantizer(prepared, cal) as q:
        q.quantize()
        again = q.quantize(["Conv_2"])
        assert not q.cache.exists()
    assert again.SerializeToString() == cached.SerializeToString()
