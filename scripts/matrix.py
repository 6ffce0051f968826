"""`make test-matrix`: the test suite on other Airflow versions, Pythons and dependency versions.

Each cell gets its own uv environment under ``.matrix/<cell>/`` and runs the fast suite without the
version-independent tests, ``pytest -m "not drill and not version_independent"`` (the production
drills run only in ``make drills``, on the latest Airflow; the tests of the local server, the pure
webhook core and the benchmarks' smoke runs only in ``make test``). ``make test`` itself is the cell
"Airflow 3.3 x Python 3.11 x highest dependencies".

A "lowest" cell installs the lowest versions of ``requests``, ``tenacity``, ``aiohttp`` and
``apache-airflow-providers-common-compat`` that our pyproject allows *together with that Airflow*:
``uv pip compile --resolution lowest-direct`` of our runtime requirements (Airflow pinned), then
those versions as ``==`` constraints on the full install (the test tools stay at their highest).

Usage: ``python scripts/matrix.py [--jobs N] [--list] [CELL ...]`` (see ``make test-matrix``).
Environment: ``UV`` (the uv binary), ``MATRIX_DIR`` (default ``.matrix``), ``MATRIX_STRICT=1``
(a cell whose Python cannot be found fails instead of being reported as not run),
``MATRIX_PYTEST_ARGS`` (default ``PYTEST_ARGS``: the fast suite of ``make test`` minus what it runs once).
Only the standard library: this runs on the Python that bootstraps uv, before any environment exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: our runtime requirements whose lower bounds a "lowest" cell installs
LOWEST_PACKAGES = ("requests", "tenacity", "aiohttp", "apache-airflow-providers-common-compat")
#: what a cell runs: the fast suite on two xdist workers, less what ``make test`` runs once
PYTEST_ARGS = '-m "not drill and not version_independent" -n 2'
#: versions reported per cell
REPORTED = ("apache-airflow", "apache-airflow-task-sdk", *LOWEST_PACKAGES)


@dataclass(frozen=True)
class Cell:
    name: str
    airflow: str  # a version specifier for apache-airflow, e.g. "==3.3.*"
    python: str  # "3.11"
    deps: str = "highest"  # or "lowest"
    #: resolve the Airflow ecosystem as it was on this date (its constraints file being out of reach),
    #: for an Airflow series whose dependencies have no upper bounds and broke with later releases
    as_of: str | None = None
    #: extra requirements, for what an Airflow's constraints file would pin (e.g. "cryptography<51")
    pins: tuple[str, ...] = ()

    def resolver_options(self) -> list[str]:
        if self.as_of is None:
            return []
        # ...except our own dependencies: the cell still tests their highest (or lowest) versions
        newest = [
            arg for name in LOWEST_PACKAGES for arg in ("--exclude-newer-package", f"{name}=2100-01-01")
        ]
        return ["--exclude-newer", self.as_of, *newest]

    def describe(self) -> str:
        return self.deps + (f"; Airflow's dependencies as of {self.as_of}" if self.as_of else "")


#: 3.0.6 is the last 3.0 release (uploaded between 2025-08-25 and 2025-09-01)
AIRFLOW_3_0_6_RELEASED = "2025-09-01"
#: 3.2.2 is the last 3.2 release (uploaded between 2026-05-27 and 2026-06-01)
AIRFLOW_3_2_2_RELEASED = "2026-06-01"

#: `make test` is 3.3 x py3.11 x highest (plus lint and the version-independent tests; `make drills`
#: too); these are the other cells: every supported Airflow minor, the lowest and highest Python, the
#: lowest dependencies on the oldest and the newest Airflow. Pythons and dependencies are combined
#: with the minors rather than crossed with them (a cross would be 5 x 4 x 2 cells). The slowest cells
#: come first, so that the last ones to start are short.
#: Airflow 2.11 and 3.1 cannot use a Fernet key with cryptography 51 (MultiFernet lost
#: ``is_encrypted``): their constraints files pin an older one, as the README tells users to.
CELLS = {
    cell.name: cell
    for cell in (
        # Airflow 3.2.2 bounds neither fastapi nor cadwyn (3.3 caps fastapi below 0.137): with their
        # later releases its execution API fails every task (a pydantic discriminator error, then a
        # missing svcs_registry on the app state). Resolve its ecosystem as of its release.
        Cell("af3.2-py3.11", "==3.2.*", "3.11", as_of=AIRFLOW_3_2_2_RELEASED),
        Cell("af3.1-py3.12", "==3.1.*", "3.12", pins=("cryptography<51",)),
        Cell("af3.3-py3.13", "==3.3.*", "3.13"),
        Cell("af3.3-py3.10-lowest", "==3.3.*", "3.10", "lowest"),
        # Airflow 3.0.6 bounds none of fastapi, cadwyn, starlette...: their 2026 releases break its
        # execution API (422 on every task start). Its constraints file pinned them; approximate it.
        Cell("af3.0-py3.12-lowest", "==3.0.*", "3.12", "lowest", as_of=AIRFLOW_3_0_6_RELEASED),
        Cell("af2.11-py3.10-lowest", "==2.11.*", "3.10", "lowest", pins=("cryptography<51",)),
    )
}


@dataclass
class Result:
    cell: Cell
    status: str = "not run"  # passed | FAILED | not run
    detail: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    install_seconds: float = 0.0
    test_seconds: float = 0.0


class CellError(Exception):
    pass


def log(cell: Cell, message: str) -> None:
    print(f"[{cell.name}] {message}", flush=True)


def run(command: list[str], *, logfile: Path | None = None, **kwargs: object) -> str:
    """Run a command; its output goes to ``logfile`` (appended) and is returned."""
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    output = result.stdout + result.stderr
    if logfile is not None:
        with logfile.open("a") as fh:
            fh.write(f"$ {shlex.join(command)}\n{output}\n")
    if result.returncode != 0:
        raise CellError(f"`{shlex.join(command[:4])} ...` exited {result.returncode}:\n{output[-3000:]}")
    return str(result.stdout)


def works(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import ssl, sqlite3"], capture_output=True).returncode == 0
    except OSError:
        return False


def find_python(uv: str, version: str) -> str | None:
    """An interpreter for ``version``: uv's discovery, pyenv's installs, PATH, or `uv python install`."""
    found = subprocess.run([uv, "python", "find", version], capture_output=True, text=True)
    candidates = [found.stdout.strip()] if found.returncode == 0 else []
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += [str(p / "bin" / "python3") for p in sorted(pyenv.glob(f"{version}.*"), reverse=True)]
    candidates += [shutil.which(f"python{version}") or ""]
    for candidate in candidates:
        if candidate and works(candidate):
            return candidate
    installed = subprocess.run([uv, "python", "install", version], capture_output=True, text=True)
    if installed.returncode == 0:
        found = subprocess.run([uv, "python", "find", version], capture_output=True, text=True)
        if found.returncode == 0 and works(found.stdout.strip()):
            return found.stdout.strip()
    return None


def runtime_requirements() -> list[str]:
    """``[project] dependencies`` of pyproject.toml (tomllib is 3.11+: a regex reads the simple list)."""
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, flags=re.S | re.M)
    if block is None:
        raise CellError("no [project] dependencies in pyproject.toml")
    return re.findall(r'"([^"]+)"', block[1])


def lower_bounds() -> dict[str, str]:
    """``{name: X}`` for each of LOWEST_PACKAGES required as ``name>=X`` in pyproject.toml."""
    bounds = {}
    for requirement in runtime_requirements():
        match = re.match(r"([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)", requirement)
        if match and match[1].lower() in LOWEST_PACKAGES:
            bounds[match[1].lower()] = match[2]
    return bounds


def compile_env(
    uv: str,
    python: str,
    requirements: list[str],
    workdir: Path,
    options: list[str],
    *,
    lowest: bool = False,
    full: bool = False,
) -> dict[str, str] | None:
    """Resolve without installing: ``{name: version}``, or None when there is no solution.

    ``full`` adds what a cell installs (the package with ``[testing]`` and the ``test`` group).
    """
    infile = workdir / "resolve.in"
    infile.write_text("\n".join(requirements) + "\n")
    command = [uv, "pip", "compile", "--quiet", "--no-header", "--no-annotate", "--python", python, *options]
    if lowest:
        command += ["--resolution", "lowest-direct"]
    if full:
        command += ["pyproject.toml", "--extra", "testing", "--group", "pyproject.toml:test"]
    try:
        out = run([*command, str(infile)], logfile=workdir / "install.log")
    except CellError:
        return None
    return {m[1].lower(): m[2] for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", out, flags=re.M)}


def lowest_pins(
    uv: str, python: str, airflow: str, workdir: Path, options: list[str]
) -> tuple[dict[str, str], list[str]]:
    """The lowest version of each of LOWEST_PACKAGES that installs with ``airflow`` and the test tools.

    Our own lower bound when it installs; otherwise the lowest that Airflow allows (what
    ``--resolution lowest-direct`` picks for our runtime requirements with Airflow pinned).
    """
    floor = compile_env(uv, python, [airflow, *runtime_requirements()], workdir, options, lowest=True) or {}
    pins: dict[str, str] = {}
    notes = []
    for name, bound in lower_bounds().items():
        for version in dict.fromkeys([bound, floor.get(name, bound)]):
            constraints = [f"{n}=={v}" for n, v in {**pins, name: version}.items()]
            if compile_env(uv, python, [airflow, *constraints], workdir, options, full=True) is not None:
                pins[name] = version
                break
        else:
            raise CellError(f"{name} installs neither at {bound} nor at {floor.get(name)} with {airflow}")
        if pins[name] != bound:
            notes.append(f"{name} {bound} does not install with {airflow}: lowest possible {pins[name]}")
    return pins, notes


def installed_versions(python: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, platform\n"
        "v = {'python': platform.python_version()}\n"
        f"for name in {list(REPORTED)!r}:\n"
        "    try: v[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(v))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


def build(cell: Cell, uv: str, root: Path, result: Result) -> str:
    """Create or update the cell's environment; return its Python."""
    workdir = root / cell.name  # logs and resolver files; the environment is workdir/venv, made anew
    workdir.mkdir(parents=True, exist_ok=True)
    venv = workdir / "venv"
    logfile = workdir / "install.log"
    logfile.write_text("")
    interpreter = find_python(uv, cell.python)
    if interpreter is None:
        raise FileNotFoundError(f"no Python {cell.python} here (uv, pyenv, PATH, `uv python install`)")
    run([uv, "venv", "--quiet", "--clear", "--python", interpreter, str(venv)], logfile=logfile)
    python = str(venv / "bin" / "python")
    airflow = f"apache-airflow{cell.airflow}"
    options = cell.resolver_options()
    install = [uv, "pip", "install", "--quiet", "--python", python, *options]
    install += ["-e", ".[testing]", "--group", "test"]
    constraints: dict[str, str] = {}
    if cell.deps == "lowest":
        # the newest Airflow of the series, then the lowest of ours that install with it
        exact = (compile_env(uv, python, [airflow], workdir, options) or {}).get("apache-airflow")
        if exact is None:
            raise CellError(f"no {airflow} for Python {cell.python}")
        airflow = f"apache-airflow=={exact}"
        constraints, result.notes = lowest_pins(uv, python, airflow, workdir, options)
        (workdir / "constraints.txt").write_text("".join(f"{n}=={v}\n" for n, v in constraints.items()))
        install += ["--constraint", str(workdir / "constraints.txt")]
    run([*install, airflow, *cell.pins], logfile=logfile)
    run([uv, "pip", "check", "--python", python], logfile=logfile)
    result.versions = installed_versions(python)
    wrong = {n: result.versions.get(n) for n, v in constraints.items() if result.versions.get(n) != v}
    if wrong:
        raise CellError(f"lowest versions not installed: wanted {constraints}, got {wrong}")
    return python


def test(cell: Cell, python: str, root: Path, pytest_args: list[str]) -> tuple[bool, str]:
    logfile = root / cell.name / "pytest.log"
    with logfile.open("w") as fh:
        proc = subprocess.run(
            [python, "-m", "pytest", *pytest_args], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=False
        )
    lines = [line for line in logfile.read_text().splitlines() if line.strip()]
    summary = next(
        (line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)), ""
    )
    if proc.returncode != 0:
        failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        print("\n".join([f"[{cell.name}] pytest exited {proc.returncode}; last lines:", *lines[-40:]]))
        return False, summary or "; ".join(failures[:5]) or f"pytest exited {proc.returncode}"
    return True, summary


def run_cell(cell: Cell, uv: str, root: Path, pytest_args: list[str], strict: bool) -> Result:
    result = Result(cell)
    start = time.monotonic()
    log(cell, f"building: Airflow {cell.airflow}, Python {cell.python}, {cell.describe()} dependencies")
    try:
        python = build(cell, uv, root, result)
    except FileNotFoundError as exc:
        result.status, result.detail = ("FAILED" if strict else "not run"), str(exc)
        log(cell, f"{result.status}: {exc}")
        return result
    except CellError as exc:
        result.status, result.detail = "FAILED", f"install: {str(exc).splitlines()[0]}"
        log(cell, f"install failed (see {root / cell.name / 'install.log'}):\n{exc}")
        return result
    result.install_seconds = time.monotonic() - start
    log(cell, f"installed in {result.install_seconds:.0f} s: {json.dumps(result.versions)}")
    start = time.monotonic()
    ok, result.detail = test(cell, python, root, pytest_args)
    result.test_seconds = time.monotonic() - start
    result.status = "passed" if ok else "FAILED"
    log(cell, f"{result.status} in {result.test_seconds:.0f} s: {result.detail}")
    return result


def table(results: list[Result]) -> str:
    head = (
        "| cell | Airflow | Python | requests | tenacity | aiohttp | common-compat | result "
        "| install | tests |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        v = r.versions
        rows.append(
            f"| {r.cell.name} | {v.get('apache-airflow', r.cell.airflow)} | {v.get('python', r.cell.python)} "
            f"| {v.get('requests', '')} | {v.get('tenacity', '')} | {v.get('aiohttp', '')} "
            f"| {v.get('apache-airflow-providers-common-compat', '')} | {r.status}: {r.detail} "
            f"| {r.install_seconds:.0f} s | {r.test_seconds:.0f} s |"
        )
    notes = [f"- {r.cell.name}: {note}" for r in results for note in r.notes]
    return head + "\n".join(rows) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="*", help=f"default: all of {', '.join(CELLS)}")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at the same time (default 1)")
    parser.add_argument("--list", action="store_true", help="list the cells and exit")
    args = parser.parse_args()
    if args.list:
        for cell in CELLS.values():
            print(f"{cell.name}: apache-airflow{cell.airflow}, Python {cell.python}, {cell.describe()}")
        return 0
    unknown = [name for name in args.cells if name not in CELLS]
    if unknown:
        parser.error(f"unknown cells {unknown}; known: {', '.join(CELLS)}")
    cells = [CELLS[name] for name in args.cells] or list(CELLS.values())
    uv = os.environ.get("UV", shutil.which("uv") or "uv")
    root = REPO / os.environ.get("MATRIX_DIR", ".matrix")
    pytest_args = shlex.split(os.environ.get("MATRIX_PYTEST_ARGS", PYTEST_ARGS))
    strict = os.environ.get("MATRIX_STRICT", "") == "1"

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda c: run_cell(c, uv, root, pytest_args, strict), cells))
    report = table(results) + f"\nTotal {time.monotonic() - start:.0f} s, {args.jobs} at a time.\n"
    (root / "summary.md").write_text(report)
    print("\n" + report, flush=True)
    counts = {status: sum(r.status == status for r in results) for status in ("passed", "FAILED", "not run")}
    closing = f"matrix: {counts['passed']} passed, {counts['FAILED']} failed"
    print(closing + (f", {counts['not run']} skipped" if counts["not run"] else ""), flush=True)
    return 1 if any(r.status == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
