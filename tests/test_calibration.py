"""Calibration activations: captured tensors and channel moments match a direct computation."""

from __future__ import annotations

import numpy as np

from rewriter.model import Model
from rewriter.validation.calibration import Calibration, with_outputs
from tests.helpers import parse, run_reference

MODEL = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 6, 6] X) => (float[2, 4, 6, 6] Y)
    <float[5, 3, 3, 3] W1, float[4, 5, 1, 1] W2> {
        A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W1)
        R = Relu (A)
        Y = Conv <kernel_shape = [1, 1]> (R, W2)
    }
"""


def _setup() -> tuple[Model, list[dict], Calibration]:
    model = Model.from_source(parse(MODEL))
    rng = np.random.default_rng(0)
    feeds = [{"X": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)} for _ in range(3)]
    return model, feeds, Calibration(model, feeds)


def _direct(model: Model, feeds: list[dict], name: str) -> np.ndarray:
    probe = parse(MODEL.replace("=> (float[2, 4, 6, 6] Y)", f"=> (float[2, 4, 6, 6] Y, float[2, 5, 6, 6] {name})"))
    return np.concatenate([out[1] for out in run_reference(probe, feeds)], axis=0)


def test_captured_tensor_is_the_intermediate_activation() -> None:
    model, feeds, calib = _setup()
    got = calib.of(model, ["R"])["R"]
    # Captures run with onnxruntime's optimizations (fast, for fitting): equal up to float rounding.
    np.testing.assert_allclose(got, _direct(model, feeds, "R"), rtol=1e-5, atol=1e-5)
    assert got.shape == (6, 5, 6, 6)  # three feeds of batch 2, concatenated on axis 0


def test_capture_runs_only_the_nodes_the_tensors_need() -> None:
    model, feeds, calib = _setup()
    early = with_outputs(model, ["A"])
    assert [n.op_type for n in early.graph.node] == ["Conv"] and [o.name for o in early.graph.output] == ["A"]
    assert [i.name for i in early.graph.initializer] == ["W1"] and [i.name for i in early.graph.input] == ["X"]
    both = with_outputs(model, ["R", "Y"])
    assert [n.op_type for n in both.graph.node] == ["Conv", "Relu", "Conv"]
    assert [o.name for o in both.graph.output] == ["R", "Y"]
    np.testing.assert_allclose(calib.map(model, ["Y"], lambda k, t: t["Y"])[1], run_reference(model.proto, feeds[1:2])[0][0],
                               rtol=1e-5, atol=1e-5)


def test_moments_match_direct_computation() -> None:
    model, feeds, calib = _setup()
    mean, second = calib.moments(model, ["A"])["A"]
    a = _direct(model, feeds, "A")
    flat = np.moveaxis(a, 1, -1).reshape(-1, 5).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(second, flat.T @ flat / len(flat), rtol=1e-5, atol=1e-6)


def test_only_the_original_and_the_current_version_are_cached() -> None:
    model, _, calib = _setup()
    calib.reference(["A"])
    v1 = model.fork().commit()
    calib.of(v1, ["A"])
    v2 = v1.fork().commit()
    calib.of(v2, ["A"])
    versions = {key for key, _ in calib._cache}
    assert versions == {id(model.proto), id(v2.proto)}


def test_map_sees_every_feed_and_keeps_nothing() -> None:
    model, feeds, calib = _setup()
    sums = calib.map(model, ["R"], lambda k, t: (k, float(t["R"].sum())))
    direct = _direct(model, feeds, "R")
    assert [k for k, _ in sums] == [0, 1, 2]
    np.testing.assert_allclose([s for _, s in sums], [direct[2 * k:2 * k + 2].sum() for k in range(3)], rtol=1e-5)
    assert not calib._cache


def test_memo_computes_once_per_version_and_is_evicted_with_it() -> None:
    model, _, calib = _setup()
    calls: list[int] = []

    def compute() -> int:
        calls.append(1)
        return len(calls)

    assert calib.memo(model, "k", compute) == calib.memo(model, "k", compute) == 1
    v1 = model.fork().commit()
    assert calib.memo(v1, "k", compute) == 2
    v2 = v1.fork().commit()
    calib.memo(v2, "k", compute)
    assert {key for key, _ in calib._cache} == {id(model.proto), id(v2.proto)}  # v1's entry went with v1


def test_while_current_memo_of_the_original_goes_once_another_version_is_worked_on() -> None:
    model, _, calib = _setup()
    calib.memo(model, "inputs", lambda: 1, while_current=True)
    calib.memo(model, "targets", lambda: 2)
    assert calib.cached(model, "inputs") and calib.cached(model, "targets")
    v1 = model.fork().commit()
    calib.memo(v1, "inputs", lambda: 3, while_current=True)
    assert not calib.cached(model, "inputs") and calib.cached(model, "targets") and calib.cached(v1, "inputs")


def test_lineage_changes_only_with_what_computes_the_tensor() -> None:
    model, _, calib = _setup()
    a, r, y = (calib.lineage(model, t) for t in ("A", "R", "Y"))
    assert len({a, r, y}) == 3 and calib.lineage(model.fork().commit(), "R") == r
    # Rename the last conv (what a rewrite does to what it touches): R, upstream of it, keeps its lineage.
    edited = model.fork()
    edited.graph.nodes[-1].name = "fresh"
    v1 = edited.commit()
    assert calib.lineage(v1, "R") == r and calib.lineage(v1, "Y") != y


def test_lasting_values_are_bounded_by_bytes_least_recently_used_first() -> None:
    _, _, calib = _setup()
    calib.lasting_bytes = 3100
    for k in range(3):
        calib.lasting(f"k{k}", lambda: np.zeros(125))  # 1000 bytes each
    calib.lasting("k0", lambda: None)  # a hit: k0 becomes the most recent
    calib.lasting("k3", lambda: [np.zeros(125), (np.zeros(1),)])
    assert [calib.has_lasting(f"k{k}") for k in range(4)] == [True, False, True, True]
