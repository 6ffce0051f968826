"""Triggerer capacity: N concurrent trigger ``run()`` coroutines in ONE event loop, as a triggerer runs them.

Ours: ``ModelRouteExecutionTrigger`` waiting for N executions that all complete at the same instant.
Side by side: apache-airflow-providers-http's ``HttpSensorTrigger`` polling the same endpoint
(``GET /v1/executions/{id}``) through an ``http`` connection. It fires on the first non-404, so for
it the server answers 404 (an injected ``EXECUTION_NOT_FOUND`` fault) until that same instant.

The server runs in its own process. Each case runs in a fresh child interpreter: CPU seconds and
RSS are the child's own, measured from just before the N triggers start until the last event.
Trigger starts are spread over the first poll interval (a triggerer in steady state, not the herd
right after a restart); logging is disabled for both sides so neither pays for log output.

    python benchmarks/bench_triggerer.py            # N = 100, 1000, 5000, 10000 (+ a rate-limited run)
    python benchmarks/bench_triggerer.py --quick    # N = 50, short waits: a smoke run
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
    return (
        isinstance(payload, dict)
        and payload.get("status") == "done"
        and payload["execution"].get("status") == "COMPLETED"
    )


async def _first_event(trigger: Any) -> Any:
    generator = trigger.run()
    try:
        async for event in generator:
            return event.payload
    finally:
        await generator.aclose()
    return None


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
            *(_first_event(_make_trigger(impl, i, 0.05, time.time() + 30)) for i in warm_ids)
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
            payload = await _first_event(trigger)
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
    label = "ModelRouteExecutionTrigger" if r["impl"] == "modelroute" else "HttpSensorTrigger"
    return [
        label,
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
    from airflow_provider_modelroute.api import make_api_key

    keys = [make_api_key(), make_api_key()]
    with common.local_server(
        "--pending-seconds", "0", "--api-key", keys[0], "--api-key", keys[1], *args
    ) as info:
        yield {**info, "creator_key": keys[1]}


def parent(quick: bool) -> int:
    script = os.path.abspath(__file__)
    idle = 1.0 if quick else 3.0
    if quick:
        sizes, poll, wait, impls = [50], 0.5, 1.5, ["modelroute", "http"]
    else:
        sizes, poll, wait, impls = [100, 1000, 5000, 10000], 5.0, 30.0, ["modelroute", "http"]
    results: list[dict[str, Any]] = []
    print(common.header("Triggerer capacity: N triggers in one event loop", quick))
    print(
        f"Poll interval {poll:g} s (trigger starts spread over the first one); every execution completes "
        f"{wait:g} s after the last trigger started; server without a rate limit. CPU ms/poll: the "
        "triggerer process's CPU time (user + system) from the first trigger start to the last event, "
        "minus the harness's own idle CPU, per poll the server answered. Loop lag: how late a 100 ms "
        "sleep wakes up. RSS/trigger: (peak RSS - RSS before) / N. Detection delay: event time - "
        "completion time.\n"
    )
    samples: dict[tuple[int, str], list[float]] = {}
    with _server() as server:
        for n in sizes:
            # Small N is noisy on a shared machine: three interleaved runs, the median by CPU/poll shown.
            runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
            for _ in range(3 if n <= 1000 and not quick else 1):
                for impl in impls:
                    cfg = {"impl": impl, "n": n, "poll": poll, "wait": wait, "idle": idle, **server}
                    runs[impl].append(common.run_child(script, cfg))
            for impl, done in runs.items():
                done.sort(key=lambda r: r["cpu_per_poll_ms"])
                results.append(done[len(done) // 2])
                samples[(n, impl)] = [r["cpu_per_poll_ms"] for r in done]
    rows = [_row(r) for r in results]
    print(common.table(HEADERS, rows))
    print()
    repeated = {key: values for key, values in samples.items() if len(values) > 1}
    if repeated:
        shown = "; ".join(
            f"N={n:,} {'ours' if impl == 'modelroute' else 'HTTP'} {', '.join(f'{v:.2f}' for v in values)}"
            for (n, impl), values in repeated.items()
        )
        print(
            f"Rows with N ≤ 1,000 are the median of 3 runs by CPU/poll; every run's CPU ms/poll: {shown}.\n"
        )
    ratios = []
    for n in sizes:
        ours = next(r for r in results if r["n"] == n and r["impl"] == "modelroute")
        theirs = next(r for r in results if r["n"] == n and r["impl"] == "http")
        ratios.append(
            [
                f"{n:,}",
                common.ratio(ours["cpu_per_poll_ms"], theirs["cpu_per_poll_ms"]),
                common.ratio(ours["rss_per_trigger_kb"], theirs["rss_per_trigger_kb"]),
                common.ratio(ours["lag_p99_ms"], theirs["lag_p99_ms"]),
            ]
        )
    print(
        common.table(["N", "CPU/poll ours ÷ HTTP", "RSS/trigger ours ÷ HTTP", "p99 lag ours ÷ HTTP"], ratios)
    )
    print()

    limited: list[dict[str, Any]] = []
    if not quick:
        n_limited, limit, window = 1000, 500, 10
        with _server("--rate-limit", str(limit), "--rate-window", str(window)) as server:
            for impl in impls:
                cfg = {"impl": impl, "n": n_limited, "poll": poll, "wait": wait, "idle": idle, **server}
                limited.append(common.run_child(script, cfg))
        print(
            f"With a rate limit of {limit} requests per {window} s window ({limit / window:g}/s; "
            f"the {n_limited:,} triggers would poll {n_limited / poll:g}/s):\n"
        )
        print(common.table(HEADERS, [_row(r) for r in limited]))
        print()

    goals = []
    ours_rows = [r for r in results if r["impl"] == "modelroute"]
    capable = [r["n"] for r in ours_rows if r["events_ok"] == r["n"] and r["lag_p99_ms"] < 1000]
    by_n = ", ".join(f"N={r['n']:,}: {r['lag_p99_ms']:.0f} ms" for r in ours_rows)
    goals.append(
        f"- ≥ 5,000 concurrent waits with p99 lag < 1 s: {common.verdict(max(capable, default=0) >= 5000)} "
        f"(largest N with p99 < 1 s and every event delivered: {max(capable, default=0):,}; p99 {by_n})"
    )
    cpu_ratios = {}
    for n in sizes:
        ours = next(r for r in results if r["n"] == n and r["impl"] == "modelroute")
        theirs = next(r for r in results if r["n"] == n and r["impl"] == "http")
        cpu_ratios[n] = ours["cpu_per_poll_ms"] / theirs["cpu_per_poll_ms"]
    met = [n for n, value in cpu_ratios.items() if value <= 0.5]
    partly = bool(met) and len(met) < len(sizes) and met == sizes[len(sizes) - len(met) :]
    goals.append(
        f"- CPU per poll ≤ 0.5x HttpSensorTrigger: {common.verdict(len(met) == len(sizes))}"
        + (f" below N = {met[0]:,}, met from there up" if partly else "")
        + f" (ours ÷ HTTP: {', '.join(f'N={n:,}: {value:.2f}' for n, value in cpu_ratios.items())})"
    )
    if limited:
        ours_429 = next(r for r in limited if r["impl"] == "modelroute")["rate_limited"]
        goals.append(f"- shared rate budget keeps 429s at 0: {common.verdict(ours_429 == 0)} ({ours_429})")
    if quick:
        goals = ["- (quick run: the goals are judged on the full run)"]
    print("\n".join(goals))
    everything = results + limited
    return 0 if all(r["events_ok"] == r["n"] for r in everything if r["impl"] == "modelroute") else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: N=50, short waits")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        common.report(child(json.loads(args.child)))
        return 0
    return parent(args.quick)


if __name__ == "__main__":
    sys.exit(main())
