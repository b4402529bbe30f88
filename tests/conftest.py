"""Fixtures shared across the suite."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
from hypothesis import settings

# Property tests: a few hundred examples by default; `make fuzz` selects the "fuzz" profile.
settings.register_profile("default", max_examples=200, deadline=None)
settings.register_profile("fuzz", max_examples=10_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

from models.sample import build_sample


@pytest.fixture(autouse=True)
def _restore_loggers() -> Iterator[None]:
    """The CLI installs a stderr handler on the 'rewriter' and 'passes' loggers; undo it after each test."""
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in ("rewriter", "passes")}
    yield
    for name, (handlers, level) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="session")
def sample_model() -> onnx.ModelProto:
    return build_sample(seed=0)


@pytest.fixture()
def sample_path(tmp_path: Path, sample_model: onnx.ModelProto) -> Path:
    path = tmp_path / "sample.onnx"
    onnx.save_model(sample_model, path)
    return path


def corpus_dir() -> Path | None:
    value = os.environ.get("ONNX_BOTTLENECK_CORPUS")
    return Path(value) if value else None


@pytest.fixture(scope="session")
def corpus() -> Path:
    """Folder of the fetched corpus models (``make test-corpus`` sets ONNX_BOTTLENECK_CORPUS)."""
    folder = corpus_dir()
    if folder is None or not folder.is_dir():
        pytest.fail("corpus tests need ONNX_BOTTLENECK_CORPUS pointing at scripts/fetch_corpus.py's folder (run make test-corpus)")
    return folder


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[object]:
    """A real local Ray cluster of 2 CPUs for the tests of one module (skipped where Ray is not installed);
    shut down after them, so that its idle processes do not share the CPUs with other modules' timings."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, object_store_memory=128 * 1024 * 1024)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def report_validator():  # type: ignore[no-untyped-def]
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra: pip install -e '.[dev]'")
    schema = json.loads((Path(__file__).resolve().parents[1] / "docs" / "report.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)
