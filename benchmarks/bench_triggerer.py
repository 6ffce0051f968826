"""Triggerer capacity: N concurrent trigger ``run()`` coroutines in ONE event loop, as a triggerer runs them.

Ours: ``ModelRouteExecutionTrigger`` waiting for N executions that all complete at the same instant.
Side by side, apache-airflow-providers-http's triggers poll the same endpoint
(``GET /v1/executions/{id}``) through an ``http`` connection carrying the API key in its extra:

* ``HttpSensorTrigger`` (the goal's baseline) fires on the first answer that is not a 404, so for it
  the server answers 404 (an injected ``EXECUTION_NOT_FOUND``, the API's JSON error body) until that
  same instant, then the same 200 JSON ours gets;
* ``HttpEventTrigger`` with a response check that parses the JSON and fires on a terminal status
  gets exactly the answers ours gets, and does the same work with them.

Where the work still differs is printed in the table. The server runs in its own process. Each case
runs in a fresh child interpreter: CPU seconds and RSS are the child's own, measured from just before
the N triggers start until the last event. Trigger starts are spread over the first poll interval (a
triggerer in steady state, not the herd right after a restart); logging is disabled for every side
so none pays for log output. Each round runs every trigger once per N, in a fresh random order; ours
and a baseline from the same round form a pair, and a ratio is the median of the per-pair ratios.

    python benchmarks/bench_triggerer.py            # N = 100 and 5,000, 3 rounds (+ a rate-limited run)
    python benchmarks/bench_triggerer.py --sizes 100,1000,5000,10000 --rounds 1
    python benchmarks/bench_triggerer.py --quick    # N = 50, short waits, one round: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

POLL_ENDPOINT = "GET /v1/executions/{id}"
#: label, and what each poll costs it besides ours (``GET`` with the API key, JSON answer, parsed).
IMPLS = {
    "modelroute": (
        "ModelRouteExecutionTrigger",
        "200 + execution JSON, parsed; keep-alive connections shared by the loop's triggers",
    ),
    "http": (
        "HttpSensorTrigger",
        "404 + JSON error body, not read, until completion (it fires on the first non-404), then the "
        "same 200 JSON; a new aiohttp session and TCP connection per poll",
    ),
    "http-event": (
        "HttpEventTrigger + JSON status check",
        "the same 200 + execution JSON, parsed by the check; a new aiohttp session and TCP connection "
        "per poll; re-imports the check's module every poll (its design)",
    ),
}
BASELINES = ("http", "http-event")


# -- child: one case in a fresh interpreter --------------------------------------------------------


def _create_executions(base_url: str, api_key: str, count: int, complete_at: float) -> list[str]:
    """Create ``count`` executions that all reach COMPLETED at ``complete_at`` (unix seconds).

    ``api_key`` is a second key of the server: under a rate limit (counted per key) creating them
    neither fails nor spends the triggers' window.
    """
    import requests

    ids: list[str] = []
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {api_key}"
        while len(ids) < count:
            seconds = max(0.0, complete_at - time.time())
            body = {"model": "test-file", "input": {"size_bytes": 1, "_simulate": {"seconds": seconds}}}
            response = session.post(f"{base_url}/v1/executions", json=body, timeout=30)
            if response.status_code == 429:
                time.sleep(float(response.headers.get("Retry-After", 1)))
                continue
            response.raise_for_status()
            ids.append(response.json()["id"])
    return ids


def _make_trigger(impl: str, execution_id: str, poll: float, deadline: float) -> Any:
    if impl == "modelroute":
        from airflow_provider_modelroute.triggers.modelroute import ModelRouteExecutionTrigger

        return ModelRouteExecutionTrigger(
            execution_id=execution_id,
            modelroute_conn_id="modelroute_bench",
            poll_interval=poll,
            deadline=deadline,
        )
    if impl == "http-event":
        from airflow.providers.http.triggers.http import HttpEventTrigger

        return HttpEventTrigger(
            response_check_path="_http_check.execution_finished",
            endpoint=f"/v1/executions/{execution_id}",
            http_conn_id="http_bench",
            method="GET",
            poll_interval=poll,
        )
    from airflow.providers.http.triggers.http import HttpSensorTrigger

    return HttpSensorTrigger(
        endpoint=f"/v1/executions/{execution_id}",
        http_conn_id="http_bench",
        method="GET",
        poke_interval=poll,
    )


def _event_ok(impl: str, payload: Any) -> bool:
    if impl == "http":
        return payload is True
    if impl == "http-event":
        return isinstance(payload, dict) and payload.get("status") == "success"
    return (
        isinstance(payload, dict)
        and payload.get("status") == "done"
        and payload["execution"].get("status") == "COMPLETED"
    )


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    impl, n, poll, wait = cfg["impl"], int(cfg["n"]), float(cfg["poll"]), float(cfg["wait"])
    base_url, api_key = cfg["base_url"], cfg["api_key"]
    os.environ["AIRFLOW_CONN_MODELROUTE_BENCH"] = cfg["airflow_conn"]
    os.environ["AIRFLOW_CONN_HTTP_BENCH"] = json.dumps(
        {"conn_type": "http", "host": base_url, "extra": {"Authorization": f"Bearer {api_key}"}}
    )
    import psutil

    from airflow_provider_modelroute.testing import RemoteModelRouteServer

    remote = RemoteModelRouteServer(cfg["admin_url"])
    remote.reset()
    _make_trigger(impl, "exec_warmup", poll, 0)  # import everything before the baseline
    logging.disable(logging.CRITICAL)

    # Warm up: a few triggers end to end in a throwaway loop (lazy imports, TLS context, ...).
    creator_key = cfg["creator_key"]
    warm_ids = _create_executions(base_url, creator_key, 3, time.time())

    async def warm() -> None:
        await asyncio.gather(
            *(common.first_event(_make_trigger(impl, i, 0.05, time.time() + 30)) for i in warm_ids)
        )

    asyncio.run(warm())

    # The N executions complete together at `complete_at`; creating them is not measured. The
    # creation time is extrapolated from a first few, so that the wait is close to `wait` seconds.
    probe_started = time.time()
    _create_executions(base_url, creator_key, 20, probe_started)
    per_creation = (time.time() - probe_started) / 20
    complete_at = time.time() + 1.0 + 1.3 * n * per_creation + poll + wait
    ids = _create_executions(base_url, creator_key, n, complete_at)
    if impl == "http":
        remote.add_fault(POLL_ENDPOINT, "error", count=None, code="EXECUTION_NOT_FOUND")

    process = psutil.Process()
    gc.collect()
    rss_base = process.memory_info().rss
    stats_before = remote.stats()
    events: dict[int, tuple[float, Any]] = {}
    lags: list[float] = []
    peaks = {"rss": rss_base, "fds": process.num_fds()}
    released_at = [complete_at]

    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        async def sampler(record: bool = True) -> None:
            tick = 0
            while not stop.is_set():
                started = loop.time()
                await asyncio.sleep(0.1)
                if record:
                    lags.append(loop.time() - started - 0.1)
                tick += 1
                if tick % 10 == 0:
                    peaks["rss"] = max(peaks["rss"], process.memory_info().rss)
                    peaks["fds"] = max(peaks["fds"], process.num_fds())

        # The harness's own CPU (this sampler, an idle loop): measured alone, subtracted below.
        idle = asyncio.create_task(sampler(record=False))
        idle_cpu, idle_started = process.cpu_times(), time.time()
        await asyncio.sleep(float(cfg.get("idle", 3.0)))
        idle_cpu_after, idle_wall = process.cpu_times(), time.time() - idle_started
        stop.set()
        await idle
        stop.clear()
        idle_rate = (
            idle_cpu_after.user + idle_cpu_after.system - idle_cpu.user - idle_cpu.system
        ) / idle_wall

        async def release() -> None:  # the HTTP trigger's "completion": the 404s stop
            await asyncio.sleep(max(0.0, complete_at - time.time()))
            before = time.time()
            await asyncio.to_thread(remote.clear_faults)
            released_at[0] = (before + time.time()) / 2

        async def one(index: int, execution_id: str, delay: float) -> None:
            await asyncio.sleep(delay)
            trigger = _make_trigger(impl, execution_id, poll, complete_at + 600)
            payload = await common.first_event(trigger)
            events[index] = (time.time(), payload)

        sampling = asyncio.create_task(sampler())
        helpers = [asyncio.create_task(release())] if impl == "http" else []
        cpu = process.cpu_times()
        started = time.time()
        tasks = [
            asyncio.create_task(one(i, execution_id, random.uniform(0, poll)))
            for i, execution_id in enumerate(ids)
        ]
        _, pending = await asyncio.wait(tasks, timeout=complete_at - time.time() + 3 * poll + 120)
        for task in pending:
            task.cancel()
        finished = time.time()
        cpu_after = process.cpu_times()
        stop.set()
        await asyncio.gather(sampling, *helpers, return_exceptions=True)
        return {
            "cpu": (cpu_after.user + cpu_after.system) - (cpu.user + cpu.system),
            "cpu_user": cpu_after.user - cpu.user,
            "harness_cpu": idle_rate * (finished - started),
            "wall": finished - started,
            "started": started,
        }

    timing = asyncio.run(main())
    stats_after = remote.stats()
    polls = stats_after["requests"].get(POLL_ENDPOINT, 0) - stats_before["requests"].get(POLL_ENDPOINT, 0)
    delays = [at - released_at[0] for at, payload in events.values() if _event_ok(impl, payload)]
    bad = [payload for _, payload in events.values() if not _event_ok(impl, payload)]
    return {
        "impl": impl,
        "n": n,
        "poll": poll,
        "wait": complete_at - timing["started"],
        "events_ok": len(delays),
        "events_bad": len(bad),
        "bad_sample": repr(bad[:2])[:300],
        "missing": n - len(events),
        "polls": polls,
        "cpu": timing["cpu"],
        "cpu_user": timing["cpu_user"],
        "harness_cpu": timing["harness_cpu"],
        "wall": timing["wall"],
        "raw_cpu_per_poll_ms": 1000 * timing["cpu"] / polls if polls else float("nan"),
        "cpu_per_poll_ms": 1000 * (timing["cpu"] - timing["harness_cpu"]) / polls if polls else float("nan"),
        "lag_p50_ms": 1000 * common.percentile(lags, 0.50),
        "lag_p99_ms": 1000 * common.percentile(lags, 0.99),
        "lag_max_ms": 1000 * max(lags, default=float("nan")),
        "rss_per_trigger_kb": (peaks["rss"] - rss_base) / n / 1024,
        "peak_fds": peaks["fds"],
        "delay_p50_s": common.percentile(delays, 0.50),
        "delay_p99_s": common.percentile(delays, 0.99),
        "delay_max_s": max(delays, default=float("nan")),
        "rate_limited": stats_after["rate_limited"] - stats_before["rate_limited"],
    }


# -- parent: orchestrate and print --------------------------------------------------------------------


def _row(r: dict[str, Any]) -> list[str]:
    return [
        IMPLS[r["impl"]][0],
        f"{r['n']:,}",
        f"{r['events_ok']:,}"
        + (f" (+{r['events_bad']} bad, {r['missing']} missing)" if r["events_ok"] < r["n"] else ""),
        f"{r['polls']:,}",
        f"{r['cpu_per_poll_ms']:.2f}",
        f"{r['lag_p50_ms']:.1f} / {r['lag_p99_ms']:.1f}",
        f"{r['rss_per_trigger_kb']:.1f}",
        f"{r['peak_fds']:,}",
        f"{r['delay_p50_s']:.2f} / {r['delay_p99_s']:.2f}",
        str(r["rate_limited"]),
    ]


HEADERS = [
    "trigger",
    "N",
    "events",
    "polls",
    "CPU ms/poll",
    "loop lag p50 / p99 ms",
    "RSS KiB/trigger",
    "peak fds",
    "detection delay p50 / p99 s",
    "429s",
]


@contextmanager
def _server(*args: str) -> Iterator[dict[str, Any]]:
    """The local server with two API keys: the triggers' (its first) and one to create executions."""
    from airflow_provider_modelroute.testing.spec import make_api_key

    keys = [make_api_key(), make_api_key()]
    with common.local_server(
        "--pending-seconds", "0", "--api-key", keys[0], "--api-key", keys[1], *args
    ) as info:
        yield {**info, "creator_key": keys[1]}


Runs = dict[tuple[int, str], list[dict[str, Any]]]  # (N, impl) -> one result per round


def _measure(sizes: list[int], impls: list[str], rounds: int, cfg: dict[str, Any], *server_args: str) -> Runs:
    """``rounds`` interleaved rounds per N: every trigger once per round, in a random order."""
    script = os.path.abspath(__file__)
    runs: Runs = {}
    with _server(*server_args) as server:
        for n in sizes:
            for _, impl in common.interleaved(impls, rounds):
                runs.setdefault((n, impl), []).append(
                    common.run_child(script, {"impl": impl, "n": n, **cfg, **server})
                )
    return runs


def _median_run(done: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median CPU per poll (the row shown for several rounds)."""
    return sorted(done, key=lambda r: r["cpu_per_poll_ms"])[len(done) // 2]


def _goals(runs: Runs, limited: Runs, sizes: list[int], impls: list[str]) -> list[str]:
    goals = []
    capable = [
        n
        for n in sizes
        if all(r["events_ok"] == n for r in runs[(n, "modelroute")])
        and common.median([r["lag_p99_ms"] for r in runs[(n, "modelroute")]]) < 1000
    ]
    by_n = ", ".join(
        f"N={n:,}: {common.median([r['lag_p99_ms'] for r in runs[(n, 'modelroute')]]):.0f} ms" for n in sizes
    )
    if max(sizes) >= 5000:
        goals.append(
            common.goal(
                "≥ 5,000 concurrent waits with p99 loop lag < 1 s",
                max(capable, default=0) >= 5000,
                f"largest N with every event delivered and a median p99 < 1 s: {max(capable, default=0):,}; "
                f"median p99 {by_n}",
            )
        )
    if "http" in impls:
        cpu = {n: _pair(runs, n, "http", "cpu_per_poll_ms") for n in sizes}
        goals.append(
            common.goal(
                "CPU per poll ≤ 0.5x HttpSensorTrigger at every N",
                all(pair.ratio <= 0.5 for pair in cpu.values()),
                "median of per-round ratios: "
                + ", ".join(f"N={n:,}: {p.ratio:.2f}x" for n, p in cpu.items()),
            )
        )
    if limited:
        ours_429 = sum(r["rate_limited"] for r in limited[next(k for k in limited if k[1] == "modelroute")])
        goals.append(common.goal("shared rate budget keeps 429s at 0", ours_429 == 0, f"{ours_429} 429s"))
    return goals


def _pair(runs: Runs, n: int, baseline: str, field: str) -> common.Paired:
    return common.Paired([r[field] for r in runs[(n, "modelroute")]], [r[field] for r in runs[(n, baseline)]])


def parent(args: argparse.Namespace) -> int:
    quick = args.quick
    if quick:
        sizes, poll, wait, idle, rounds = [50], 0.5, 1.5, 1.0, 1
    else:
        sizes, poll, wait, idle, rounds = [int(n) for n in args.sizes.split(",")], 5.0, 30.0, 3.0, args.rounds
    impls = ["modelroute", *(impl for impl in BASELINES if impl in args.baselines.split(","))]
    cfg = {"poll": poll, "wait": wait, "idle": idle}
    print(common.header("Triggerer capacity: N triggers in one event loop", quick))
    print(
        f"Poll interval {poll:g} s (trigger starts spread over the first one); every execution completes "
        f"{wait:g} s after the last trigger started; server without a rate limit; {rounds} round(s) per "
        "N, every trigger once per round in a random order. CPU ms/poll: the triggerer process's CPU time "
        "(user + system) from the first trigger start to the last event, minus the harness's own idle "
        "CPU, per poll the server answered. Loop lag: how late a 100 ms sleep wakes up. RSS/trigger: "
        "(peak RSS - RSS before) / N. Detection delay: event time - completion time. Rows: the round "
        "with the median CPU/poll.\n"
    )
    print(
        common.table(
            ["trigger", "what each poll gets and does, besides ours"], [list(IMPLS[i]) for i in impls]
        )
    )
    print()
    runs = _measure(sizes, impls, rounds, cfg)
    print(common.table(HEADERS, [_row(_median_run(runs[(n, impl)])) for n in sizes for impl in impls]))
    print()
    ratio_rows = []
    for n in sizes:
        for baseline in impls[1:]:
            ratio_rows.append(
                [
                    f"{n:,}",
                    IMPLS[baseline][0],
                    _pair(runs, n, baseline, "cpu_per_poll_ms").shown(),
                    _pair(runs, n, baseline, "rss_per_trigger_kb").shown(),
                    _pair(runs, n, baseline, "lag_p99_ms").shown(),
                ]
            )
    print("Ours ÷ baseline, the median of the per-round ratios (each round's in brackets):\n")
    print(common.table(["N", "baseline", "CPU/poll", "RSS/trigger", "p99 loop lag"], ratio_rows))
    print()

    limited: Runs = {}
    if not quick and args.rate_limited:
        n_limited, limit, window = 1000, 500, 10
        limited = _measure(
            [n_limited], impls[:2], 1, cfg, "--rate-limit", str(limit), "--rate-window", str(window)
        )
        print(
            f"With a rate limit of {limit} requests per {window} s window ({limit / window:g}/s; "
            f"the {n_limited:,} triggers would poll {n_limited / poll:g}/s), one round:\n"
        )
        print(common.table(HEADERS, [_row(done[0]) for done in limited.values()]))
        print()

    common.print_goals(_goals(runs, limited, sizes, impls), quick)
    everything = [r for done in [*runs.values(), *limited.values()] for r in done]
    return 0 if all(r["events_ok"] == r["n"] for r in everything if r["impl"] == "modelroute") else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: N=50, short waits, one round")
    parser.add_argument("--sizes", default="100,5000", help="numbers of triggers (default: 100,5000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per N (default: 3)")
    parser.add_argument(
        "--baselines", default="http,http-event", help="baselines to run (default: http,http-event)"
    )
    parser.add_argument(
        "--no-rate-limited", dest="rate_limited", action="store_false", help="skip the rate-limited run"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        common.report(child(json.loads(args.child)))
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
