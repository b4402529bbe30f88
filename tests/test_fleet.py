"""optimize-many: one guarded job per model, in a local process pool or as Ray tasks.

Decisions are made numerics-only (``latency=False``) so that the local and the Ray run must agree
exactly: same statuses, same decisions, byte-identical output models and plans. A latency run checks that
every timing in a job holds the machine's timing lock.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import rewriter.fleet as fleet
from rewriter.cli import app
from rewriter.errors import InputError
from rewriter.fleet import ModelResult, optimize_many, output_names
from rewriter.io import sha256_file
from rewriter.job import OptimizeOptions
from rewriter.validation.locks import MachineLock
from tests.helpers import assert_same_outputs, parse

CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
chain (float[1, 8, 6, 6] x) => (float[1, 4, 6, 6] y) <float[16, 8, 1, 1] w1, float[16] b1, float[4, 16, 1, 1] w2, float[4] b2> {
  h = Conv(x, w1, b1)
  y = Conv(h, w2, b2)
}
"""
BN = """
<ir_version: 8, opset_import: ["" : 17]>
bn (float[1, 4, 6, 6] x) => (float[1, 8, 6, 6] y) <float[8, 4, 3, 3] w, float[8] scale, float[8] bias, float[8] mean, float[8] var> {
  h = Conv<pads = [1, 1, 1, 1]>(x, w)
  y = BatchNormalization(h, scale, bias, mean, var)
}
"""
GEMMS = """
<ir_version: 8, opset_import: ["" : 17]>
gemms (float[1, 8, 1, 1] x) => (float[1, 6, 1, 1] y) <float[12, 8, 1, 1] w1, float[6, 12, 1, 1] w2> {
  h = Conv(x, w1)
  y = Conv(h, w2)
}
"""
NOOP = """
<ir_version: 8, opset_import: ["" : 17]>
noop (float[1, 4, 6, 6] x) => (float[1, 4, 6, 6] y) {
  y = Relu(x)
}
"""
GOOD = ("a/chain.onnx", "a/bn.onnx", "a/gemms.onnx", "a/noop.onnx", "b/chain.onnx")  # b/chain: a second "chain" stem
NUMERICS_ONLY = OptimizeOptions(latency=False, num_feeds=2)


def write_models(root: Path) -> list[Path]:
    """Five small models (two with the stem "chain") and an unloadable file, in input order."""
    texts = {"a/chain.onnx": (CHAIN, 0), "a/bn.onnx": (BN, 1), "a/gemms.onnx": (GEMMS, 2), "a/noop.onnx": (NOOP, 3), "b/chain.onnx": (CHAIN, 4)}
    paths = []
    for rel in GOOD[:3] + ("a/bad.onnx",) + GOOD[3:]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == "a/bad.onnx":
            path.write_bytes(b"\x08\x07garbage, not protobuf\xff\xfe" * 10)
        else:
            text, seed = texts[rel]
            onnx.save_model(parse(text, seed), str(path))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_models(tmp_path_factory.mktemp("fleet-in"))


@pytest.fixture(scope="module")
def local_run(inputs: list[Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    shas = {p: sha256_file(p) for p in inputs}
    seen: list[ModelResult] = []
    result = optimize_many(inputs, tmp_path_factory.mktemp("fleet-local"), NUMERICS_ONLY, jobs=2, save_plans=True, on_result=seen.append)
    assert {p: sha256_file(p) for p in inputs} == shas  # inputs never modified
    return result, seen


def by_name(result) -> dict[str, ModelResult]:  # type: ignore[no-untyped-def]
    return {m.name: m for m in result.models}


# -- naming ----------------------------------------------------------------------------------------------
def test_output_names_are_deterministic_and_unique() -> None:
    assert output_names(["a/m.onnx", "b/m.onnx", "c/m-2.onnx", "d/M.onnx", "x.onnx"]) == ["m", "m-3", "m-2", "M-4", "x"]
    assert output_names(["one/net.onnx", "two/net.onnx"]) == ["net", "net-2"]


# -- the local pool --------------------------------------------------------------------------------------
def test_local_run_writes_every_good_model_and_reports_the_bad_one(local_run, inputs: list[Path]) -> None:  # type: ignore[no-untyped-def]
    result, seen = local_run
    assert result.mode == "local" and result.workers == 2
    assert [m.input for m in result.models] == [str(p) for p in inputs]  # input order, whatever the finishing order
    assert sorted(m.input for m in seen) == sorted(str(p) for p in inputs)
    assert result.exit_code == 1 and not result.ok
    models = by_name(result)
    assert [m.name for m in result.models] == ["chain", "bn", "gemms", "bad", "noop", "chain-2"]
    bad = models["bad"]
    assert bad.status == "error" and bad.output is None and bad.report is None
    assert bad.error is not None and bad.error.startswith(f"{inputs[3]}: not an ONNX model")
    for name in ("chain", "bn", "gemms", "noop", "chain-2"):
        m = models[name]
        assert m.status == "ok", (name, m.error)
        out = result.out_dir / f"{name}.onnx"
        assert m.output == str(out) and m.output_sha256 == sha256_file(out)
        onnx.checker.check_model(str(out), full_check=True)
        assert_same_outputs(onnx.load(m.input), onnx.load(str(out)))
        report = json.loads((result.out_dir / f"{name}.report.json").read_text())
        assert report["input"] == {"path": m.input, "sha256": sha256_file(m.input)}
        assert report["output"] == {"path": str(out), "sha256": m.output_sha256}
        assert report["gate"] == {"passed": True, "failures": []}
        assert report["totals"]["kept"] == m.kept
        plan = json.loads((result.out_dir / f"{name}.plan.json").read_text())
        assert plan["output_sha256"] == m.output_sha256 and len(plan["steps"]) == m.kept
    assert models["chain"].kept == models["chain-2"].kept == 1
    assert models["bn"].kept == 1 and models["gemms"].kept >= 1 and models["noop"].kept == 0
    assert models["chain"].macs_after < models["chain"].macs_before
    assert all(m.speedup is None for m in result.models)  # numerics only: nothing timed


def test_summary_json(local_run) -> None:  # type: ignore[no-untyped-def]
    result, _ = local_run
    data = json.loads(result.summary.read_text())
    assert data == json.loads(json.dumps(result.to_dict())) | {"seconds": data["seconds"]}
    assert data["summary_version"] == 3 and data["complete"] is True and data["exit_code"] == 1
    assert data["mode"] == "local" and data["options"]["latency"] is False
    assert data["counts"] == {"ok": 5, "gate-failed": 0, "error": 1, "pending": 0, "total": 6}
    rows = {r["name"]: r for r in data["models"]}
    assert rows["bad"]["status"] == "error" and "not an ONNX model" in rows["bad"]["error"]
    assert rows["chain-2"]["output"].endswith("chain-2.onnx") and rows["chain-2"]["report"].endswith("chain-2.report.json")
    assert set(rows["chain"]) == {"input", "name", "status", "error", "output", "output_sha256", "report", "plan", "kept",
                                  "rolled_back", "not_tried", "speedup", "speedup_ci", "macs_before", "macs_after", "seconds", "host", "settings"}
    assert rows["chain"]["settings"] == {"tables": [], "input_shapes": {}, "options": {}, "input_shape_notes": []}
    expected = {"summary.json"} | {f"{n}.{ext}" for n in ("chain", "bn", "gemms", "noop", "chain-2") for ext in ("onnx", "report.json", "plan.json")}
    assert set(os.listdir(result.out_dir)) == expected  # nothing else: no temporary files, nothing for "bad"


def test_gate_failure_is_reported_with_its_report_and_no_model(inputs: list[Path], tmp_path: Path) -> None:
    noop = inputs[4]
    result = optimize_many([noop], tmp_path, OptimizeOptions(fail_if_no_speedup=True, num_feeds=2), jobs=1)
    (m,) = result.models
    assert m.status == "gate-failed" and result.exit_code == 1
    assert m.error is not None and "no end-to-end speedup" in m.error
    assert m.output is None and not (tmp_path / "noop.onnx").exists()
    report = json.loads(Path(m.report).read_text())
    assert report["gate"]["passed"] is False and report["output"] == {"path": None, "sha256": None}


def _crash_second(job):  # type: ignore[no-untyped-def]
    """A job function for the pool that kills its worker process on the second model."""
    if job.index == 1:
        os._exit(3)
    return fleet._Return("ok", host="test")


def test_a_worker_that_dies_fails_only_its_own_model(tmp_path: Path) -> None:
    jobs = [fleet._Job(i, f"m{i}.onnx", f"m{i}", str(tmp_path / f"m{i}.onnx"), f"m{i}.onnx", NUMERICS_ONLY, False, 1, 30) for i in range(3)]
    finished: dict[int, fleet._Return] = {}
    fleet._run_local(jobs, 2, 1, lambda job, ret: finished.__setitem__(job.index, ret), fn=_crash_second)
    assert sorted(finished) == [0, 1, 2]
    assert finished[0].status == finished[2].status == "ok"
    assert finished[1].status == "error" and "worker process died" in (finished[1].error or "")


# -- Ray --------------------------------------------------------------------------------------------------
def test_ray_run_equals_the_local_run(ray_cluster, local_run, inputs: list[Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    local, _ = local_run
    result = optimize_many(inputs, tmp_path, NUMERICS_ONLY, ray_address="auto", save_plans=True)
    assert result.mode == "ray"
    assert ray_cluster.is_initialized()  # an existing connection is reused, not shut down
    assert [(m.name, m.status, m.error, m.kept, m.rolled_back, m.not_tried, m.output_sha256) for m in result.models] == [
        (m.name, m.status, m.error, m.kept, m.rolled_back, m.not_tried, m.output_sha256) for m in local.models
    ]
    for m in local.models:
        if not m.ok:
            continue
        assert (tmp_path / f"{m.name}.onnx").read_bytes() == (local.out_dir / f"{m.name}.onnx").read_bytes()
        assert (tmp_path / f"{m.name}.plan.json").read_bytes() == (local.out_dir / f"{m.name}.plan.json").read_bytes()
        mine = json.loads((tmp_path / f"{m.name}.report.json").read_text())
        theirs = json.loads((local.out_dir / f"{m.name}.report.json").read_text())
        assert mine["input"] == theirs["input"]
        assert [(d["pass"], d["nodes"], d["outcome"], d["reason"]) for d in mine["decisions"]] == [
            (d["pass"], d["nodes"], d["outcome"], d["reason"]) for d in theirs["decisions"]
        ]
    assert json.loads((tmp_path / "summary.json").read_text())["counts"] == json.loads(local.summary.read_text())["counts"]


# -- the timing lock ---------------------------------------------------------------------------------------
def test_machine_lock_excludes_other_holders(tmp_path: Path) -> None:
    path = tmp_path / "timing.lock"
    events: list[str] = []
    first = MachineLock(path)
    first.__enter__()

    def other() -> None:
        with MachineLock(path):
            events.append("other")

    t = threading.Thread(target=other)
    t.start()
    time.sleep(0.2)
    events.append("first releases")
    first.__exit__(None, None, None)
    t.join(5)
    assert events == ["first releases", "other"]
    lock = MachineLock(path)
    with lock, pytest.raises(RuntimeError, match="not re-entrant"):
        lock.__enter__()


def test_every_timing_in_a_job_holds_the_machine_lock(inputs: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import rewriter.validation.latency as latency

    state = {"held": 0, "samples": 0, "unlocked": 0}

    class SpyLock(MachineLock):
        def __enter__(self):  # type: ignore[no-untyped-def]
            got = super().__enter__()
            state["held"] += 1
            return got

        def __exit__(self, *exc: object) -> None:
            state["held"] -= 1
            super().__exit__(*exc)

    real_sample = latency._sample

    def sample(*args, **kwargs):  # type: ignore[no-untyped-def]
        state["samples"] += 1
        state["unlocked"] += state["held"] != 1
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(fleet, "MachineLock", SpyLock)
    monkeypatch.setattr(latency, "_sample", sample)
    options = OptimizeOptions(num_feeds=2, max_pairs=4)
    job = fleet._Job(0, str(inputs[0]), "chain", str(tmp_path / "chain.onnx"), str(inputs[0]), options, False, 1, 30, str(tmp_path / "t.lock"))
    ret = fleet.run_job(job)
    assert ret.status == "ok", ret.error
    assert ret.kept == 1 and ret.speedup is not None  # timed: the rewrite and the model end to end
    assert state["samples"] > 0 and state["unlocked"] == 0 and state["held"] == 0


def test_reference_threads_cap_reference_sessions(inputs: list[Path]) -> None:
    from rewriter.validation.runtime import reference_session, reference_threads

    with reference_threads(1):
        capped = reference_session(str(inputs[0]))
    assert capped.get_session_options().intra_op_num_threads == 1
    assert reference_session(str(inputs[0])).get_session_options().intra_op_num_threads == 0


def test_pack_round_trip_is_byte_exact() -> None:
    model = parse(BN, 5)
    value = onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3))
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["unused"], value=value))
    before = model.SerializeToString()
    copy = onnx.ModelProto.FromString(before)
    packed = fleet._pack(copy)
    assert len(packed[0]) < len(before) // 2 and packed[1]
    assert fleet._unpack(packed).SerializeToString() == before


# -- the command line ----------------------------------------------------------------------------------------
runner = CliRunner()


def one_line_error(result, code: int = 2) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_exit_1_when_a_model_fails_with_the_others_written(inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    result = runner.invoke(app, ["optimize-many", *map(str, inputs), "--out-dir", str(out), "--no-latency", "--num-feeds", "2", "-j", "2"])
    line = one_line_error(result, 1)
    assert "1 of 6 model(s) failed" in line and str(inputs[3]) in line
    assert result.stdout.strip().splitlines()[-1].startswith("5 of 6 model(s) ok (2 worker process(es)")
    assert {f for f in os.listdir(out) if f.endswith(".onnx")} == {"chain.onnx", "bn.onnx", "gemms.onnx", "noop.onnx", "chain-2.onnx"}
    assert json.loads((out / "summary.json").read_text())["exit_code"] == 1


def test_cli_all_ok_exit_0_quiet(inputs: list[Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["--quiet", "optimize-many", str(inputs[0]), str(inputs[1]), "--out-dir", str(tmp_path), "--no-latency"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines() == [result.stdout.strip()]  # the result line only
    assert result.stdout.startswith("2 of 2 model(s) ok (2 worker process(es)")


def test_cli_ray_missing_is_a_usage_error(inputs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    out = tmp_path / "out"
    result = runner.invoke(app, ["optimize-many", str(inputs[0]), "--out-dir", str(out), "--ray-address", "auto"])
    assert one_line_error(result) == "error: Ray is not installed: pip install 'onnx-bottleneck[ray]'"
    assert not out.exists()
    metric = tmp_path / "metric.py"
    metric.write_text("from rewriter.validation.sharded import NpzTop1Accuracy\nmetric = NpzTop1Accuracy(('x.npz',))\n")
    result = runner.invoke(app, ["optimize", str(inputs[0]), "-o", str(tmp_path / "o.onnx"), "--metric", f"{metric}:metric",
                                 "--metric-ray-address", "auto"])
    assert one_line_error(result) == "error: Ray is not installed: pip install 'onnx-bottleneck[ray]'"
    assert not (tmp_path / "o.onnx").exists()


def test_cli_unreachable_ray_cluster_is_a_usage_error(inputs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class NoCluster:
        @staticmethod
        def is_initialized() -> bool:
            return False

        @staticmethod
        def init(**kwargs: object) -> None:
            raise ConnectionError("Could not find any running Ray instance.\nmore detail")

    monkeypatch.setitem(sys.modules, "ray", NoCluster)
    out = tmp_path / "out"
    result = runner.invoke(app, ["optimize-many", str(inputs[0]), "--out-dir", str(out), "--ray-address", "auto"])
    assert one_line_error(result) == "error: cannot connect to the Ray cluster at 'auto': Could not find any running Ray instance."
    assert not out.exists()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("out-dir-is-a-file", "--out-dir is not a directory"),
        ("unknown-pass", "unknown pass 'nope'"),
        ("overwrites-input", "would overwrite the input"),
        ("no-speedup-without-latency", "--fail-if-no-speedup needs latency"),
    ],
)
def test_cli_usage_errors_exit_2_before_any_job(case: str, expected: str, inputs: list[Path], tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    model = models_dir / "chain.onnx"
    model.write_bytes(inputs[0].read_bytes())
    out, extra = tmp_path / "out", ["--no-latency"]
    if case == "out-dir-is-a-file":
        out.write_text("not a folder")
    elif case == "unknown-pass":
        extra += ["--passes", "nope"]
    elif case == "overwrites-input":
        out = models_dir  # chain.onnx would be written over the input
    else:
        extra = ["--no-latency", "--fail-if-no-speedup"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert expected in one_line_error(runner.invoke(app, ["optimize-many", str(model), "--out-dir", str(out), *extra]))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written or changed


def test_library_usage_errors_raise_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no models"):
        optimize_many([], tmp_path)
    with pytest.raises(InputError, match="--jobs"):
        optimize_many(["x.onnx"], tmp_path, jobs=0)
