"""Hook overhead: ``ModelRouteHook().get_execution(id)`` against a bare ``requests.Session`` GET.

Both read the same execution from the local server (its own process) over one keep-alive
connection, one request at a time; the bare GET also decodes the JSON, as any caller would. Each
round runs both, in a fresh random order, so that drift on a shared machine hits both alike; the
two of a round form a pair, and the comparison is the median of the per-round ratios.

    python benchmarks/bench_hook.py            # 7 rounds of 2,000 requests each
    python benchmarks/bench_hook.py --quick    # 2 rounds of 200: a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

GOAL = 0.9


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 200 requests")
    args = parser.parse_args()
    rounds, per_round = (2, 200) if args.quick else (7, 2000)
    common.airflow_env()
    print(common.header("Hook overhead: get_execution() vs a bare requests.Session GET", args.quick))
    with common.local_server("--pending-seconds", "0") as server:
        os.environ["AIRFLOW_CONN_MODELROUTE_BENCH"] = server["airflow_conn"]
        import requests

        from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {server['api_key']}"
        body = {"model": "test-file", "input": {"size_bytes": 1, "_simulate": {"seconds": 3600}}}
        execution_id = session.post(f"{server['base_url']}/v1/executions", json=body, timeout=30).json()["id"]
        url = f"{server['base_url']}/v1/executions/{execution_id}"
        hook = ModelRouteHook("modelroute_bench")

        def bare() -> Any:
            return session.get(url, timeout=30).json()

        def ours() -> Any:
            return hook.get_execution(execution_id)

        assert bare()["id"] == ours()["id"] == execution_id  # also warms both up
        rates: dict[str, list[float]] = {"bare": [], "ours": []}
        calls: dict[str, Callable[[], Any]] = {"bare": bare, "ours": ours}
        for _, name in common.interleaved(list(calls), rounds):
            call = calls[name]
            started = time.perf_counter()
            for _ in range(per_round):
                call()
            rates[name].append(per_round / (time.perf_counter() - started))
    paired = common.Paired(rates["ours"], rates["bare"])
    print(
        f"{rounds} rounds of {per_round:,} sequential requests per client, both clients once per round "
        "in a random order; requests/s: the median round; ÷ bare: the median of the per-round ratios.\n"
    )
    print(
        common.table(
            ["client", "requests/s (median round)", "all rounds", "÷ bare"],
            [
                [
                    "`ModelRouteHook().get_execution(id)`",
                    f"{common.median(rates['ours']):,.0f}",
                    ", ".join(f"{r:,.0f}" for r in rates["ours"]),
                    paired.shown(),
                ],
                [
                    "bare `requests.Session().get(url).json()`",
                    f"{common.median(rates['bare']):,.0f}",
                    ", ".join(f"{r:,.0f}" for r in rates["bare"]),
                    "1.00x",
                ],
            ],
        )
    )
    print()
    common.print_goals(
        [common.goal(f"≥ {GOAL}x the bare session", paired.ratio >= GOAL, f"{paired.ratio:.3f}x")], args.quick
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
