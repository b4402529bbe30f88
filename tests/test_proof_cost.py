"""The cost of proof: timings that stop once they decide, proof work on a worker thread, models serialized once."""

from __future__ import annotations

import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from rewriter.errors import InputError
from rewriter.io.check import check_model_structure
from rewriter.model import Model
from rewriter.validation import latency as latency_module
from rewriter.validation import runtime
from rewriter.validation.background import Worker
from rewriter.validation.judge import Judge, ValidationConfig
from rewriter.validation.latency import TimingOptions, decided, time_pairs
from tests.helpers import parse
from tests.search_fixtures import THREE_BN


class Clock:
    """A fake ``time`` module: only sessions move it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Session:
    """A fake session whose runs take ``seconds`` of the fake clock, with seeded jitter of 2%."""

    def __init__(self, clock: Clock, seconds: float, seed: int) -> None:
        self.clock, self.seconds, self.rng = clock, seconds, np.random.default_rng(seed)
        self.runs = 0

    def get_inputs(self):  # type: ignore[no-untyped-def]
        return []

    def get_outputs(self):  # type: ignore[no-untyped-def]
        return []

    def run(self, names, feed):  # type: ignore[no-untyped-def]
        self.runs += 1
        self.clock.now += self.seconds * (1.0 + 0.02 * self.rng.standard_normal())


OPTS = TimingOptions(warmup=1, min_pairs=10, max_pairs=40, time_budget_s=100.0, min_sample_s=0.0)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(latency_module, "time", fake)
    return fake


@pytest.mark.parametrize(("base", "candidate", "pairs"), [(0.02, 0.01, 10), (0.01, 0.02, 10), (0.01, 0.01, 40)])
def test_a_timing_stops_once_its_interval_decides_and_a_tie_gets_the_whole_budget(clock: Clock, base: float, candidate: float, pairs: int) -> None:
    a, b = Session(clock, base, 1), Session(clock, candidate, 2)
    lat = time_pairs(a, b, {}, OPTS, settle=(0.99, 1.0))
    assert lat.ci.pairs == pairs
    assert lat.ci.faster(1.0) if base > candidate else (lat.ci.slower(0.99) if base < candidate else not lat.ci.slower(0.99))


def test_without_thresholds_or_with_early_settling_off_a_timing_takes_every_pair(clock: Clock) -> None:
    for settle, opts in (((), OPTS), ((0.99, 1.0), TimingOptions(**{**OPTS.__dict__, "settle_early": False}))):
        lat = time_pairs(Session(clock, 0.02, 1), Session(clock, 0.01, 2), {}, opts, settle=settle)
        assert lat.ci.pairs == 40 and lat.ci.faster(1.0)


def test_the_look_decides_only_beyond_every_threshold() -> None:
    rng = np.random.default_rng(0)
    base = list(1.0 + 0.01 * rng.standard_normal(20))
    assert decided(base, [x / 1.5 for x in base], (0.99, 1.0))  # 1.5x faster: above both
    assert decided(base, [x * 1.5 for x in base], (0.99, 1.0))  # 1.5x slower: below both
    assert not decided(base, [x / 0.995 for x in base], (0.99, 1.0))  # between them: neither call is made
    assert not decided(base, [x / 1.5 for x in base], ())  # nothing to decide: never stops early


# -- proof work on the worker thread ----------------------------------------------------------------------------


def test_the_worker_is_quiet_before_every_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    from rewriter.validation import judge as judge_module

    judge = Judge(Model.from_source(parse(THREE_BN, seed=1)), None, ValidationConfig(timing=TimingOptions(min_pairs=4, max_pairs=4)))
    finished = threading.Event()
    seen: list[bool] = []

    def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(finished.is_set())
        return time_pairs(*args, **kwargs)

    monkeypatch.setattr(judge_module, "time_pairs", timed)
    judge.worker.submit(lambda: (time.sleep(0.3), finished.set()))
    judge.model_latency(judge.original.proto, judge.original.proto)
    judge.worker.close()
    assert seen == [True]


def test_the_prefetched_reference_is_the_reference_and_a_failed_task_reads_as_none() -> None:
    model = Model.from_source(parse(THREE_BN, seed=1))
    ahead = Judge(model, None, ValidationConfig())
    ahead.prefetch(exact_only=False)
    ahead.worker.close()
    plain = Judge(model, None, ValidationConfig())
    for x, y in zip(ahead.reference, plain.reference):
        np.testing.assert_array_equal(x["Y"], y["Y"])
    worker = Worker()
    failed = worker.submit(lambda: 1 / 0)
    worker.quiet()
    from rewriter.validation.background import result_or_none

    assert failed.done() and result_or_none(failed) is None and result_or_none(None) is None
    worker.close()


def test_a_big_models_proof_work_runs_when_asked_for_except_the_light_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past OVERLAP_BYTES a session beside the search would break the memory bound: tasks wait to be asked for,
    in the asking thread; the reference (a session of about the model's bytes) still runs ahead."""
    from rewriter.validation import judge as judge_module
    from rewriter.validation.background import result_or_none

    model = Model.from_source(parse(THREE_BN, seed=1))
    assert Judge(model, None, ValidationConfig()).worker.overlap  # a small model overlaps
    monkeypatch.setattr(judge_module, "OVERLAP_BYTES", 0)
    judge = Judge(model, None, ValidationConfig())
    assert not judge.worker.overlap
    ran: list[threading.Thread] = []
    task = judge.worker.submit(lambda: ran.append(threading.current_thread()) or 7)
    judge.worker.quiet()  # (nothing to wait for: it has not started)
    time.sleep(0.05)
    assert ran == []
    assert task.result() == 7 and task.result() == 7 and ran == [threading.current_thread()]  # once, here
    light = judge.worker.submit(threading.current_thread, light=True)
    assert light.result() is not threading.current_thread()
    assert result_or_none(judge.worker.submit(lambda: 1 / 0)) is None
    judge.prefetch(exact_only=True)  # the reference ahead, the deployed graph on demand
    judge.worker.quiet()
    assert judge._reference is not None
    judge.worker.close()


def test_a_deferred_run_proves_its_result_on_the_first_feeds_only() -> None:
    from rewriter.pipeline import optimize

    model = Model.from_source(parse(THREE_BN, seed=1))
    judge = Judge(model, None, ValidationConfig(exact_feeds=3, timing=TimingOptions(min_pairs=4, max_pairs=6, time_budget_s=0.2)))
    result = optimize(model, ["fold_batchnorm"], config=judge.config, judge=judge)
    assert len(result.kept) == 3 and result.numerics_feeds == 3
    assert result.final_numerics["Y"].elements == 3 * 4 * 8 * 8
    assert len(judge._reference or []) == 3  # the other feeds' reference outputs were never needed


# -- one serialization per version -----------------------------------------------------------------------------


def test_a_shared_model_is_serialized_once_for_every_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "FILE_PAYLOAD_BYTES", 0)  # every payload a file
    model, other = parse(THREE_BN, seed=1), parse(THREE_BN, seed=2)
    with runtime.payload(model) as first, runtime.payload(model) as second:
        assert first != second  # unshared: a file each
    with runtime.shared_payloads(model):
        with ThreadPoolExecutor(4) as pool:
            tasks = [pool.submit(contextvars.copy_context().run, _path, model) for _ in range(8)]  # as the worker does
            paths = [t.result() for t in tasks]
        assert len(set(paths)) == 1 and onnx.load(paths[0]) == model
        assert _path(other) != paths[0]  # not shared: its own file
        runtime.share(other)
        assert _path(other) == _path(other)
    assert not any(map(_exists, paths))  # the block's files are removed with it


def _path(model: onnx.ModelProto) -> str:
    with runtime.payload(model) as made:
        assert isinstance(made, str) and _exists(made)
        return made


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)


# -- the checker on a copy without the big weights ------------------------------------------------------------


def _big(op: str) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((512, 512, 1, 1), np.float32), "W")  # 1 MiB: left out of the checker's copy
    node = helper.make_node(op, ["X", "W"], ["Y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 512, 2, 2])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 512, 2, 2])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_model_with_big_weights_is_still_checked_by_the_onnx_checker() -> None:
    check_model_structure(_big("Conv"))
    with pytest.raises(InputError, match="invalid ONNX model"):
        check_model_structure(_big("NoSuchOp"))


# -- one CPU arena for every deploy session -------------------------------------------------------------------


def test_deploy_sessions_share_one_cpu_arena_and_stay_exact() -> None:
    from rewriter.validation.runtime import RuntimeOptions, deploy_session, reference_session, run_feeds, shared_cpu_arena

    model = parse(THREE_BN, seed=1)
    assert shared_cpu_arena() and shared_cpu_arena()  # registered once, asked many times
    first, second = (deploy_session(model, RuntimeOptions(threads=1)) for _ in range(2))
    assert first.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
    feed = [{"X": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}]
    expected = run_feeds(reference_session(model), feed)[0]["Y"]
    for _ in range(3):  # in turn, as a timing runs them
        for session in (first, second):
            np.testing.assert_allclose(run_feeds(session, feed)[0]["Y"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("flag", "feeds"), [([], 2), (["--exact-feeds", "0"], 8), (["--exact-feeds", "5"], 5)])
def test_the_cli_proves_an_exact_run_on_the_feeds_it_is_told(tmp_path, flag: list[str], feeds: int) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from rewriter.cli import app

    source = tmp_path / "m.onnx"
    onnx.save(parse(THREE_BN, seed=1), source)
    args = ["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json"), "--max-pairs", "6", *flag]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    totals = json.loads((tmp_path / "r.json").read_text())["totals"]
    assert totals["numerics_feeds"] == feeds and totals["final_numerics"]["Y"]["elements"] == feeds * 4 * 8 * 8


def test_a_result_written_once_for_its_sessions_is_the_output_byte_for_byte(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from rewriter.cli import app
    from rewriter.io import save_model

    source = tmp_path / "m.onnx"
    onnx.save(parse(THREE_BN, seed=1), source)
    copied: list[str] = []
    real = save_model.__globals__["_copy_into"]

    def spy(path, fh):  # type: ignore[no-untyped-def]
        copied.append(path)
        real(path, fh)

    outputs = []
    for files in (False, True):  # small payloads are bytes (serialized again to save); with files, the file is copied
        if files:
            monkeypatch.setattr(runtime, "FILE_PAYLOAD_BYTES", 0)
            monkeypatch.setitem(save_model.__globals__, "_copy_into", spy)
        out = tmp_path / f"out{int(files)}.onnx"
        done = CliRunner().invoke(app, ["optimize", str(source), "-o", str(out), "--max-pairs", "6"])
        assert done.exit_code == 0, done.output
        outputs.append(out.read_bytes())
    assert len(copied) == 1 and outputs[0] == outputs[1]
    assert not _exists(copied[0])  # the shared file went with its block
