"""A few example command lines per command, shown at the end of its ``--help`` (the command's epilog).

Each example is a real command line (``tests/test_cli_help.py`` checks that every option it names exists);
``examples/digits_task.py`` is the data loader and top-1 metric of the trained digits CNN that ``make demo``
runs.
"""

from __future__ import annotations

#: Command name -> (what it shows, command line) pairs, in the order shown.
EXAMPLES: dict[str, tuple[tuple[str, str], ...]] = {
    "analyze": (
        ("Where the MACs are: the expensive KxK convs, ranked",
         "onnx-bottleneck analyze model.onnx --top 10"),
        ("A dynamic batch dim fixed, the analysis as JSON",
         "onnx-bottleneck analyze model.onnx --input-shape input:8x3x224x224 --json analysis.json"),
    ),
    "passes": (
        ("The passes, exact and lossy", "onnx-bottleneck passes"),
    ),
    "optimize": (
        ("Exact passes only (the default), with the JSON and HTML reports",
         "onnx-bottleneck optimize model.onnx -o model.opt.onnx --report report.json --html report.html"),
        ("Lossy bottlenecks under a budget, real data and a task metric scored on held-out data",
         "onnx-bottleneck optimize models/digits/digits_cnn.onnx -o digits.opt.onnx --passes bottleneck "
         "--max-error 'cosine>=0.999' --input-shape input:8x1x32x32 --data-loader-script examples/digits_task.py:load_data "
         "--metric examples/digits_task.py:top1 --max-metric-drop 0.01 --time-budget 120"),
        ("One plain line per decision (CI logs), the kept rewrites saved as a plan",
         "onnx-bottleneck optimize model.onnx -o model.opt.onnx --save-plan plan.json -v"),
    ),
    "optimize-many": (
        ("Many models, four at a time, one report each and a summary",
         "onnx-bottleneck optimize-many zoo/*.onnx --out-dir out --jobs 4"),
        ("Per-model settings from a config file",
         "onnx-bottleneck optimize-many zoo/*.onnx --out-dir out --config job.toml"),
    ),
    "apply": (
        ("Replay a saved plan without measuring",
         "onnx-bottleneck apply model.onnx --plan plan.json -o model.opt.onnx"),
    ),
    "validate": (
        ("An exact rewrite: outputs within --rtol/--atol and not slower",
         "onnx-bottleneck validate model.onnx model.opt.onnx"),
        ("A lossy one, on your inputs",
         "onnx-bottleneck validate model.onnx fast.onnx --max-error 'cosine>=0.999' --feeds inputs.npz"),
    ),
    "sweep": (
        ("The speedup-vs-error curve of the bottleneck pass, as an HTML page",
         "onnx-bottleneck sweep model.onnx --max-error 'cosine>=0.99' --html curve.html"),
    ),
    "bench": (
        ("Latency and each op type's share, one thread",
         "onnx-bottleneck bench model.onnx --runs 100 --threads 1"),
    ),
}


def epilog(command: str) -> str:
    """The ``--help`` epilog of ``command``: its examples (rich markup; a blank line between paragraphs)."""
    shown = ["[b]Examples[/b]"]
    for what, line in EXAMPLES[command]:
        shown.append(f"{what}:\n\n  [cyan]$ {line}[/cyan]")
    return "\n\n".join(shown)
