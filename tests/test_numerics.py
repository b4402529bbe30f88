"""Output comparison statistics, top-k agreement, the NaN/Inf policy, budget parsing and budget checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rewriter.errors import InputError
from rewriter.validation.numerics import Bound, Budget, OutputStats, compare_arrays, compare_outputs, parse_bounds

NAN, INF = float("nan"), float("inf")


def f32(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


# -- statistics on crafted arrays ----------------------------------------------------------------------


def test_statistics_hand_checked() -> None:
    # r = [1, 2, 3, 4], c differs only in the last element by 0.5.
    s = compare_arrays("y", [f32(1, 2, 3, 4)], [f32(1, 2, 3, 4.5)])
    assert s.name == "y"
    assert s.elements == 4
    assert s.max_abs == pytest.approx(0.5)
    assert s.mean_abs == pytest.approx(0.125)  # 0.5 / 4
    assert s.max_rel == pytest.approx(0.125)  # 0.5 / |4|
    # <c, r> = 1 + 4 + 9 + 18 = 32; |r|^2 = 30; |c|^2 = 1 + 4 + 9 + 20.25 = 34.25
    assert s.cosine == pytest.approx(32 / math.sqrt(30 * 34.25))
    assert s.snr_db == pytest.approx(10 * math.log10(30 / 0.25))  # 20.79 dB
    # 0.5 / (1e-5 + 1e-4 * 4)
    assert s.allclose_ratio == pytest.approx(0.5 / 4.1e-4)
    assert s.nonfinite_mismatch == 0
    assert s.top1 is None and s.top5 is None  # rank 1: not a class-score output


def test_max_rel_takes_the_largest_relative_error_not_the_largest_absolute() -> None:
    # Errors 1.0 on |r| = 100 (rel 0.01) and 0.1 on |r| = 0.5 (rel 0.2).
    s = compare_arrays("y", [f32(100, 0.5)], [f32(101, 0.6)])
    assert s.max_abs == pytest.approx(1.0)
    assert s.max_rel == pytest.approx(0.2, rel=1e-5)
    # allclose ratio: max(1 / (1e-5 + 1e-2), 0.1 / (1e-5 + 5e-5))
    assert s.allclose_ratio == pytest.approx(max(1 / (1e-5 + 1e-2), 0.1 / 6e-5), rel=1e-4)


def test_identical_arrays() -> None:
    a = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    s = compare_arrays("y", [a], [a.copy()])
    assert s.max_abs == 0 and s.mean_abs == 0 and s.max_rel == 0 and s.allclose_ratio == 0
    assert s.cosine == pytest.approx(1.0)
    assert s.snr_db == math.inf
    assert s.top1 == 1.0 and s.top5 == 1.0


def test_cosine_edge_cases() -> None:
    assert compare_arrays("y", [f32(1, -2, 3)], [f32(-1, 2, -3)]).cosine == pytest.approx(-1.0)
    assert compare_arrays("y", [f32(1, 0)], [f32(0, 1)]).cosine == pytest.approx(0.0)
    assert compare_arrays("y", [f32(0, 0)], [f32(0, 0)]).cosine == 1.0  # both all zero: equal
    zero_vs_not = compare_arrays("y", [f32(0, 0)], [f32(1, 0)])
    assert zero_vs_not.cosine == 0.0
    assert zero_vs_not.snr_db == -math.inf


def test_scaled_candidate_keeps_cosine_but_not_snr() -> None:
    r = np.linspace(-1, 1, 50).astype(np.float32)
    s = compare_arrays("y", [r], [r * 1.1])
    assert s.cosine == pytest.approx(1.0, abs=1e-7)
    assert s.snr_db == pytest.approx(20.0, abs=1e-3)  # error is 0.1 r: 10 log10(1 / 0.01)
    assert s.max_rel == pytest.approx(0.1, rel=1e-4)


def test_statistics_pool_all_feeds() -> None:
    # Feed 1 is exact; feed 2 has one error of 2 among 2 elements: mean over 4 elements = 0.5.
    s = compare_arrays("y", [f32(1, 1), f32(2, 2)], [f32(1, 1), f32(2, 4)])
    assert s.elements == 4
    assert s.max_abs == pytest.approx(2.0)
    assert s.mean_abs == pytest.approx(0.5)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        compare_arrays("y", [np.zeros((2, 3))], [np.zeros((3, 2))])


def test_compare_outputs_by_name() -> None:
    ref = [{"a": f32(1, 2), "b": f32(5, 5)}, {"a": f32(3, 4), "b": f32(5, 5)}]
    cand = [{"b": f32(5, 5), "a": f32(1, 2)}, {"b": f32(5, 6), "a": f32(3, 4), "extra": f32(0)}]
    stats = compare_outputs(ref, cand)
    assert list(stats) == ["a", "b"]  # the reference's outputs, in its order; extras ignored
    assert stats["a"].max_abs == 0
    assert stats["b"].max_abs == pytest.approx(1.0)
    assert stats["b"].mean_abs == pytest.approx(0.25)


def test_compare_outputs_errors() -> None:
    with pytest.raises(ValueError, match="different numbers of feeds"):
        compare_outputs([{"a": f32(1)}], [])
    with pytest.raises(ValueError, match="no output named 'b'"):
        compare_outputs([{"a": f32(1), "b": f32(1)}], [{"a": f32(1)}])


def test_compare_outputs_passes_tolerances() -> None:
    ref, cand = [{"a": f32(1.0)}], [{"a": f32(1.001)}]
    assert compare_outputs(ref, cand)["a"].allclose_ratio > 1
    assert compare_outputs(ref, cand, rtol=1e-2)["a"].allclose_ratio < 1


# -- top-k agreement -----------------------------------------------------------------------------------


def crafted_scores() -> tuple[np.ndarray, np.ndarray]:
    """4 rows x 10 classes. The reference's top-1 class of row i is i; in the candidate it ranks
    1st (row 0), 1st (row 1), 3rd (row 2) and 7th (row 3)."""
    ref = np.tile(np.arange(10, dtype=np.float32) * 0.1, (4, 1))
    for i in range(4):
        ref[i, i] = 5.0
    cand = ref.copy()
    cand[1] += 0.01  # small noise that keeps the argmax
    # Row 2: class 2 is pushed below two other classes (9 and 8) -> rank 3.
    cand[2, 9], cand[2, 8] = 7.0, 6.0
    # Row 3: six classes above class 3 -> rank 7.
    for j, v in zip((4, 5, 6, 7, 8, 9), (6, 7, 8, 9, 10, 11)):
        cand[3, j] = v
    return ref, cand


def test_crafted_scores_have_the_intended_ranks() -> None:
    ref, cand = crafted_scores()
    ranks = [int(np.where(np.argsort(-cand[i], kind="stable") == i)[0][0]) + 1 for i in range(4)]
    assert ranks == [1, 1, 3, 7]
    assert list(np.argmax(ref, axis=1)) == [0, 1, 2, 3]


def test_top1_and_top5_agreement() -> None:
    ref, cand = crafted_scores()
    s = compare_arrays("logits", [ref], [cand])
    assert s.top1 == pytest.approx(0.5)  # rows 0 and 1
    assert s.top5 == pytest.approx(0.75)  # rows 0, 1 and 2 (rank 3 <= 5)
    assert s.value("top1_drop") == pytest.approx(0.5)
    assert s.value("top5_drop") == pytest.approx(0.25)


def test_topk_pools_feeds_by_rows() -> None:
    ref, cand = crafted_scores()
    s = compare_arrays("logits", [ref[:2], ref[2:]], [cand[:2], cand[2:]])
    assert s.top1 == pytest.approx(0.5) and s.top5 == pytest.approx(0.75)


def test_top5_needs_more_than_five_classes() -> None:
    ref, cand = crafted_scores()
    s = compare_arrays("logits", [ref[:, :5]], [cand[:, :5]])
    # Only columns 0..4 remain: rows 0-2 keep their argmax (row 2's rivals were columns 8 and 9),
    # row 3 loses it to column 4.
    assert s.top1 == pytest.approx(0.75)
    assert s.top5 is None


@pytest.mark.parametrize("shape", [(4,), (4, 1), (2, 3, 4), (1, 10, 2, 2)])
def test_topk_absent_for_non_class_score_outputs(shape: tuple[int, ...]) -> None:
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    s = compare_arrays("y", [a], [a])
    assert s.top1 is None and s.top5 is None
    assert s.value("top1_drop") is None and s.value("top5_drop") is None


# -- NaN / Inf policy ----------------------------------------------------------------------------------


def test_nan_in_candidate_where_reference_is_finite_fails_both_gates() -> None:
    stats = compare_outputs([{"y": f32(1, 2, 3, 4)}], [{"y": f32(1, NAN, 3, 4)}])
    s = stats["y"]
    assert s.nonfinite_mismatch == 1
    # The other statistics are over positions finite in both: here they agree exactly.
    assert s.max_abs == 0 and s.cosine == pytest.approx(1.0)
    budget = Budget.parse("cosine>=0.9")
    for exact in (True, False):
        problems = budget.failures(stats, exact)
        assert problems, f"exact={exact}: a NaN where the reference is finite must fail"
        assert any("'y'" in p and "NaN/Inf" in p for p in problems)


def test_nan_at_the_same_positions_is_ok() -> None:
    stats = compare_outputs([{"y": f32(1, NAN, 3, NAN)}], [{"y": f32(1, NAN, 3.00001, NAN)}])
    s = stats["y"]
    assert s.nonfinite_mismatch == 0
    assert s.elements == 4
    assert s.allclose_ratio < 1
    assert Budget().failures(stats, exact=True) == []
    assert Budget().failures(stats, exact=False) == []


def test_finite_candidate_where_reference_is_nan_is_a_mismatch() -> None:
    s = compare_arrays("y", [f32(1, NAN)], [f32(1, 0)])
    assert s.nonfinite_mismatch == 1


@pytest.mark.parametrize(
    ("ref", "cand", "mismatches"),
    [
        (f32(INF, -INF, 1), f32(INF, -INF, 1), 0),  # matching infinities
        (f32(INF, 1), f32(-INF, 1), 1),  # sign flipped
        (f32(INF, 1), f32(1e30, 1), 1),  # finite where the reference is infinite
        (f32(INF, 1), f32(NAN, 1), 1),
        (f32(1, 1), f32(1, -INF), 1),  # infinite where the reference is finite
        (f32(NAN, INF, 2), f32(INF, NAN, 2), 2),
    ],
)
def test_inf_matching(ref: np.ndarray, cand: np.ndarray, mismatches: int) -> None:
    stats = {"y": compare_arrays("y", [ref], [cand])}
    assert stats["y"].nonfinite_mismatch == mismatches
    assert bool(Budget().failures(stats, exact=True)) == bool(mismatches)


# -- parse_bounds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cosine>=0.99", Bound("cosine", ">=", 0.99)),
        ("cosine@logits>=0.99", Bound("cosine", ">=", 0.99, "logits")),
        ("top1-drop<=0.01", Bound("top1_drop", "<=", 0.01)),
        ("top5_drop<=0", Bound("top5_drop", "<=", 0.0)),
        ("max-abs@out:0<=1e-3", Bound("max_abs", "<=", 1e-3, "out:0")),
        ("  mean-abs  <=  2.5e-4 ", Bound("mean_abs", "<=", 2.5e-4)),
        ("MAX_REL<=0.1", Bound("max_rel", "<=", 0.1)),
        ("snr-db>=30", Bound("snr_db", ">=", 30.0)),
        ("top1>=0.9", Bound("top1", ">=", 0.9)),
        ("max-abs<=inf", Bound("max_abs", "<=", math.inf)),
    ],
)
def test_parse_single_bound(text: str, expected: Bound) -> None:
    assert parse_bounds(text) == (expected,)


def test_parse_several_bounds_and_round_trip() -> None:
    bounds = parse_bounds("cosine>=0.999, top1-drop<=0.01,,cosine@logits>=0.99")
    assert bounds == (
        Bound("cosine", ">=", 0.999),
        Bound("top1_drop", "<=", 0.01),
        Bound("cosine", ">=", 0.99, "logits"),
    )
    assert [str(b) for b in bounds] == ["cosine>=0.999", "top1-drop<=0.01", "cosine@logits>=0.99"]
    assert parse_bounds(",".join(str(b) for b in bounds)) == bounds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("accuracy>=0.9", "unknown metric"),
        ("cosine<=0.99", "bounded with >="),
        ("max-abs>=0.1", "bounded with <="),
        ("top1-drop>=0.01", "bounded with <="),
        ("garbage", "expected METRIC"),
        ("cosine=0.99", "expected METRIC"),
        ("cosine>=high", "expected METRIC"),
        ("cosine>=0.9 extra", "expected METRIC"),
        ("cosine>=1e", "not a number"),
        ("cosine>=..", "not a number"),
        ("cosine>=-", "not a number"),
        ("", "empty"),
        (" , ,", "empty"),
    ],
)
def test_parse_bounds_errors(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace(".", r"\.")):
        parse_bounds(text)


def test_bound_holds() -> None:
    assert Bound("cosine", ">=", 0.99).holds(0.99)
    assert not Bound("cosine", ">=", 0.99).holds(0.989)
    assert Bound("max_abs", "<=", 1e-3).holds(1e-3)
    assert not Bound("max_abs", "<=", 1e-3).holds(1.1e-3)


# -- Budget.failures -----------------------------------------------------------------------------------


def stats_for(**pairs: tuple[np.ndarray, np.ndarray]) -> dict[str, OutputStats]:
    return {name: compare_arrays(name, [r], [c]) for name, (r, c) in pairs.items()}


def test_exact_budget_names_the_offending_output() -> None:
    r = np.linspace(1, 2, 8).astype(np.float32)
    stats = stats_for(good=(r, r.copy()), bad=(r, r * 1.01))
    problems = Budget().failures(stats, exact=True)
    assert len(problems) == 1
    assert "'bad'" in problems[0] and "'good'" not in problems[0]
    assert "allclose" in problems[0]


def test_exact_gate_at_its_tolerance() -> None:
    r = np.ones(4, np.float32)
    inside = stats_for(y=(r, r + 5e-5))  # 5e-5 <= 1e-5 + 1e-4 * 1
    outside = stats_for(y=(r, r + 2e-4))
    assert Budget().failures(inside, exact=True) == []
    assert Budget().failures(outside, exact=True)
    # The gate reads allclose_ratio, so looser tolerances are applied when comparing (as the Judge does).
    loose = Budget(rtol=1e-3)
    stats = compare_outputs([{"y": r}], [{"y": r + 2e-4}], rtol=loose.rtol, atol=loose.atol)
    assert loose.failures(stats, exact=True) == []


def test_lossy_budget_names_output_and_bound() -> None:
    ref, cand = crafted_scores()
    stats = stats_for(logits=(ref, cand))
    problems = Budget.parse("top1-drop<=0.25").failures(stats, exact=False)
    assert len(problems) == 1
    assert "'logits'" in problems[0] and "top1-drop" in problems[0] and "0.5" in problems[0]
    assert Budget.parse("top1-drop<=0.5,top5-drop<=0.25").failures(stats, exact=False) == []
    assert len(Budget.parse("top1-drop<=0.5,top5-drop<=0.2").failures(stats, exact=False)) == 1


def test_lossy_budget_ignores_exact_gate() -> None:
    r = np.linspace(1, 2, 8).astype(np.float32)
    stats = stats_for(y=(r, r * 1.01))
    assert Budget().failures(stats, exact=True)
    assert Budget.parse("cosine>=0.99").failures(stats, exact=False) == []


def test_global_topk_bound_skips_non_class_outputs() -> None:
    ref, cand = crafted_scores()
    feat = np.ones((1, 4, 2, 2), np.float32)
    stats = stats_for(logits=(ref, cand), features=(feat, feat))
    problems = Budget.parse("top1-drop<=0.6").failures(stats, exact=False)
    assert problems == []
    named = Budget.parse("top1-drop@features<=0.6").failures(stats, exact=False)
    assert len(named) == 1 and "'features'" in named[0] and "does not apply" in named[0]


def test_per_output_bounds_apply_to_that_output_only() -> None:
    r = np.linspace(1, 2, 8).astype(np.float32)
    stats = stats_for(a=(r, r + 0.05), b=(r, r + 0.05))
    budget = Budget.parse("max-abs@a<=0.1,max-abs@b<=0.01")
    problems = budget.failures(stats, exact=False)
    assert len(problems) == 1
    assert problems[0].startswith("output 'b'")
    assert "max-abs@b<=0.01" in problems[0]
    # A global bound plus a tighter per-output bound: both apply to that output.
    problems = Budget.parse("max-abs<=0.1,max-abs@a<=0.01").failures(stats, exact=False)
    assert [p.split(":")[0] for p in problems] == ["output 'a'"]


def test_bound_naming_a_nonexistent_output_is_an_input_error() -> None:
    r = np.ones(3, np.float32)
    stats = stats_for(logits=(r, r))
    with pytest.raises(InputError, match="'probs'"):
        Budget.parse("cosine@probs>=0.99").failures(stats, exact=False)


def test_budget_describe_and_default() -> None:
    assert Budget().describe(exact=True) == "allclose(rtol=0.0001, atol=1e-05)"
    assert Budget().describe(exact=False) == "cosine>=0.999,top1-drop<=0.01"
    assert Budget.parse(None) == Budget()
    assert Budget.parse("cosine>=0.9", rtol=1e-3).rtol == 1e-3


def test_to_dict_is_json_safe() -> None:
    import json

    s = compare_arrays("y", [f32(1, 2)], [f32(1, 2)])
    d = s.to_dict()
    assert d["snr_db"] is None and d["max_abs"] == 0.0
    json.dumps(d, allow_nan=False)


def test_spread_error_is_relative_to_the_spread_across_feeds() -> None:
    from rewriter.validation.numerics import spread_error

    ref = [{"y": np.array([1.0, 10.0])}, {"y": np.array([3.0, 10.0])}]  # varies by +-1 in the first element only
    assert spread_error(ref, ref) == 0.0
    moved = [{"y": np.array([1.5, 10.0])}, {"y": np.array([3.0, 10.0])}]
    assert spread_error(ref, moved) == pytest.approx(np.sqrt(0.25 / 2.0))  # 0.5^2 over a spread of 1^2 + 1^2
    # Several tensors: the mean of their squared relative errors; NaN positions are ignored.
    two = [{"y": r["y"], "z": np.array([0.0, 2.0, np.nan]) + k} for k, r in enumerate(ref)]
    moved_two = [{"y": m["y"], "z": t["z"] + np.array([0.0, 1.0, 5.0])} for m, t in zip(moved, two)]
    assert spread_error(two, moved_two) == pytest.approx(np.sqrt((0.25 / 2.0 + 2.0 / 1.0) / 2))
    # One feed, or a constant tensor: measured against its magnitude instead.
    assert spread_error([{"y": np.array([3.0, 4.0])}], [{"y": np.array([3.0, 4.5])}]) == pytest.approx(0.1)
