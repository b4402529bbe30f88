"""The zoo benchmark's section of docs/bench.md: rendered from a job's summary, spliced in between its
markers (the rest of the file as it was), kept when ``make bench`` rewrites the file; and its config file
is one ``optimize-many`` accepts."""

from __future__ import annotations

from pathlib import Path

from benchmarks.zoo import CONFIG, END, START, kept_section, render, splice
from rewriter.config import load_config
from rewriter.zoo import model_settings

META = {"date": "2026-12-03", "machine": "a CPU, 2 logical cores", "versions": "python 3.11", "args": ""}


def summary() -> dict:
    base = {"error": None, "kept": 0, "rolled_back": 0, "not_tried": 0, "speedup": None, "speedup_ci": None,
            "macs_before": 2_000_000_000, "macs_after": 2_000_000_000, "seconds": 12.0}
    return {
        "mode": "local", "workers": 2, "counts": {"ok": 2, "gate-failed": 0, "error": 1, "pending": 0, "total": 3},
        "models": [
            base | {"name": "ppocr-cls", "status": "ok", "kept": 3, "speedup": 1.05, "speedup_ci": [1.01, 1.09], "macs_after": 1_500_000_000,
                    "settings": {"tables": ["ppocr*", "ppocr-cls"], "input_shapes": {"x": [1, 3, 48, 192]}, "options": {}, "input_shape_notes": []}},
            base | {"name": "resnet18", "status": "ok",
                    "settings": {"tables": [], "input_shapes": {}, "options": {},
                                 "input_shape_notes": [{"input": "input", "dim": 0, "declared": "N", "value": 1, "note": "..."}]}},
            base | {"name": "odd", "status": "error", "error": "input 'x' has dynamic dims; pass --input-shape x:1x3xHxW",
                    "macs_before": None, "macs_after": None, "settings": {}},
        ],
    }


def test_the_section_names_every_model_and_the_rate() -> None:
    text = render(summary(), 360.0, 1, META)
    assert text.startswith(START) and text.rstrip().endswith(END)
    assert "**Job wall time 360 s** (6.0 min, the CLI's start-up included) for 3 models: **30 models per hour**" in text
    assert '| ppocr-cls | ok | `x:1x3x48x192` (from `[models."ppocr*"]`, `[models."ppocr-cls"]`) | 3 | 0 | 0 | 2.00 -> 1.50 | 1.05x [1.01, 1.09] | 12.0 |' in text
    assert "| resnet18 | ok | -; defaulted: `input` batch N -> 1 | 0 | 0 | 0 | 2.00 -> 2.00 | 1 (no change) | 12.0 |" in text
    assert "| odd | error: input 'x' has dynamic dims; pass --input-shape x:1x3xHxW | - |" in text


def test_splice_replaces_only_the_section_and_bench_keeps_it() -> None:
    section = render(summary(), 360.0, 1, META)
    doc = "# Benchmarks\n\nthe rest\n"
    once = splice(doc, section)
    assert once.startswith(doc) and once.endswith(section)
    again = splice(once.replace("the rest", "the rest, rewritten"), render(summary(), 720.0, 1, META))
    assert again.count(START) == 1 and "the rest, rewritten" in again and "**Job wall time 720 s**" in again
    assert kept_section(once) == section and kept_section(doc) is None


def test_the_committed_zoo_config_is_valid() -> None:
    cfg = load_config(CONFIG)
    assert cfg.options == {"input-shape": ["images:1x3x320x320"]}
    tables = model_settings(cfg)
    assert [t.pattern for t in tables] == ["ppocr*", "ppocr-cls"]
    assert tables[0].matches(Path("ppocrv4-det.onnx")) and tables[1].input_shapes == {"x": (1, 3, 48, 192)}
