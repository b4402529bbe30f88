"""``python -m rewriter.cli``: the console script."""

from rewriter.cli import main

main()
