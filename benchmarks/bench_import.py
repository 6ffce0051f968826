"""Import cost: what importing a provider's operator module adds to every DAG-file parse.

Each measurement is a fresh interpreter that imports ``airflow.sdk`` first (every DAG file does), then
the module; the figure is the second import's wall time, median of 20 rounds (one discarded warm-up
run per case compiles the bytecode). Each round starts one interpreter per case, in a fresh random
order; a module's ratio to the HTTP operator is the median of the per-round ratios.
``python -X importtime`` then names the modules that dominate.

    python benchmarks/bench_import.py            # median of 20
    python benchmarks/bench_import.py --quick    # ours together and the HTTP operator, one run each
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

OURS = (
    "airflow_provider_modelroute.operators.modelroute",
    "airflow_provider_modelroute.sensors.modelroute",
    "airflow_provider_modelroute.transfers.modelroute",
)
THEIRS = ("airflow.providers.http.operators.http", "airflow.providers.dbt.cloud.operators.dbt")
GOAL_MS = 50.0

_PROBE = """
import sys, time
started = time.perf_counter()
import airflow.sdk
between = time.perf_counter()
for name in sys.argv[1:]:
    __import__(name)
print(between - started, time.perf_counter() - between)
"""


def _once(modules: tuple[str, ...], env: dict[str, str]) -> tuple[float, float]:
    output = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    return float(output[-2]), float(output[-1])


def _importtime(
    modules: tuple[str, ...], env: dict[str, str], top: int = 8
) -> list[tuple[float, float, str]]:
    """The modules (self ms, cumulative ms, name) that importing ``modules`` after airflow.sdk loads."""
    code = "import airflow.sdk\n" + "".join(f"import {m}\n" for m in modules)
    stderr = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env
    ).stderr
    rows, after_sdk = [], False
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if not match:
            continue
        if after_sdk:
            rows.append((int(match[1]) / 1000, int(match[2]) / 1000, match[4]))
        elif match[4] == "airflow.sdk" and match[3] == " ":
            after_sdk = True
    return sorted(rows, reverse=True)[:top]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: ours together and the HTTP operator, one run each"
    )
    args = parser.parse_args()
    runs = 1 if args.quick else 20
    env = common.airflow_env(dict(os.environ))
    cases = [OURS, (THEIRS[0],)] if args.quick else [*((m,) for m in OURS), OURS, *((m,) for m in THEIRS)]
    print(common.header("Import cost after airflow.sdk", args.quick))
    print(
        f"Median of {runs} rounds, one fresh interpreter per case and round in a random order; "
        "airflow.sdk itself is imported first and not counted.\n"
    )
    for modules in cases:
        _once(modules, env)  # compile the bytecode (into the cache of benchmarks/_common.py)
    samples: dict[tuple[str, ...], list[float]] = {modules: [] for modules in cases}
    sdk_times = []
    for _, modules in common.interleaved(cases, runs):
        sdk_time, module_time = _once(modules, env)
        sdk_times.append(sdk_time)
        samples[modules].append(1000 * module_time)
    results = {modules: common.median(times) for modules, times in samples.items()}
    rows = []
    for modules, ms in results.items():
        label = "ours: operators + sensors + transfers together" if modules == OURS else f"`{modules[0]}`"
        versus = (
            "reference"
            if modules == (THEIRS[0],)
            else common.Paired(samples[modules], samples[(THEIRS[0],)]).shown()
        )
        rows.append([label, f"{ms:.1f}", versus, "ours" if all(m in OURS for m in modules) else "baseline"])
    headers = ["module", "ms after airflow.sdk (median)", "÷ HTTP operator", "provider"]
    print(common.table(headers, rows))
    sdk_ms = 1000 * common.median(sdk_times)
    print(f"\n(airflow.sdk itself: {sdk_ms:.0f} ms median in the same interpreters)\n")
    worst_ours = max(ms for modules, ms in results.items() if all(m in OURS for m in modules))
    baselines = ", ".join(f"{m.split('.')[2]} {results[(m,)]:.0f} ms" for m in THEIRS if (m,) in results)
    common.print_goals(
        [
            common.goal(
                f"importing ours < {GOAL_MS:.0f} ms",
                worst_ours < GOAL_MS,
                f"ours at worst {worst_ours:.1f} ms, all three together {results[OURS]:.1f} ms; "
                f"baselines: {baselines}",
            )
        ],
        args.quick,
    )
    print()
    print("What dominates (`python -X importtime`, after airflow.sdk; self / cumulative ms):\n")
    for modules in [OURS, *((m,) for m in THEIRS)][: 2 if args.quick else 3]:
        top = _importtime(modules, env, top=5)
        shown = "; ".join(f"{name} {own:.1f}/{cumulative:.1f}" for own, cumulative, name in top)
        label = "ours (all three)" if modules == OURS else modules[0]
        print(f"- {label}: {shown or 'nothing beyond airflow.sdk'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
