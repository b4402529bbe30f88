"""Command-line interface: a thin layer over the library (``onnx-bottleneck``, :func:`main`).

The commands compose option groups (:mod:`rewriter.cli.groups`); each group declares its flags once and
builds one library object. Results are drawn by :mod:`rewriter.cli.tables`.

Exit codes: 0 success; 1 a gate failed (numerics, metric, or slower than the input) and no output model
was written; 2 bad input or usage, reported in one line (``--debug`` shows the traceback).
"""

from __future__ import annotations

from rewriter.cli import commands, commands_optimize
from rewriter.cli.app import app
from rewriter.cli.examples import epilog

__all__ = ["app", "hoist_global_flags", "main"]

# In the order --help lists them; each command's --help ends with its examples.
app.command(epilog=epilog("analyze"))(commands.analyze)
app.command(name="passes", epilog=epilog("passes"))(commands.list_passes)
app.command(epilog=epilog("optimize"))(commands_optimize.optimize)
app.command(name="optimize-many", epilog=epilog("optimize-many"))(commands_optimize.optimize_many_cmd)
app.command(name="apply", epilog=epilog("apply"))(commands_optimize.apply_plan_cmd)
app.command(epilog=epilog("validate"))(commands.validate)
app.command(epilog=epilog("sweep"))(commands.sweep)
app.command(epilog=epilog("bench"))(commands.bench)


#: The app's own flags (``--debug``, ``--verbose``, ``--quiet``), accepted after the command too.
GLOBAL_FLAGS = ("--debug", "--verbose", "-v", "--quiet", "-q")


def hoist_global_flags(argv: list[str]) -> list[str]:
    """``argv`` with the app's own flags moved before the command, so ``optimize m.onnx -o o.onnx -q`` means
    ``-q optimize m.onnx -o o.onnx``. Nothing after a ``--`` moves; no command takes these flags itself."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in GLOBAL_FLAGS]
    rest = [a for a in argv[:end] if a not in GLOBAL_FLAGS]
    return flags + rest + argv[end:]


def main() -> None:
    """Console-script entry point."""
    import sys

    app(args=hoist_global_flags(sys.argv[1:]))
