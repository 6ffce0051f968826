"""The rate budget: one per API key per process, shared by the sync hook and the triggers; it sleeps
until granted (no periodic wake-ups) and never stalls, whatever form ``X-RateLimit-Reset`` takes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from airflow_provider_modelroute.api import rate_limit_reset
from airflow_provider_modelroute.hooks.modelroute import ModelRouteAsyncHook, ModelRouteHook
from airflow_provider_modelroute.hooks.rate_budget import RateBudget, RateLimit, shared_rate_budget
from airflow_provider_modelroute.testing import spec
from tests.conftest import FAST_RETRY_EXTRAS
from tests.nettools import RateLimitedServer


def wait_for(condition: Any, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.005)


def spent(budget: RateBudget, limit: int, reset_in: float) -> None:
    """Put ``budget`` in the state of a spent window that resets in ``reset_in`` seconds."""
    budget.acquire_blocking()
    budget.observe(RateLimit(limit, 0, time.time() + reset_in))


def test_reset_is_read_as_unix_seconds_or_a_delta() -> None:
    assert rate_limit_reset("1900000000", 5.0) == 1_900_000_000
    assert rate_limit_reset("30", 1_000.0) == 1_030.0
    assert rate_limit_reset("0", 1_000.0) == 1_000.0
    assert all(rate_limit_reset(value, 1_000.0) is None for value in (None, "soon", "-5"))


@pytest.mark.parametrize("reset", ["unix", "delta", "none"])
def test_no_stall_whatever_the_reset_header(monkeypatch: pytest.MonkeyPatch, reset: str) -> None:
    """30 requests, 24 from triggers' clients and 6 from sync hooks in threads, at 10 per second."""
    with RateLimitedServer(limit=10, window=1.0, reset=reset) as server:
        conn = {"conn_type": "modelroute", "host": server.base_url, "password": spec.make_api_key()}
        conn["extra"] = {**FAST_RETRY_EXTRAS, "max_retries": 10}
        monkeypatch.setenv("AIRFLOW_CONN_MR_LIMITED", json.dumps(conn))

        async def poll(index: int) -> str:
            async with ModelRouteAsyncHook("mr_limited") as client:
                return str((await client.get_execution(f"exec_{index}"))["status"])

        async def everything() -> list[str]:
            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(6) as threads:
                sync = [
                    loop.run_in_executor(
                        threads, lambda i=i: ModelRouteHook("mr_limited").get_execution(f"exec_s{i}")
                    )
                    for i in range(6)
                ]
                polls = await asyncio.gather(*(poll(i) for i in range(24)))
                return polls + [str(done["status"]) for done in await asyncio.gather(*sync)]

        statuses = asyncio.run(asyncio.wait_for(everything(), 120))
    assert statuses == ["COMPLETED"] * 30
    assert server.answered == 30
    # Paced by the budget: with a known reset no 429 but at a window's edge. Without one, the end
    # of the window is unknown: nothing is paced, the 429s' Retry-After spreads the retries.
    if reset != "none":
        assert server.rate_limited <= 2


def test_blocked_waiters_sleep_until_granted() -> None:
    """200 coroutines blocked on a spent window wake once each when granted; none polls meanwhile."""
    budget = RateBudget("test")
    spent(budget, limit=400, reset_in=0.5)
    wakeups = 0
    granted = budget._granted

    def counting(waiter: Any) -> tuple[bool, float | None]:
        nonlocal wakeups
        wakeups += 1
        return granted(waiter)

    budget._granted = counting  # type: ignore[method-assign]

    async def one() -> None:
        await budget.acquire()
        budget.observe(None)

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(200)))

    asyncio.run(asyncio.wait_for(main(), 60))
    assert budget.in_flight == 0 and not budget._queue
    # One look when queued, one when granted (the head: one more when its timer fires); a waiter that
    # polled every 50 ms would have looked ten times over during the half-second hold.
    assert wakeups <= 2 * 200 + 2, wakeups


def test_sync_and_async_share_one_budget_per_key() -> None:
    key = spec.make_api_key()
    budget = shared_rate_budget("https://api.example", key)
    assert shared_rate_budget("https://api.example", key) is budget
    assert shared_rate_budget("https://api.example", spec.make_api_key()) is not budget
    spent(budget, limit=5, reset_in=0.5)
    reset = budget.reset
    assert reset is not None
    done: list[tuple[str, float]] = []

    def in_thread() -> None:
        budget.acquire_blocking()
        done.append(("thread", time.time()))
        budget.observe(RateLimit(5, 3, reset + 1))

    thread = threading.Thread(target=in_thread)
    thread.start()
    wait_for(lambda: len(budget._queue) == 1, "the thread to queue")

    async def in_loop() -> None:
        await budget.acquire()
        done.append(("task", time.time()))
        budget.observe(RateLimit(5, 2, reset + 1))

    async def main() -> None:
        await asyncio.gather(in_loop(), in_loop())

    asyncio.run(asyncio.wait_for(main(), 60))
    thread.join(60)
    assert sorted(who for who, _ in done) == ["task", "task", "thread"]
    assert all(when >= reset for _, when in done)  # nobody went before the window reset


def test_a_long_wait_is_logged_with_the_key_suffix_only(caplog: pytest.LogCaptureFixture) -> None:
    key = spec.make_api_key()
    budget = shared_rate_budget("https://api.example", key)
    spent(budget, limit=5, reset_in=38.2)
    log = logging.getLogger("test_rate_budget")
    caplog.set_level(logging.INFO, logger="test_rate_budget")

    async def wait_then_give_up() -> None:
        waiting = asyncio.ensure_future(budget.acquire(log))
        while not budget._queue:
            await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(asyncio.wait_for(wait_then_give_up(), 60))
    assert f"waiting 38 s for the rate window of key ...{key[-4:]}" in caplog.text
    assert key[:-4] not in caplog.text
    assert not budget._queue and budget.in_flight == 0  # the cancelled waiter left the queue
