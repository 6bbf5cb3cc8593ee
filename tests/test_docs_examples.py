"""The README's and docs' Python examples run as written and print what the page says they print.

Conventions for a page (also described in docs/index.md, "Writing examples"):

* a ```` ```python ```` block is executed; when it prints, the ```` ```output ```` block right after
  it holds the expected output, compared as doctest does (``...`` matches anything, whitespace is
  normalised);
* a ``try:`` whose ``except`` documents an error must raise it: the block fails when nothing is
  raised (``# may not raise`` on the ``try:`` line opts out);
* a block that cannot run on its own (it needs a cluster, a user's model) is a ```` ```py ````
  block with ``<!-- sketch: why -->`` on the line above; it is not run.
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
SKETCH = re.compile(r"<!--\s*sketch:[^>]*-->\s*$")
PYTHON_INFOS = {"py", "python", "python3", "pycon"}
CHECKER = doctest.OutputChecker()
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass(frozen=True)
class Example:
    name: str
    code: str
    expected: str | None  # the ```output block after it, if any


@dataclass(frozen=True)
class Fence:
    document: Path
    info: str
    body: str
    start: int
    end: int


def _fences(document: Path) -> list[Fence]:
    text = document.read_text()
    return [
        Fence(document, m.group("info").strip(), m.group("body"), m.start(), m.end())
        for m in FENCE.finditer(text)
    ]


def parse_examples(document: Path, name: str | None = None) -> list[Example]:
    """The executable examples of one page, each with the expected output that follows it."""
    text = document.read_text()
    fences = _fences(document)
    label = name or str(document.relative_to(ROOT))
    examples = []
    for position, fence in enumerate(fences):
        if fence.info.split()[:1] != ["python"]:
            continue
        expected = None
        following = fences[position + 1] if position + 1 < len(fences) else None
        if (
            following is not None
            and following.info == "output"
            and not text[fence.end : following.start].strip()
        ):
            expected = following.body
        examples.append(Example(f"{label}#{len(examples)}", fence.body, expected))
    return examples


def unmarked_sketches(document: Path, name: str | None = None) -> list[str]:
    """Python-like blocks that are neither run (```python) nor marked ``<!-- sketch: ... -->``."""
    text = document.read_text()
    label = name or str(document.relative_to(ROOT))
    problems = []
    for fence in _fences(document):
        language = fence.info.split()[0] if fence.info.split() else ""
        if language == "python" or language not in PYTHON_INFOS:
            continue
        before = text[: fence.start].rstrip("\n").rsplit("\n", 1)[-1]
        if not SKETCH.search(before):
            line = text[: fence.start].count("\n") + 1
            problems.append(
                f"{label}:{line}: ```{fence.info} block without <!-- sketch: why -->: run it or mark it"
            )
    return problems


class _ExpectDocumentedError(ast.NodeTransformer):
    """``try: ... except E: ...`` in an example documents that E is raised: fail when it is not."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def visit_Try(self, node: ast.Try) -> ast.Try:
        self.generic_visit(node)
        line = self.lines[node.lineno - 1] if node.lineno - 1 < len(self.lines) else ""
        if node.handlers and not node.orelse and not node.finalbody and "may not raise" not in line:
            caught = " or ".join(ast.unparse(h.type) if h.type else "an exception" for h in node.handlers)
            message = f"line {node.lineno}: the example documents {caught}, but nothing was raised"
            node.orelse = [
                ast.Raise(exc=ast.Call(ast.Name("AssertionError", ast.Load()), [ast.Constant(message)], []))
            ]
        return node


def run_example(example: Example) -> str:
    """Execute an example (documented errors enforced) and return what it printed."""
    tree = ast.parse(example.code, example.name)
    tree = ast.fix_missing_locations(_ExpectDocumentedError(example.code.splitlines()).visit(tree))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(tree, example.name, "exec"), {"__name__": "__example__"})
    return printed.getvalue()


def check_output(example: Example, printed: str) -> None:
    if example.expected is None:
        assert not printed.strip(), (
            f"{example.name} prints, but the page does not show what: add an ```output block right after "
            f"it with\n{printed}"
        )
        return
    if not CHECKER.check_output(example.expected, printed, FLAGS):
        raise AssertionError(
            f"{example.name}: the printed output differs from the page's ```output block:\n"
            + CHECKER.output_difference(doctest.Example("", example.expected), printed, FLAGS)
        )


def _all_examples() -> list[Example]:
    return [example for document in DOCUMENTS for example in parse_examples(document)]


def test_readme_has_examples() -> None:
    assert any(example.name.startswith("README.md") for example in _all_examples())


def test_every_python_block_is_run_or_marked_as_a_sketch() -> None:
    problems = [problem for document in DOCUMENTS for problem in unmarked_sketches(document)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("example", _all_examples(), ids=lambda example: example.name)
def test_example_runs_and_prints_what_the_page_says(
    example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "keras" in example.name:
        pytest.importorskip("tensorflow", reason="the Keras docs need: pip install bbdecoder[tensorflow]")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    os.environ.setdefault("MPLBACKEND", "Agg")
    check_output(example, run_example(example))


# The checker itself: each rule fails when it should.


def _page(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(text)
    return path


def test_a_documented_error_that_is_not_raised_fails(tmp_path: Path) -> None:
    page = _page(tmp_path, "```python\ntry:\n    x = 1\nexcept ValueError as error:\n    print(error)\n```\n")
    (example,) = parse_examples(page, "page")
    with pytest.raises(AssertionError, match="documents ValueError, but nothing was raised"):
        run_example(example)
    raising = _page(tmp_path, "```python\ntry:\n    int('x')\nexcept ValueError:\n    pass\n```\n")
    assert run_example(parse_examples(raising, "page")[0]) == ""
    optional = _page(
        tmp_path, "```python\ntry:  # may not raise\n    x = 1\nexcept ImportError:\n    pass\n```\n"
    )
    assert run_example(parse_examples(optional, "page")[0]) == ""


def test_printed_output_is_compared_with_the_page(tmp_path: Path) -> None:
    page = _page(tmp_path, "```python\nprint(1 + 1, [0.5] * 3)\n```\n\n```output\n2 [0.5, ...]\n```\n")
    (example,) = parse_examples(page, "page")
    assert example.expected == "2 [0.5, ...]\n"
    check_output(example, run_example(example))
    wrong = Example("page#0", example.code, "3 [0.5, 0.5, 0.5]\n")
    with pytest.raises(AssertionError, match="differs from the page"):
        check_output(wrong, run_example(wrong))
    silent = Example("page#0", example.code, None)
    with pytest.raises(AssertionError, match="add an ```output block"):
        check_output(silent, run_example(silent))


def test_an_unmarked_py_block_is_reported(tmp_path: Path) -> None:
    page = _page(tmp_path, "```py\nundefined()\n```\n\n<!-- sketch: needs a cluster -->\n```py\nx()\n```\n")
    problems = unmarked_sketches(page, "page")
    assert len(problems) == 1 and problems[0].startswith("page:1:")
    assert parse_examples(page, "page") == []
