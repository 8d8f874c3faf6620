"""The Python blocks of README.md and docs/*.md run as written, so the
documentation cannot rot.

Each block runs on its own in a fresh process and namespace, from an empty
directory (forked from a server that has imported torch: tests/helpers.py).
A block whose first line starts with "# Fragment:" (saying what it needs) is
part of a larger program and only has to compile. Where a block says
"# prints:", the comment lines after it are its exact output.
"""

import re
from pathlib import Path

import pytest

from helpers import run_python

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = "# Fragment:"
PRINTS = "# prints:\n"


def python_blocks():
    for document in DOCUMENTS:
        text = document.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            yield f"{document.name}:{text.count(chr(10), 0, match.start()) + 1}", match.group(1)


RUNNABLE = [pytest.param(code, id=where) for where, code in python_blocks() if not code.startswith(FRAGMENT)]
FRAGMENTS = [pytest.param(code, id=where) for where, code in python_blocks() if code.startswith(FRAGMENT)]


def test_the_documents_have_blocks_of_both_kinds():
    assert len(RUNNABLE) >= 4 and len(FRAGMENTS) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("code", RUNNABLE)
def test_block_runs_as_written(code, tmp_path):
    result = run_python("-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    if PRINTS in code:
        expected = [line[2:] for line in code.split(PRINTS, 1)[1].splitlines()]
        assert result.stdout.splitlines() == expected


@pytest.mark.parametrize("code", FRAGMENTS)
def test_fragment_compiles(code):
    compile(code, "<documentation>", "exec")
