"""ModelRouteExecutionTrigger run in real event loops against the real local server."""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import random
import time
from typing import Any

import pytest

from airflow_provider_modelroute.hooks.modelroute import ModelRouteAsyncHook, ModelRouteHook
from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.triggers.modelroute import (
    MAX_CONSECUTIVE_FAILURES,
    ModelRouteExecutionTrigger,
    poll_grid,
)
from airflow_provider_modelroute.version_compat import BaseTrigger
from tests.conftest import connection_json
from tests.waiting import async_wait_for


def start_execution(seconds: float = 0.2, **simulate: Any) -> str:
    execution = ModelRouteHook().create_execution(
        "test-image", {"prompt": "p", "_simulate": {"seconds": seconds, **simulate}}
    )
    return str(execution["id"])


async def events_of(trigger: ModelRouteExecutionTrigger) -> list[dict[str, Any]]:
    return [dict(event.payload) async for event in trigger.run()]


def run(trigger: ModelRouteExecutionTrigger) -> list[dict[str, Any]]:
    return asyncio.run(events_of(trigger))


def roundtrip(trigger: ModelRouteExecutionTrigger) -> ModelRouteExecutionTrigger:
    """What the triggerer does: serialize to JSON in the DB, import the class path, rebuild."""
    classpath, kwargs = trigger.serialize()
    kwargs = json.loads(json.dumps(kwargs))  # only JSON primitives survive the database
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    return rebuilt


def test_serialize_roundtrip_behaves_the_same(server: ModelRouteServer) -> None:
    trigger = ModelRouteExecutionTrigger(
        start_execution(), poll_interval=0.05, deadline=time.time() + 600, cancel_on_kill=True, try_number=2
    )
    rebuilt = roundtrip(trigger)
    assert rebuilt.serialize()[1] == {
        "execution_id": trigger.execution_id,
        "modelroute_conn_id": "modelroute_default",
        "poll_interval": 0.05,
        "deadline": trigger.deadline,
        "cancel_on_kill": True,
        "try_number": 2,
        "webhook_route": None,
    }
    original, copied = run(trigger), run(rebuilt)
    assert len(original) == len(copied) == 1
    assert original[0]["status"] == copied[0]["status"] == "done"
    assert original[0]["execution"] == copied[0]["execution"]
    assert original[0]["execution"]["status"] == "COMPLETED"
    assert original[0]["try_number"] == copied[0]["try_number"] == 2


def test_faults_do_not_end_the_wait(server: ModelRouteServer) -> None:
    execution_id = start_execution(0.5)
    endpoint = "GET /v1/executions/{id}"
    server.add_fault(endpoint, "rate_limit", count=2, retry_after=0)
    server.add_fault(endpoint, "error", count=3, code="SERVICE_UNAVAILABLE")
    server.add_fault(endpoint, "drop", count=2)
    server.add_fault(endpoint, "error", count=2, code="MODEL_OVERLOADED")
    events = run(ModelRouteExecutionTrigger(execution_id, poll_interval=0.05))
    assert [e["status"] for e in events] == ["done"]
    assert events[0]["execution"]["status"] == "COMPLETED"
    assert server.stats()["faults_fired"] == 9


def test_retry_after_is_respected(server: ModelRouteServer) -> None:
    execution_id = start_execution(0)
    server.add_fault("GET /v1/executions/{id}", "rate_limit", count=1, retry_after=1)
    started = time.monotonic()
    events = run(ModelRouteExecutionTrigger(execution_id, poll_interval=0.05))
    assert events[0]["status"] == "done"
    assert time.monotonic() - started >= 1.0


def test_gives_up_after_consecutive_failures_with_one_event(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_MODELROUTE_DEFAULT", connection_json(server, max_retries=0))
    execution_id = start_execution(60)
    server.add_fault("GET /v1/executions/{id}", "error", count=None, code="SERVICE_UNAVAILABLE")
    events = run(ModelRouteExecutionTrigger(execution_id, poll_interval=0.01))
    assert len(events) == 1
    assert events[0]["status"] == "error" and events[0]["execution_id"] == execution_id
    assert events[0]["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert events[0]["error"]["request_id"].startswith("req_")
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == MAX_CONSECUTIVE_FAILURES


def test_non_retryable_error_ends_the_wait_at_once(server: ModelRouteServer) -> None:
    execution_id = start_execution(60)
    server.add_fault("GET /v1/executions/{id}", "error", count=None, code="UNAUTHORIZED")
    events = run(ModelRouteExecutionTrigger(execution_id, poll_interval=0.01))
    assert [e["status"] for e in events] == ["error"]
    assert events[0]["error"]["code"] == "UNAUTHORIZED"
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == 1


def test_deadline_yields_timeout(server: ModelRouteServer) -> None:
    execution_id = start_execution(3600)
    started = time.monotonic()
    events = run(ModelRouteExecutionTrigger(execution_id, poll_interval=0.1, deadline=time.time() + 0.5))
    # the execution runs for an hour: a timeout event means the deadline ended the wait
    assert events == [{"status": "timeout", "execution_id": execution_id}]
    assert time.monotonic() - started > 0.4


@pytest.mark.parametrize("outcome", ["FAILED", "CANCELLED", "EXPIRED"])
def test_unsuccessful_end_is_reported(server: ModelRouteServer, outcome: str) -> None:
    execution_id = start_execution(0.1, outcome=outcome, error_code="GENERATION_FAILED")
    events = run(ModelRouteExecutionTrigger(execution_id, poll_interval=0.05))
    assert events[0]["status"] == "done" and events[0]["execution"]["status"] == outcome


def test_many_triggers_share_one_rate_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    with ModelRouteServer(pending_seconds=0, processing_seconds=1.5, rate_limit=40, rate_window=1) as server:
        monkeypatch.setenv("AIRFLOW_CONN_MODELROUTE_DEFAULT", connection_json(server))
        hook = ModelRouteHook()  # one hook: it paces itself from the rate-limit headers
        prompt = {"prompt": "p", "_simulate": {"seconds": 1.5}}
        execution_ids = [str(hook.create_execution("test-image", prompt)["id"]) for _ in range(60)]
        limited_before = server.stats()["rate_limited"]

        async def wait_all() -> list[list[dict[str, Any]]]:
            triggers = [ModelRouteExecutionTrigger(e, poll_interval=0.2) for e in execution_ids]
            return await asyncio.gather(*(events_of(t) for t in triggers))

        results = asyncio.run(wait_all())
        stats = server.stats()
    assert all(len(events) == 1 and events[0]["status"] == "done" for events in results)
    assert {events[0]["execution_id"] for events in results} == set(execution_ids)
    assert stats["rate_limited"] == limited_before == 0  # paced by the shared budget: no 429 at all
    assert stats["requests"]["GET /v1/executions/{id}"] >= 60


def test_a_window_spent_by_carried_requests_does_not_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two requests a second, the first poll answered 429 and retried at once: the new window opens
    # already spent by the carry, and the budget must ask the server again rather than wait forever.
    with ModelRouteServer(rate_limit=2, rate_window=1.0, pending_seconds=0.1) as server:
        monkeypatch.setenv("AIRFLOW_CONN_MODELROUTE_DEFAULT", connection_json(server))
        server.add_fault("GET /v1/executions/{id}", "rate_limit", count=1, retry_after=0)
        execution_id = start_execution(1.5)

        async def wait() -> list[dict[str, Any]]:
            trigger = ModelRouteExecutionTrigger(execution_id, poll_interval=0.2)
            return await asyncio.wait_for(events_of(trigger), 60)  # stalled forever before the fix

        events = asyncio.run(wait())
    assert events[0]["status"] == "done" and events[0]["execution"]["status"] == "COMPLETED"


@pytest.mark.parametrize(
    ("poll_interval", "pollers", "grid", "webhook"),
    [
        (5.0, 1, 0.5, False),
        (5.0, 100, 0.5, False),
        (5.0, 1000, 0.05, False),  # a point holds ~10 polls: no bursts at high concurrency
        (600, 1, 0.5, True),
    ],
)
def test_pauses_end_on_the_loop_grid(poll_interval: float, pollers: int, grid: float, webhook: bool) -> None:
    route = {"dag_id": "d"} if webhook else None
    trigger = ModelRouteExecutionTrigger("exec_1", poll_interval=poll_interval, webhook_route=route)
    spread = 0.25 if webhook else 0.1

    async def pauses() -> list[tuple[float, float, float]]:
        loop = asyncio.get_running_loop()
        return [(loop.time(), trigger._next_poll(pollers), loop.time()) for _ in range(2000)]

    low, high = poll_interval * (1 - spread) - grid / 2, poll_interval * (1 + spread) + grid / 2
    for before, pause, after in asyncio.run(pauses()):
        # The pause ends on a point of the grid (of the loop's clock, read between `before` and `after`)...
        assert math.floor((after + pause) / grid + 1e-6) >= math.ceil((before + pause) / grid - 1e-6)
        assert low - 1e-6 <= pause <= high + 1e-6  # ...moved by at most half of it


@pytest.mark.parametrize(("poll_interval", "pollers"), [(5.0, 5000), (0.05, 1)])
def test_no_grid_where_polls_already_share_wake_ups(poll_interval: float, pollers: int) -> None:
    trigger = ModelRouteExecutionTrigger("exec_1", poll_interval=poll_interval)
    assert poll_grid(poll_interval, pollers) == 0
    grid = min(0.5, poll_interval / 10, 10 * poll_interval / pollers)  # what the grid would be

    async def ends() -> list[float]:
        loop = asyncio.get_running_loop()
        return [loop.time() + trigger._next_poll(pollers) for _ in range(200)]

    off_grid = [end for end in asyncio.run(ends()) if abs(end / grid - round(end / grid)) > 0.01]
    assert len(off_grid) > 150  # the jittered pauses as they are, not moved onto the narrow grid


def test_polls_of_one_loop_share_wake_ups(server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # 40 triggers polling every 1 s (grid 0.1 s), started at random times: after its first poll, each
    # poll starts in a loop iteration shared with others, on one of the grid's points. A slow machine
    # only makes more polls share an iteration (the loop wakes late and finds more timers due).
    execution_ids = [start_execution(3600) for _ in range(40)]
    iterations, polled_in = [0], []
    real_get = ModelRouteAsyncHook.get_execution

    async def get_execution(client: ModelRouteAsyncHook, execution_id: str) -> dict[str, Any]:
        polled_in.append((execution_id, iterations[0]))
        return await real_get(client, execution_id)

    monkeypatch.setattr(ModelRouteAsyncHook, "get_execution", get_execution)

    async def wait_a_while() -> None:
        loop = asyncio.get_running_loop()
        run_once = loop._run_once  # type: ignore[attr-defined]

        def counted() -> None:
            iterations[0] += 1
            run_once()

        loop._run_once = counted  # type: ignore[attr-defined]

        async def one(execution_id: str) -> None:
            await asyncio.sleep(random.uniform(0, 1))
            await events_of(ModelRouteExecutionTrigger(execution_id, poll_interval=1.0))

        tasks = [asyncio.create_task(one(e)) for e in execution_ids]
        await async_wait_for(
            "every trigger to poll four times",
            lambda: all(sum(1 for e, _ in polled_in if e == x) >= 4 for x in execution_ids),
            interval=0.05,
        )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(wait_a_while())
    first = {execution_id: iteration for execution_id, iteration in reversed(polled_in)}
    later = [iteration for execution_id, iteration in polled_in if iteration != first[execution_id]]
    assert len(later) >= 120  # each trigger's three polls after its first
    # Uncoalesced, nearly every poll wakes the loop on its own; on the grid, ~4 polls share a point.
    assert len(set(later)) <= len(later) / 2, sorted(later)


def test_cancelled_run_cleans_up(server: ModelRouteServer) -> None:
    execution_id = start_execution(3600)

    def polls() -> int:
        return int(server.stats()["requests"].get("GET /v1/executions/{id}", 0))

    async def cancel_midway() -> None:
        task = asyncio.ensure_future(events_of(ModelRouteExecutionTrigger(execution_id, poll_interval=0.05)))
        await async_wait_for("the trigger to poll twice", lambda: polls() >= 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert pending == []

    asyncio.run(cancel_midway())
    assert server.stats()["cancels"] == {}  # a triggerer restart must not cancel the execution


@pytest.mark.skipif(not hasattr(BaseTrigger, "on_kill"), reason="BaseTrigger.on_kill arrived in Airflow 3.3")
@pytest.mark.parametrize("cancel_on_kill", [True, False])
def test_on_kill_cancels_when_asked(
    server: ModelRouteServer, capsys: pytest.CaptureFixture[str], cancel_on_kill: bool
) -> None:
    execution_id = start_execution(60)
    trigger = ModelRouteExecutionTrigger(execution_id, poll_interval=0.05, cancel_on_kill=cancel_on_kill)
    asyncio.run(trigger.on_kill())
    expected = {execution_id: 1} if cancel_on_kill else {}
    assert server.stats()["cancels"] == expected
    assert server.execution(execution_id)["status"] in (
        {"CANCELLED"} if cancel_on_kill else {"PENDING", "PROCESSING"}
    )
    said = f"The task was killed; cancelled ModelRoute execution {execution_id}" in capsys.readouterr().out
    assert said is cancel_on_kill


@pytest.mark.skipif(not hasattr(BaseTrigger, "on_kill"), reason="BaseTrigger.on_kill arrived in Airflow 3.3")
def test_on_kill_after_the_end_says_so(server: ModelRouteServer, capsys: pytest.CaptureFixture[str]) -> None:
    execution_id = start_execution(0)
    assert run(ModelRouteExecutionTrigger(execution_id, poll_interval=0.05))[0]["status"] == "done"
    capsys.readouterr()
    asyncio.run(ModelRouteExecutionTrigger(execution_id, cancel_on_kill=True).on_kill())
    logs = capsys.readouterr().out
    assert f"ModelRoute execution {execution_id} had already finished" in logs
    assert "cancelled ModelRoute execution" not in logs
