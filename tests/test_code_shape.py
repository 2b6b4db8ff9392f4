"""No function of the package (scvi_scale/ and kernels/) is longer than MAX_LINES, its docstring included, unless
its docstring says why it reads better whole, with the words of WHOLE_MARKER."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80
WHOLE_MARKER = "reads better whole"


def long_functions(root: Path = ROOT) -> list[str]:
    """'path:line name (n lines)' of each function under root's scvi_scale/ and kernels/ over MAX_LINES lines whose
    docstring lacks WHOLE_MARKER."""
    found = []
    for folder in (root / "scvi_scale", root / "kernels"):
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES and WHOLE_MARKER not in " ".join((ast.get_docstring(node) or "").split()):
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_max_lines_without_saying_why():
    assert not long_functions(), (
        f"functions over {MAX_LINES} lines: split them into named steps, or say in the docstring why each "
        f"{WHOLE_MARKER!r}:\n" + "\n".join(long_functions())
    )


def test_the_walk_finds_a_long_function_and_honours_the_marker(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "scvi_scale").mkdir()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "scvi_scale" / "long.py").write_text(f"def long():\n{body}\n")
    (tmp_path / "kernels" / "whole.py").write_text(f'def whole():\n    """It {WHOLE_MARKER}: one loop."""\n{body}\n')
    (tmp_path / "kernels" / "short.py").write_text(f"def short():\n{body[: body.rindex(chr(10))]}\n")
    assert long_functions(tmp_path) == [f"scvi_scale/long.py:1 long ({MAX_LINES + 1} lines)"]
