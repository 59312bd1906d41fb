"""The project's size budget, enforced: no module over 800 lines, no function over 60.

A function's length is its lines from ``def`` to its last line, its docstring not counted.
A hot loop kept whole for speed may be longer if it says so: a comment

    # hot path: <why, with the numbers> benchmarks/<file>.py

right above the ``def`` or among the first lines of its body (after the docstring), naming
the benchmark that shows why (the file must exist). The comment may run over several
``#`` lines.

The checker walks src/, tests/ and benchmarks/ (recursively) and scripts/*.py with ast; the
tests below also run it on a fake tree, to show that it fails where it should.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 60
#: How many lines after the docstring (or above the def) a hot-path comment may start.
HOT_PATH_WINDOW = 8
_HOT_PATH = re.compile(r"#\s*hot path:")
_BENCHMARK = re.compile(r"benchmarks/([\w.-]+\.py)")

_Func = ast.FunctionDef | ast.AsyncFunctionDef


def python_files(root: Path) -> list[Path]:
    """The files under the budget: src/, tests/, benchmarks/ (recursively), scripts/*.py."""
    files: list[Path] = []
    for top in ("src", "tests", "benchmarks"):
        files.extend(p for p in (root / top).rglob("*.py") if "__pycache__" not in p.parts)
    files.extend((root / "scripts").glob("*.py"))
    return sorted(files)


def _docstring_lines(node: _Func) -> int:
    first = node.body[0]
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        return (first.end_lineno or first.lineno) - first.lineno + 1
    return 0


def function_length(node: _Func) -> int:
    """Lines from ``def`` to the function's end, its docstring excluded."""
    return (node.end_lineno or node.lineno) - node.lineno + 1 - _docstring_lines(node)


def _comment_block(lines: list[str], start: int) -> str:
    """The comment starting at ``lines[start]`` and the ``#`` lines right after it."""
    block = [lines[start].strip()]
    for line in lines[start + 1:]:
        if not line.strip().startswith("#"):
            break
        block.append(line.strip())
    return " ".join(block)


def hot_path_benchmark(node: _Func, lines: list[str]) -> str | None:
    """The benchmark a ``# hot path:`` comment above or at the top of ``node`` names, or
    None if there is no such comment. ``lines`` is the module's source, 0-based."""
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    top = first - 2  # 0-based: the line above the def; the comment block right above it
    while top >= 0 and lines[top].lstrip().startswith("#"):
        top -= 1
    above = range(top + 1, first - 1)
    body = node.body[0]
    after_doc = body.end_lineno or body.lineno if _docstring_lines(node) else body.lineno - 1
    inside = range(node.lineno, min(after_doc + HOT_PATH_WINDOW, node.end_lineno or 0))
    for i in [*above, *inside]:
        if _HOT_PATH.search(lines[i]) and lines[i].lstrip().startswith("#"):
            m = _BENCHMARK.search(_comment_block(lines, i))
            return m.group(1) if m else ""
    return None


def check_file(path: Path, root: Path) -> list[str]:
    """What in ``path`` breaks the budget, one line each (empty: nothing)."""
    rel = path.relative_to(root)
    text = path.read_text()
    lines = text.splitlines()
    problems = []
    if len(lines) > MAX_MODULE_LINES:
        problems.append(f"{rel}: module of {len(lines)} lines (budget {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(text, str(rel))):
        if not isinstance(node, _Func):
            continue
        n = function_length(node)
        if n <= MAX_FUNCTION_LINES:
            continue
        bench = hot_path_benchmark(node, lines)
        where = f"{rel}:{node.lineno}: function {node.name} of {n} lines"
        if bench is None:
            problems.append(f"{where} (budget {MAX_FUNCTION_LINES}, docstring excluded; a hot"
                            " loop kept whole says '# hot path: ... benchmarks/<file>.py')")
        elif not bench or not (root / "benchmarks" / bench).is_file():
            problems.append(f"{where}: its hot-path comment names no existing "
                            f"benchmarks/<file>.py ({bench or 'none named'})")
    return problems


def check_tree(root: Path, files: Iterable[Path] | None = None) -> list[str]:
    """Every breach of the budget under ``root`` (or in ``files``)."""
    problems: list[str] = []
    for path in python_files(root) if files is None else files:
        problems.extend(check_file(path, root))
    return problems


# ------------------------------------------------------------------------------ the project


def test_the_project_keeps_its_size_budget() -> None:
    problems = check_tree(ROOT)
    assert not problems, "over the size budget:\n" + "\n".join(problems)


def test_the_walk_sees_the_project() -> None:
    files = {p.relative_to(ROOT).as_posix() for p in python_files(ROOT)}
    assert "src/pynbd/protocol/replies.py" in files
    assert "tests/unit/test_size_budget.py" in files
    assert "benchmarks/tool_copy.py" in files


# ------------------------------------------------------------------------------ the checker


def _function(name: str, code_lines: int, doc_lines: int = 0, comment: str = "",
              at: int = 0) -> str:
    """A function of ``code_lines`` lines (def included) with a docstring of ``doc_lines``
    and ``comment`` as body line ``at`` (after the docstring)."""
    out = [f"def {name}() -> None:"]
    if doc_lines == 1:
        out.append('    """Doc."""')
    elif doc_lines:
        out += ['    """Doc.', *["    more"] * (doc_lines - 2), '    """']
    body = [f"    x{i} = {i}" for i in range(code_lines - 1)]
    if comment:
        body.insert(at, f"    {comment}")
        body.pop()
    return "\n".join(out + body) + "\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for d in ("src/pkg", "tests", "benchmarks", "scripts"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "benchmarks" / "speed.py").write_text("")
    return tmp_path


def _check(tree: Path, source: str, where: str = "src/pkg/mod.py") -> list[str]:
    path = tree / where
    path.write_text(source)
    return check_tree(tree)


def test_a_long_function_fails(tree: Path) -> None:
    problems = _check(tree, _function("ok", 60) + _function("too_long", 61))
    assert problems == [
        ("src/pkg/mod.py:61: function too_long of 61 lines (budget 60, docstring excluded;"
         " a hot loop kept whole says '# hot path: ... benchmarks/<file>.py')")]


def test_every_walked_place_is_checked(tree: Path) -> None:
    for where in ("tests/test_x.py", "benchmarks/deep/b.py", "scripts/s.py"):
        (tree / where).parent.mkdir(parents=True, exist_ok=True)
        assert any(p.startswith(f"{where}:1: function f of 70")
                   for p in _check(tree, _function("f", 70), where)), where
    (tree / "scripts" / "deeper").mkdir()
    (tree / "scripts" / "deeper" / "s.py").write_text(_function("f", 70))
    assert len(check_tree(tree)) == 3  # scripts/ is not walked into


def test_the_docstring_is_not_counted(tree: Path) -> None:
    assert _check(tree, _function("f", 60, doc_lines=30)) == []
    assert len(_check(tree, _function("f", 61, doc_lines=1))) == 1


def test_nested_and_async_functions_count(tree: Path) -> None:
    inner = "".join("    " + line + "\n" for line in _function("inner", 61).splitlines())
    src = "async def outer() -> None:\n" + inner + "    await inner()\n"
    problems = _check(tree, src)
    assert [p.split(": function ")[1].split(" of ")[0] for p in problems] == ["outer", "inner"]


def test_a_long_module_fails(tree: Path) -> None:
    assert _check(tree, "x = 1\n" * 800) == []
    assert _check(tree, "x = 1\n" * 801) == [
        "src/pkg/mod.py: module of 801 lines (budget 800)"]


def test_a_hot_path_comment_excuses_a_long_function(tree: Path) -> None:
    hot = "# hot path: one loop, a call per request costs 5%: benchmarks/speed.py"
    assert _check(tree, _function("f", 90, doc_lines=5, comment=hot, at=2)) == []
    above = f"{hot}\n" + _function("f", 90)
    assert _check(tree, above) == []
    # spread over several comment lines
    two = "# hot path: one loop, a call per request\n    # costs 5%: benchmarks/speed.py"
    assert _check(tree, _function("f", 90, comment=two, at=1)) == []


def test_a_hot_path_comment_must_be_at_the_top_and_name_a_benchmark(tree: Path) -> None:
    hot = "# hot path: one loop: benchmarks/speed.py"
    late = _check(tree, _function("f", 90, comment=hot, at=40))
    assert len(late) == 1 and "budget 60" in late[0]
    for comment, named in [("# hot path: trust me", "none named"),
                           ("# hot path: see benchmarks/gone.py", "gone.py")]:
        problems = _check(tree, _function("f", 90, comment=comment, at=1))
        assert problems == [("src/pkg/mod.py:1: function f of 90 lines: its hot-path comment"
                             f" names no existing benchmarks/<file>.py ({named})")]
    # the words in a string are not a comment
    assert len(_check(tree, _function("f", 90, comment='s = "# hot path: benchmarks/speed.py"',
                                      at=1))) == 1
