"""The README's Python snippets run as written (a DAG definition parses; test snippets pass)."""

from __future__ import annotations

import inspect
import os
import re

import pytest

from tests.conftest import REPO, needs_airflow_sdk

SNIPPETS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize(
    "index",
    [
        pytest.param(i, marks=needs_airflow_sdk(f"README snippet #{i}")) if "airflow.sdk" in s else i
        for i, s in enumerate(SNIPPETS)
    ],
)
def test_snippet_runs(index: int, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    saved = dict(os.environ)
    namespace: dict = {"__name__": f"readme_snippet_{index}"}
    try:
        exec(compile(SNIPPETS[index], f"README.md[python #{index}]", "exec"), namespace)
        tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
        for test in tests:
            test(**({"tmp_path": tmp_path} if "tmp_path" in inspect.signature(test).parameters else {}))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if "DAG(" in SNIPPETS[index]:
        assert any(type(v).__name__ == "DAG" for v in namespace.values())
