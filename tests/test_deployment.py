"""Deployment profiles: threads and batch a model runs at; every latency verdict must pay on each profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from rewriter.errors import InputError
from rewriter.model import Model
from rewriter.pipeline import optimize
from rewriter.validation.deployment import (
    DeploymentProfile,
    batch_error,
    profiles_from,
    rebatched,
    rows,
    shapes_at,
)
from rewriter.validation.feeds import FeedSet
from rewriter.validation.judge import Judge, ValidationConfig
from rewriter.validation.latency import LatencyComparison, TimingOptions
from rewriter.validation.stats import RatioCI
from tests.helpers import assert_valid, parse

FAST = TimingOptions(min_pairs=6, max_pairs=8, time_budget_s=0.3)

# A conv + BN (fold_batchnorm: an exact rewrite) whose batch dim is symbolic.
DYNAMIC = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 12, 12] X) => (float[N, 8, 12, 12] Y)
    <float[8, 4, 3, 3] W, float[8] s, float[8] b, float[8] m, float[8] var> {
        C = Conv <pads = [1, 1, 1, 1]> (X, W)
        Y = BatchNormalization (C, s, b, m, var)
    }
"""
# Two 1x1 convs in a row (fuse_1x1_chain; onnxruntime does not fuse them itself), dynamic batch.
CHAIN_1X1 = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16, 12, 12] X) => (float[N, 16, 12, 12] Y)
    <float[64, 16, 1, 1] Wa, float[16, 64, 1, 1] Wb> {
        A = Conv (X, Wa)
        Y = Conv (A, Wb)
    }
"""
FIXED = DYNAMIC.replace("float[N, 4, 12, 12] X", "float[1, 4, 12, 12] X").replace("float[N, 8, 12, 12] Y", "float[1, 8, 12, 12] Y")

TWO = (DeploymentProfile(1, 1), DeploymentProfile(2, 4))


# -- the pure parts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("threads=2,batch=8", DeploymentProfile(2, 8)),
    (" batch=4 ", DeploymentProfile(1, 4)),
    ("threads=3", DeploymentProfile(3, 1)),
])
def test_a_profile_parses_from_threads_and_batch(text: str, want: DeploymentProfile) -> None:
    assert DeploymentProfile.parse(text) == want
    assert DeploymentProfile.parse(want.label) == want


@pytest.mark.parametrize("text, words", [
    ("threads=two", "whole number"),
    ("cores=2", "keys threads, batch"),
    ("threads=2,threads=3", "given twice"),
    ("", "expected threads=T,batch=B"),
    ("batch=0", "batch must be 1.."),
    ("threads=0", "threads must be 1.."),
])
def test_a_bad_profile_is_a_one_line_input_error(text: str, words: str) -> None:
    with pytest.raises(InputError, match=words):
        DeploymentProfile.parse(text)


def test_profiles_come_from_threads_and_batch_or_from_profile_flags_but_not_both() -> None:
    assert profiles_from(2, 8) == (DeploymentProfile(2, 8),)
    assert profiles_from(profiles=["threads=1,batch=1", "threads=2,batch=8"]) == (DeploymentProfile(1, 1), DeploymentProfile(2, 8))
    with pytest.raises(InputError, match="either --threads/--batch or --profile"):
        profiles_from(2, 1, ["threads=1"])
    with pytest.raises(InputError, match="twice"):
        profiles_from(profiles=["threads=1", "threads=1,batch=1"])


def test_rows_stack_feeds_in_order_and_cycle_when_short() -> None:
    feeds = [{"x": np.full((1, 2), i, np.float32), "k": np.int64(7)} for i in range(3)]
    five = rows(feeds, 5)
    assert five["x"][:, 0].tolist() == [0, 1, 2, 0, 1] and five["k"] == 7
    assert rows(feeds, 2, start=2)["x"][:, 0].tolist() == [2, 0]
    batched = rebatched(feeds, 2)
    assert [f["x"][:, 0].tolist() for f in batched] == [[0, 1], [2, 0]]  # every row once, the last filled from the start
    assert rebatched(batched, 2) is batched  # already at the batch: the very same feeds
    assert [f["x"].shape[0] for f in rebatched(batched, 1)] == [1, 1, 1, 1]


def test_feeds_whose_inputs_disagree_on_the_batch_cannot_be_rebatched() -> None:
    with pytest.raises(InputError, match="disagree on the batch dim"):
        rebatched([{"a": np.zeros((1, 2)), "b": np.zeros((2, 2))}], 4)


def test_a_fixed_batch_dim_refuses_another_batch() -> None:
    assert batch_error(parse(DYNAMIC), 8) is None
    assert batch_error(parse(FIXED), 1) is None
    why = batch_error(parse(FIXED), 8)
    assert why is not None and "'X' fixes its batch dim at 1" in why
    assert shapes_at({"X": (1, 4, 12, 12), "s": ()}, 8) == {"X": (8, 4, 12, 12), "s": ()}


# -- the judge -----------------------------------------------------------------------------------------
def _comparison(speedup: float) -> LatencyComparison:
    return LatencyComparison(speedup * 1e-3, 1e-3, RatioCI(speedup, 0.98 * speedup, 1.02 * speedup, 10), 1)


class ProfiledJudge(Judge):
    """Region timings by profile, from a table: how a rewrite fares at each deployment."""

    table: dict[DeploymentProfile, float] = {}
    timed: list[DeploymentProfile] = []

    def region_latency(self, accepted, trial, candidate, profile=None):  # type: ignore[no-untyped-def]
        p = self._profile(profile)
        self.timed.append(p)
        return _comparison(self.table[p])

    def model_latency(self, base, candidate, profile=None):  # type: ignore[no-untyped-def]
        return _comparison(self.table[self._profile(profile)])

    def same_deployed(self, base, candidate):  # type: ignore[no-untyped-def]
        return False  # the table above is what is under test (onnxruntime would fold this BN itself)


def _run(table: dict[DeploymentProfile, float]):  # type: ignore[no-untyped-def]
    model = Model.from_source(parse(DYNAMIC))
    config = ValidationConfig(timing=FAST, profiles=TWO, defer_exact=False)  # each rewrite timed at each profile
    judge = ProfiledJudge(model, None, config)
    judge.table, judge.timed = table, []
    return optimize(model, ["fold_batchnorm"], config=config, judge=judge), judge


def test_a_rewrite_that_pays_on_every_profile_is_kept_with_each_speedup() -> None:
    result, judge = _run({TWO[0]: 1.3, TWO[1]: 1.1})
    (d,) = result.decisions
    assert d.kept and judge.timed == list(TWO)
    assert [p.profile for p in d.verdict.profiles] == list(TWO)
    assert "threads=2,batch=4: subgraph speedup 1.1" in d.reason
    assert [p.profile for p in result.profile_latency] == list(TWO)
    assert result.profile_latency[1].latency.ci.speedup == pytest.approx(1.1)


def test_a_rewrite_slower_on_a_later_profile_is_rolled_back_and_says_where() -> None:
    result, _ = _run({TWO[0]: 1.3, TWO[1]: 0.8})
    (d,) = result.decisions
    assert not d.kept and d.outcome.value == "latency"
    assert d.reason.endswith("at threads=2,batch=4") and "slower" in d.reason
    assert result.model is not None and [n.op_type for n in result.model.graph.node] == ["Conv", "BatchNormalization"]


def test_a_rewrite_refused_on_the_primary_profile_is_not_timed_on_the_others() -> None:
    result, judge = _run({TWO[0]: 0.8, TWO[1]: 2.0})
    assert not result.decisions[0].kept and judge.timed == [TWO[0]]


def test_numerics_feeds_run_at_the_primary_batch_and_regions_are_shaped_at_each_profile() -> None:
    model = Model.from_source(parse(DYNAMIC))
    from rewriter.validation.feeds import input_specs

    feeds = FeedSet.random(input_specs(model.proto, model.input_shapes), count=6)
    config = ValidationConfig(timing=FAST, profiles=(DeploymentProfile(1, 4), DeploymentProfile(1, 1)))
    judge = Judge(model, feeds, config)
    assert [f["X"].shape[0] for f in judge.feeds.validation] == [4, 4]  # 6 rows -> two feeds of 4 (the last filled up)
    assert judge.timing_feed(1)["X"].shape == (1, 4, 12, 12) and judge.timing_feed(3)["X"].shape == (3, 4, 12, 12)
    shaped = judge.shaped(model, 8)
    assert shaped.input_shapes == {"X": (8, 4, 12, 12)} and shaped.static_shape("C") == (8, 8, 12, 12)
    assert judge.shaped(model, 8) is shaped and judge.shaped(model, 1) is model


def test_real_timing_at_two_profiles_times_the_region_at_each_batch_and_reports_both(report_validator) -> None:  # type: ignore[no-untyped-def]
    from rewriter.report import build_report

    config = ValidationConfig(timing=FAST, profiles=TWO, defer_exact=False)
    result = optimize(parse(CHAIN_1X1), ["fuse_1x1_chain"], config=config)  # onnxruntime does not fuse conv chains
    (d,) = result.decisions
    assert [p.profile.batch for p in d.verdict.profiles][:1] == [1]
    assert {p.scope for p in d.verdict.profiles} == {"subgraph"}  # the region is shaped at batch 4, not the whole model
    report = build_report(result, input_path=None, input_sha256=None, output_path=None, output_sha256=None, provider="cpu",
                          threads=1, profiles=TWO)
    assert [(p["threads"], p["batch"], p["primary"]) for p in report["profiles"]] == [(1, 1, True), (2, 4, False)]
    # kept (timing noise may refuse it): measured end to end at both profiles; else nothing to measure
    assert [p["latency"] is not None for p in report["profiles"]] == [d.kept, d.kept]
    assert len(report["decisions"][0]["latency_profiles"]) in (1, 2)  # a refusal at the primary is not timed further
    assert_valid(report_validator, json.loads(json.dumps(report)))


def test_a_model_that_fixes_its_batch_refuses_a_profile_of_another() -> None:
    with pytest.raises(InputError, match="--profile threads=2,batch=4: input 'X' fixes its batch dim at 1"):
        optimize(parse(FIXED), ["fold_batchnorm"], config=ValidationConfig(timing=FAST, profiles=TWO))


# -- the command line ------------------------------------------------------------------------------------
def _model_file(tmp_path: Path, text: str = DYNAMIC) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(parse(text), path)
    return path


def test_cli_profiles_reach_the_report(tmp_path: Path, report_validator) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from rewriter.cli import app

    src, out, rep = _model_file(tmp_path), tmp_path / "o.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(app, ["optimize", str(src), "-o", str(out), "--report", str(rep), "--max-pairs", "6",
                                   "--profile", "threads=1,batch=1", "--profile", "threads=2,batch=3"])
    assert res.exit_code in (0, 1), res.output
    data = json.loads(rep.read_text())
    assert [(p["threads"], p["batch"]) for p in data["profiles"]] == [(1, 1), (2, 3)]
    assert data["environment"]["threads"] == 1 and data["environment"]["batch"] == 1
    assert_valid(report_validator, data)


@pytest.mark.parametrize("args, words", [
    (["--threads", "2", "--profile", "threads=1"], "either --threads/--batch or --profile"),
    (["--profile", "threads=x"], "whole number"),
    (["--batch", "4"], "fixes its batch dim at 1"),
])
def test_cli_bad_profiles_are_a_one_line_error_with_exit_2(tmp_path: Path, args: list[str], words: str) -> None:
    from typer.testing import CliRunner

    from rewriter.cli import app

    src = _model_file(tmp_path, FIXED)
    res = CliRunner().invoke(app, ["optimize", str(src), "-o", str(tmp_path / "o.onnx"), *args])
    assert res.exit_code == 2 and words in res.output, res.output
    assert not (tmp_path / "o.onnx").exists()


def test_config_file_keys_batch_and_profile(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rewriter.cli import app

    src, rep = _model_file(tmp_path), tmp_path / "r.json"
    cfg = tmp_path / "c.toml"
    cfg.write_text('profile = ["threads=1,batch=2", "threads=1,batch=1"]\nmax-pairs = 6\n')
    res = CliRunner().invoke(app, ["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--report", str(rep), "--config", str(cfg)])
    assert res.exit_code in (0, 1), res.output
    assert [p["batch"] for p in json.loads(rep.read_text())["profiles"]] == [2, 1]


def test_the_report_lists_every_profile_even_when_nothing_was_kept() -> None:
    from rewriter.report import build_report

    result = optimize(parse(DYNAMIC), ["fuse_1x1_chain"], config=ValidationConfig(timing=FAST, profiles=TWO))  # no candidate
    report = build_report(result, input_path=None, input_sha256=None, output_path=None, output_sha256=None, provider="cpu",
                          threads=1, profiles=TWO)
    assert report["profiles"] == [{"threads": 1, "batch": 1, "primary": True, "latency": None},
                                  {"threads": 2, "batch": 4, "primary": False, "latency": None}]


def test_without_profiles_a_model_runs_at_its_own_batch_and_feeds_stay_as_they_are() -> None:
    fixed2 = DYNAMIC.replace("float[N, 4, 12, 12] X", "float[2, 4, 12, 12] X").replace("float[N, 8, 12, 12] Y", "float[2, 8, 12, 12] Y")
    result = optimize(parse(fixed2), ["fold_batchnorm"], config=ValidationConfig(timing=FAST))
    assert result.decisions and result.decisions[0].verdict is not None
    model = Model.from_source(parse(fixed2))
    judge = Judge(model, None, ValidationConfig(timing=FAST))
    assert judge.feeds.validation[0]["X"].shape[0] == 2 and judge.timing_feed(1) is judge.feeds.validation[0]
    assert judge.shaped(model, 1) is model  # no profiles: regions are timed at the model's resolved shapes


def test_a_batch_dim_stored_as_minus_one_is_dynamic() -> None:
    minus_one = parse(DYNAMIC)
    minus_one.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    minus_one.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # how some exporters write a dynamic batch
    assert batch_error(minus_one, 8) is None
