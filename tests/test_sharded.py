"""Sharded evaluation: numerics and task metrics as map/reduce, locally and on a local Ray cluster.

The sharded numerics must reduce to what ``compare_outputs`` computes on the whole feed set at once (maxima,
counts and top-k exactly; sums up to float rounding), and a sharded metric must equal the single-process
value, whether its map runs here or on Ray workers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rewriter.errors import InputError
from rewriter.job import OptimizeOptions
from rewriter.validation.compare import validate_models
from rewriter.validation.judge import TaskMetric, ValidationConfig
from rewriter.validation.numerics import OutputStats, compare_arrays, compare_outputs
from rewriter.validation.runtime import RuntimeOptions, deploy_session, reference_session, run_feeds
from rewriter.validation.sharded import (
    FileShard,
    NpzTop1Accuracy,
    RayMetric,
    on_ray,
    partial_stats,
    reduce_partials,
    session_model_bytes,
    shard_feeds,
    sharded_numerics,
)
from tests.helpers import feeds_for, parse

SCORES = """
<ir_version: 8, opset_import: ["" : 17]>
scores (float[N, 16] x) => (float[N, 10] y, float[N, 3, 2] aux)
    <float[16, 10] w, float[10] b, int64[1] starts = {0}, int64[1] ends = {6}, int64[1] axes = {1}, int64[3] shape = {-1, 3, 2}> {
  y = Gemm(x, w, b)
  head = Slice(y, starts, ends, axes)
  aux = Reshape(head, shape)
}
"""


def scores_model(seed: int = 0) -> onnx.ModelProto:
    """N x 16 -> N x 10 class scores, plus a rank-3 output (where top-k does not apply)."""
    return parse(SCORES, seed)


def perturbed(model: onnx.ModelProto, scale: float, seed: int = 1) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    w = next(t for t in out.graph.initializer if t.name == "w")
    arr = numpy_helper.to_array(w)
    arr = arr + np.random.default_rng(seed).standard_normal(arr.shape).astype(np.float32) * scale
    w.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), "w"))
    return out


def assert_stats_match(got: OutputStats, want: OutputStats) -> None:
    """Exact for maxima, counts and top-k; within float rounding for the sums."""
    for f in fields(OutputStats):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name in ("mean_abs", "cosine", "snr_db"):
            assert (a == b) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15), (f.name, a, b)
        else:
            assert a == b, (f.name, a, b)


# -- numerics ----------------------------------------------------------------------------------------------
def test_partial_stats_reduce_to_compare_arrays_with_nonfinite_values_and_empty_shards() -> None:
    rng = np.random.default_rng(3)
    refs = [rng.standard_normal((2, 7)) for _ in range(6)]
    cands = [r + rng.standard_normal(r.shape) * 0.05 for r in refs]
    refs[1][0, 2], cands[1][0, 2] = np.nan, np.nan  # same NaN: fine
    refs[2][1, 1], cands[2][1, 1] = np.inf, np.inf
    cands[4][0, 0] = np.inf  # a mismatch
    cands[5][1, :] = refs[5][1, ::-1]  # top-1 disagrees on a row
    want = compare_arrays("y", refs, cands, rtol=1e-3, atol=1e-4)
    for cuts in ([6], [1, 3, 6], [0, 2, 2, 5, 6]):
        parts, start = [], 0
        for end in cuts:
            parts.append({"y": partial_stats("y", refs[start:end], cands[start:end], rtol=1e-3, atol=1e-4)})
            start = end
        assert_stats_match(reduce_partials(parts)["y"], want)
    assert want.nonfinite_mismatch == 1 and want.top1 is not None and want.top1 < 1 and want.top5 is not None


def test_sharded_numerics_equal_the_single_process_numerics() -> None:
    ref, cand = scores_model(0), perturbed(scores_model(0), 0.3)
    feeds = feeds_for(ref, count=10, seed=5)
    want = compare_outputs(run_feeds(reference_session(ref), feeds), run_feeds(reference_session(cand), feeds), rtol=1e-4, atol=1e-5)
    got = sharded_numerics(ref, cand, shard_feeds(feeds, 3))
    assert list(got) == list(want) == ["y", "aux"]
    for name in want:
        assert_stats_match(got[name], want[name])
    assert want["y"].top1 is not None and want["aux"].top1 is None and want["y"].max_abs > 0


def test_sharded_numerics_from_npz_files_and_on_ray(ray_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref, cand = scores_model(0), perturbed(scores_model(0), 0.3)
    feeds = feeds_for(ref, count=9, seed=6)
    shards = []
    for i in range(3):
        path = tmp_path / f"feeds{i}.npz"
        np.savez(path, x=np.stack([f["x"] for f in feeds[3 * i:3 * i + 3]]))
        shards.append(FileShard(str(path)))
    local = sharded_numerics(ref, cand, shards)
    on_cluster = sharded_numerics(ref, cand, shards, ray_address="auto")
    assert on_cluster == local  # same arithmetic, reduced in shard order
    want = compare_outputs(run_feeds(reference_session(ref), feeds), run_feeds(reference_session(cand), feeds))
    for name in want:
        assert_stats_match(local[name], want[name])


# -- task metrics -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, list[str], float]:
    """The scores model, 4 labelled .npz shards (labels: its own top-1 with every 4th one changed) and the
    accuracy computed in one go, without shards."""
    model = scores_model(0)
    folder = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(9)
    session = deploy_session(model.SerializeToString(), RuntimeOptions())
    xs, ys, paths = [], [], []
    for i, n in enumerate((7, 5, 9, 3)):
        x = rng.standard_normal((n, 16)).astype(np.float32)
        y = np.argmax(session.run(["y"], {"x": x})[0], axis=1)
        y[::4] = (y[::4] + 1) % 10
        path = folder / f"shard{i}.npz"
        np.savez(path, x=x, y=y)
        xs.append(x)
        ys.append(y)
        paths.append(str(path))
    scores = session.run(["y"], {"x": np.concatenate(xs)})[0]
    accuracy = float(np.mean(np.argmax(scores, axis=1) == np.concatenate(ys)))
    return model, paths, accuracy


def test_sharded_metric_locally_equals_the_single_process_value(labelled) -> None:  # type: ignore[no-untyped-def]
    model, paths, accuracy = labelled
    metric = NpzTop1Accuracy(tuple(paths))
    session = deploy_session(model.SerializeToString(), RuntimeOptions())
    assert 0.5 < accuracy < 1.0
    assert metric(session) == pytest.approx(accuracy, abs=1e-12)
    assert NpzTop1Accuracy(tuple(paths), batch=2)(session) == pytest.approx(accuracy, abs=1e-12)


def test_sharded_metric_on_ray_equals_the_single_process_value(ray_cluster, labelled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, paths, accuracy = labelled
    runtime = RuntimeOptions()
    metric = on_ray(NpzTop1Accuracy(tuple(paths)), "auto", runtime=runtime)
    session = deploy_session(model.SerializeToString(), runtime)
    assert session_model_bytes(session) == model.SerializeToString()
    assert metric(session) == pytest.approx(accuracy, abs=1e-12)

    # As the pipeline's task metric (fn(session)), judged against a perturbed candidate.
    candidate = perturbed(model, 0.5)
    config = ValidationConfig(latency=False, metric=TaskMetric(metric, max_drop=1.0, name="top1"))
    rep = validate_models(model, candidate, config=config, exact=False)
    assert rep.metric_base == pytest.approx(accuracy, abs=1e-12)
    local = NpzTop1Accuracy(tuple(paths))(deploy_session(candidate.SerializeToString(), runtime))
    assert rep.metric_candidate == pytest.approx(local, abs=1e-12)

    # From the command line's options: --metric FILE.py:INSTANCE --metric-ray-address auto.
    spec = tmp_path / "my_metric.py"
    spec.write_text(f"from rewriter.validation.sharded import NpzTop1Accuracy\nmetric = NpzTop1Accuracy({tuple(paths)!r})\n")
    fn = OptimizeOptions(metric=f"{spec}:metric", metric_ray_address="auto").validation_config().metric.fn  # type: ignore[union-attr]
    assert isinstance(fn, RayMetric) and fn(session) == pytest.approx(accuracy, abs=1e-12)


def test_ray_metric_falls_back_to_local_for_a_session_without_its_bytes(labelled, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    model, paths, accuracy = labelled
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    session = deploy_session(str(path), RuntimeOptions())
    assert session_model_bytes(session) is None
    metric = RayMetric(NpzTop1Accuracy(tuple(paths)), "auto")
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        assert metric(session) == pytest.approx(accuracy, abs=1e-12)
    assert "runs here, not on Ray" in caplog.text


def test_only_a_sharded_metric_can_run_on_ray() -> None:
    with pytest.raises(InputError, match="not a ShardedMetric"):
        on_ray(lambda session: 1.0, "auto")
    with pytest.raises(InputError, match="needs --metric"):
        OptimizeOptions(metric_ray_address="auto").validation_config()
