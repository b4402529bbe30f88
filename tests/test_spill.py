"""The calibration data store: a memory budget, the rest on disk, every value read back as it was."""

from __future__ import annotations

import os

import numpy as np
import pytest

from rewriter.model import Model
from rewriter.validation.calibration import Calibration
from rewriter.validation.spill import SpillStore, nbytes
from tests.helpers import parse


def test_values_past_the_budget_wait_on_disk_and_come_back_unchanged() -> None:
    rng = np.random.default_rng(0)
    values = {f"k{i}": (rng.standard_normal((64, 64)), [rng.standard_normal(8)]) for i in range(6)}
    size = nbytes(values["k0"])
    store = SpillStore(memory_bytes=2 * size)
    for k, v in values.items():
        store[k] = v
        assert store.in_memory <= 2 * size
    assert store.spilled == 4 and len(store) == 6
    for k, (a, (b,)) in values.items():  # every one readable, the least recently used spilled again
        got_a, (got_b,) = store[k]
        np.testing.assert_array_equal(got_a, a)
        np.testing.assert_array_equal(got_b, b)
        assert store.in_memory <= 2 * size
    assert store.loaded >= 4 and store.spilled == 6  # each written once, however often it moves
    folder = store._folder
    assert folder is not None and len(os.listdir(folder)) == 6
    store.pop("k0")
    assert "k0" not in store and len(os.listdir(folder)) == 5
    store.close()
    assert not os.path.exists(folder)


def test_one_value_is_always_kept_and_one_object_under_two_keys_is_held_once() -> None:
    big = np.zeros(1000)
    store = SpillStore(memory_bytes=10)
    store["a"] = big
    assert store.in_memory == big.nbytes and store.spilled == 0  # over the budget, but the only one
    store["b"] = big
    assert store.in_memory == big.nbytes and store["b"] is big
    store.pop("a")
    assert store["b"] is big  # still named by "b"
    store.close()


def test_stored_arrays_are_read_only() -> None:
    store = SpillStore(memory_bytes=0)
    store["a"] = np.ones(4)
    store["b"] = np.ones(4)  # "a" goes to disk
    with pytest.raises(ValueError):
        store["a"][0] = 2.0  # a value read back from disk is read-only too
    store.close()


CONV = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 8, 8] X) => (float[1, 4, 8, 8] Y)
    <float[4, 3, 3, 3] W> {
        H = Relu (X)
        Y = Conv <pads = [1, 1, 1, 1]> (H, W)
    }
"""


def test_a_calibration_with_no_memory_budget_gives_the_same_data() -> None:
    model = Model.from_source(parse(CONV, seed=1))
    rng = np.random.default_rng(1)
    feeds = [{"X": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    roomy, tight = Calibration(model, feeds), Calibration(model, feeds, memory_bytes=0)
    for _ in range(2):  # the second time from disk
        for name in ("H", "Y"):
            np.testing.assert_array_equal(roomy.reference([name])[name], tight.reference([name])[name])
            for x, y in zip(roomy.moments(model, [name])[name], tight.moments(model, [name])[name]):
                np.testing.assert_array_equal(x, y)
        assert tight.lasting("fit", lambda: np.arange(5.0)).tolist() == [0, 1, 2, 3, 4]
    assert tight._cache.spilled > 0 and tight._cache.loaded > 0
