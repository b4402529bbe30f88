"""The house rules that a reviewer would otherwise have to count: no function in rewriter/ or passes/ longer
than 80 lines, no module longer than 600, unless its docstring says why ("long because ...")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("rewriter", "passes") for p in (ROOT / d).rglob("*.py"))
MAX_FUNCTION, MAX_MODULE = 80, 600
EXCUSE = "long because"


def _excused(node: ast.AST) -> bool:
    doc = ast.get_docstring(node) or ""  # type: ignore[arg-type]
    return EXCUSE in doc.lower()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_are_short(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_MODULE or _excused(tree), f"{path.name}: {lines} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"  # type: ignore[operator]
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION  # type: ignore[operator]
        and not _excused(node)
    ]
    assert not long, f"{path.name}: {', '.join(long)}"


def test_the_rule_can_fail(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION))
    path = tmp_path / "long.py"
    path.write_text(f"def f():\n{body}\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="f \\(81 lines\\)"):
        test_modules_and_functions_are_short(path)
    path.write_text(f'def f():\n    """Long because a table of cases reads best in one place."""\n{body}\n', encoding="utf-8")
    test_modules_and_functions_are_short(path)
