"""Every fenced Python block in README.md and docs/*.md runs as written (each block on its own,
in a fresh process and an empty folder), so the documentation cannot drift from the code."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def _blocks():
    for document in DOCUMENTS:
        text = document.read_text()
        for number, match in enumerate(BLOCK.finditer(text), 1):
            line = text[: match.start()].count("\n") + 1
            yield pytest.param(match.group(1), id=f"{document.name}:{line}")


BLOCKS = list(_blocks())


def test_the_documents_hold_python_blocks():
    names = {block.id.split(":")[0] for block in BLOCKS}
    assert {"README.md", "distributed.md"} <= names


@pytest.mark.parametrize("code", BLOCKS)
def test_block_runs_as_written(code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
