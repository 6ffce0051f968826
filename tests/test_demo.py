"""`make demo` works: the example DAG runs under `airflow dags test` and a real PNG lands on disk."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_demo_writes_a_png() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py")], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.search(r"Output file: (\S+\.png) \((\d+) bytes, PNG\)", result.stdout)
    assert match, result.stdout[-3000:]
    path = Path(match[1])
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert path.stat().st_size == int(match[2]) > 0
