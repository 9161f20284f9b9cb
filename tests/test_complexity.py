"""No function or method in graphopt/ has a cyclomatic complexity above 15 (radon's count): long
decisions become named steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from radon.complexity import cc_visit

ROOT = Path(__file__).resolve().parents[1] / "graphopt"
LIMIT = 15


def _functions(blocks: list) -> dict[int, Any]:
    """Every function and method by line, nested ones included (radon lists closures on their function,
    and the methods of nested classes only on the class)."""
    found: dict[int, Any] = {}
    for block in blocks:
        if hasattr(block, "methods"):
            found.update(_functions([*block.methods, *block.inner_classes]))
        else:
            found[block.lineno] = block
            found.update(_functions(block.closures))
    return found


def test_no_function_is_too_complex() -> None:
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        for block in _functions(cc_visit(path.read_text())).values():
            if block.complexity > LIMIT:
                offenders.append(f"{path.relative_to(ROOT.parent)}:{block.lineno}: {block.fullname} "
                                 f"(complexity {block.complexity})")
    assert not offenders, f"functions above cyclomatic complexity {LIMIT} (split them into named steps):\n  " + \
        "\n  ".join(offenders)
