"""Blocked rate-budget waits: the CPU a process spends while thousands of requests wait for a spent
rate window (goal: 2,000 waits under 2 % of one core).

Real parts: the local server (its own process) allows one request per 600 s window per key, so
the first request spends the window. Then N trigger clients (``ModelRouteAsyncHook``, one per
wait, on one event loop, as in a triggerer) and, in one case, sync hooks in threads each ask for an
execution and block in the API key's shared ``RateBudget``. Once all are queued, the process's CPU
time is measured over the hold; the previous budget woke every blocked wait every 50 ms (91 % of a
core for 2,000 waits, issue 15).

    python benchmarks/bench_budget.py            # 10 s holds
    python benchmarks/bench_budget.py --quick    # 2,000 waits, a 2 s hold
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

GOAL_PERCENT = 2.0
GOAL_WAITS = 2000


def polling_child(n: int, hold: float) -> dict[str, Any]:
    """The baseline: the previous budget's wait, a 50 ms sleep loop (plus jitter) until the window opens."""
    import random

    async def wait(until: float) -> None:
        while time.time() < until:
            await asyncio.sleep(0.05)
            await asyncio.sleep(random.uniform(0, 0.05))

    async def main() -> dict[str, Any]:
        tasks = [asyncio.ensure_future(wait(time.time() + 3600)) for _ in range(n)]
        await asyncio.sleep(1.0)  # all started and looping
        wall, cpu = time.monotonic(), time.process_time()
        await asyncio.sleep(hold)
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {"n": n, "threads": 0, "wall": wall, "cpu": cpu, "queued": n}

    return asyncio.run(main())


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    n, threads, hold = int(cfg["n"]), int(cfg["threads"]), float(cfg["hold"])
    if cfg["impl"] == "polling":
        return polling_child(n, hold)
    conn = json.loads(cfg["airflow_conn"])
    conn["extra"] = {**conn.get("extra", {}), "max_retries": 0}
    os.environ["AIRFLOW_CONN_MODELROUTE_BENCH"] = json.dumps(conn)
    from airflow_provider_modelroute.exceptions import ModelRouteError
    from airflow_provider_modelroute.hooks.modelroute import ModelRouteAsyncHook, ModelRouteHook
    from airflow_provider_modelroute.hooks.rate_budget import shared_rate_budget

    logging.disable(logging.CRITICAL)
    budget = shared_rate_budget(conn["host"], conn["password"])

    def sync_wait() -> None:
        with contextlib.suppress(ModelRouteError):
            ModelRouteHook("modelroute_bench").get_execution("exec_sync")

    async def trigger_wait(index: int) -> None:
        async with ModelRouteAsyncHook("modelroute_bench") as client:
            await client.get_execution(f"exec_{index}")

    async def main() -> dict[str, Any]:
        with contextlib.suppress(ModelRouteError):  # spends the window (or finds it spent)
            await trigger_wait(-1)
        assert budget.remaining == 0 and budget.reset is not None, "the window is not spent"
        for _ in range(threads):
            threading.Thread(target=sync_wait, daemon=True).start()
        tasks = [asyncio.ensure_future(trigger_wait(i)) for i in range(n - threads)]
        deadline = time.monotonic() + 300
        while len(budget._queue) < n:  # every wait queued
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(budget._queue)} of {n} waits queued")
            await asyncio.sleep(0.1)
        wall, cpu = time.monotonic(), time.process_time()
        await asyncio.sleep(hold)
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        queued = len(budget._queue)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {"n": n, "threads": threads, "wall": wall, "cpu": cpu, "queued": queued}

    return asyncio.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 waits, a 2 s hold")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        common.report(child(json.loads(args.child)))
        return 0
    hold = 2.0 if args.quick else 10.0
    cases = [("ours", GOAL_WAITS, 0), ("polling", GOAL_WAITS, 0)]
    if not args.quick:
        cases = [("ours", 200, 0), *cases, ("ours", GOAL_WAITS, 50)]
    print(common.header("Blocked rate-budget waits", args.quick))
    print(f"CPU time of the client process while every wait is blocked on a spent window, over {hold:g} s.\n")
    rows, goal = [], None
    with common.local_server("--rate-limit", "1", "--rate-window", "600") as server:
        for impl, n, threads in cases:
            config = {"impl": impl, "n": n, "threads": threads, "hold": hold, **server}
            result = common.run_child(__file__, config)
            percent = 100 * result["cpu"] / result["wall"]
            if impl == "ours" and n == GOAL_WAITS and threads == 0:
                goal = percent
            if impl == "polling":
                who = f"{n:,} coroutines polling every 50-100 ms (the previous budget's wait; baseline)"
            else:
                who = f"{n - threads:,} triggers" + (f" + {threads} sync hooks in threads" if threads else "")
            rows.append(
                [
                    f"{n:,}",
                    who,
                    f"{result['queued']:,}",
                    f"{result['wall']:.1f}",
                    f"{result['cpu'] * 1000:.1f}",
                    f"{percent:.2f} %",
                ]
            )
    print(
        common.table(
            ["blocked waits", "who waits", "still queued after", "hold (s)", "CPU (ms)", "of one core"], rows
        )
    )
    assert goal is not None
    print(
        f"\n- {GOAL_WAITS:,} blocked waits under {GOAL_PERCENT:g} % of a core: "
        f"{common.verdict(goal < GOAL_PERCENT)} ({goal:.2f} %)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
