"""The package's shape as ARCHITECTURE.md describes it: layers import downward, no circle, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "airflow_provider_modelroute"
NAME = PACKAGE.name

#: Module (or package prefix) -> layer, lowest first; a module may import only its own layer or lower.
LAYERS: dict[str, int] = {
    "__init__": 0,
    "api": 0,
    "version_compat": 0,
    "exceptions": 0,
    "metrics": 0,
    "get_provider_info": 0,
    "hooks": 1,
    "webhooks.mode": 1,
    "triggers": 2,
    "utils": 2,
    "utils.assets": 2,
    "operators": 3,
    "sensors": 3,
    "transfers": 3,
    "decorators": 4,
    "webhooks": 4,
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).with_suffix("")
        if relative.parts[0] == "testing":
            continue
        parts = (
            relative.parts[:-1] if relative.name == "__init__" and len(relative.parts) > 1 else relative.parts
        )
        found[".".join(parts)] = path
    return found


def _layer(module: str) -> int:
    candidates = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    assert candidates, f"{module} is in no layer: add it to LAYERS and ARCHITECTURE.md"
    return LAYERS[max(candidates, key=len)]


def _imports(path: Path) -> set[str]:
    """The package's own modules that ``path`` imports (at any depth: lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(NAME):
            base = node.module[len(NAME) + 1 :]
            found.add(base or "__init__")
            if not base:  # ``from airflow_provider_modelroute import api``
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name[len(NAME) + 1 :] for a in node.names if a.name.startswith(NAME + "."))
    return found


#: Lines of the package, testing/ aside: a ceiling that only comes down.
PACKAGE_BUDGET = 4000

MODULES = _modules()
GRAPH = {module: {i for i in _imports(path) if i in MODULES} - {module} for module, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downward_only(module: str) -> None:
    upward = sorted(i for i in GRAPH[module] if _layer(i) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports upward: {upward}"


def test_no_import_circle() -> None:
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        assert module not in stack, "import circle: " + " -> ".join([*stack[stack.index(module) :], module])
        if module in done:
            return
        for target in sorted(GRAPH[module]):
            visit(target, [*stack, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


def test_modules_stay_small() -> None:
    sizes = {path: len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    over = {
        str(p.relative_to(PACKAGE)): n
        for p, n in sizes.items()
        if n > (450 if "testing" in p.relative_to(PACKAGE).parts else 400)
    }
    assert not over, f"modules over the limit (400 lines, 450 in testing/): {over}"
    package = sum(n for p, n in sizes.items() if "testing" not in p.relative_to(PACKAGE).parts)
    assert package <= PACKAGE_BUDGET, f"the package (testing/ aside) has {package} lines"
