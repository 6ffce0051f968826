"""The local server sends real webhooks: endpoints API via the hook, signed deliveries, retries, faults."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_modelroute.exceptions import ModelRouteApiError, ModelRouteConfigError
from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.webhooks import mode, receiver
from tests.webhook_capture import CaptureServer, Received, endpoints_cleared


@pytest.fixture
def hooks(server: ModelRouteServer) -> Iterator[ModelRouteServer]:
    with endpoints_cleared(server):
        yield server


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    with CaptureServer() as capture_server:
        yield capture_server


def start(seconds: float = 0.2, webhook_url: str | None = None, **simulate: Any) -> str:
    execution = ModelRouteHook().create_execution(
        "test-image", {"prompt": "p", "_simulate": {"seconds": seconds, **simulate}}, webhook_url=webhook_url
    )
    return str(execution["id"])


def types_of(received: list[Received], execution_id: str) -> list[str]:
    parsed = [json.loads(r.body) for r in received]
    return [
        d.get("event_type") or d.get("type")
        for d in parsed
        if (d.get("data") or {}).get("id") == execution_id
    ]


def verified(received: Received, secret: str) -> dict[str, Any]:
    """The delivery's signature checks out with ``secret`` and the receiver parses it; returns its
    type, event id and execution."""
    mode.verify(
        secret, received.headers["X-Signature"], received.headers["X-Signature-Timestamp"], received.body
    )
    assert received.headers["User-Agent"] == "ModelRoute-Webhooks/1.0"
    assert receiver.parse_event(received.body)["status"] == "done"
    document = json.loads(received.body)
    return {"type": document.get("event_type") or document["type"], "id": document["id"], **document}


def test_endpoints_api_through_the_hook(hooks: ModelRouteServer, capture: CaptureServer) -> None:
    hook = ModelRouteHook()
    created = hook.create_webhook_endpoint(
        f"{capture.url}/in", description="d", events=["execution.completed"]
    )
    assert created["id"].startswith("wh_") and created["secret"].startswith("whsec_")
    assert created["is_active"] is True and created["events"] == ["execution.completed"]
    listed = hook.list_webhook_endpoints()
    assert [e["id"] for e in listed] == [created["id"]] and "secret" not in listed[0]
    assert {"is_active", "failure_count", "last_success"} <= set(listed[0])
    updated = hook.update_webhook_endpoint(created["id"], is_active=False, description="off")
    assert updated["is_active"] is False and updated["description"] == "off"
    hook.update_webhook_endpoint(created["id"], is_active=True)
    hook.test_webhook_endpoint(created["id"])
    [test] = capture.wait_for("the test delivery", lambda r: len(r) == 1)
    mode.verify(
        created["secret"], test.headers["X-Signature"], test.headers["X-Signature-Timestamp"], test.body
    )
    hook.delete_webhook_endpoint(created["id"])
    assert hook.list_webhook_endpoints() == []
    with pytest.raises(ModelRouteApiError) as missing:
        hook.delete_webhook_endpoint(created["id"])
    assert missing.value.http_status == 404
    with pytest.raises(ModelRouteConfigError, match="https"):
        hook.create_webhook_endpoint("http://airflow.example.com/hooks")
    with pytest.raises(ModelRouteConfigError, match="unknown_field"):
        hook.update_webhook_endpoint(created["id"], unknown_field=1)
    with pytest.raises(ModelRouteApiError) as invalid:
        hook.create_webhook_endpoint("https://a.example/x", events=["execution.exploded"])
    assert invalid.value.code == "INPUT_VALIDATION_ERROR"


@pytest.mark.parametrize("shape", ["overview", "executions-page"])
def test_signed_deliveries_to_endpoints_and_to_the_execution_webhook_url(
    hooks: ModelRouteServer, capture: CaptureServer, shape: str
) -> None:
    hooks.webhooks.configure(shape=shape)
    endpoint = ModelRouteHook().create_webhook_endpoint(f"{capture.url}/org")
    execution_id = start(webhook_url=f"{capture.url}/mine?route=r&token=t")

    received = capture.wait_for(
        "started and completed, at the endpoint and the webhook_url",
        lambda r: len(r) == 4 and types_of(r, execution_id).count("execution.completed") == 2,
    )

    assert sorted(r.path for r in received) == ["/mine?route=r&token=t"] * 2 + ["/org"] * 2
    parsed = [verified(r, endpoint["secret"]) for r in received]  # the webhook_url too: the endpoint's secret
    completed = [e for e in parsed if e["type"] == "execution.completed"]
    assert completed[0]["id"] == completed[1]["id"]  # one event, two targets
    assert completed[0]["data"]["status"] == "COMPLETED" and completed[0]["data"]["result"]["file_id"]
    assert all(("event_type" in json.loads(r.body)) == (shape == "overview") for r in received)
    assert [e["data"]["status"] for e in parsed if e["type"] == "execution.started"] == ["PROCESSING"] * 2


def test_failed_and_cancelled_executions_send_their_events(
    hooks: ModelRouteServer, capture: CaptureServer
) -> None:
    ModelRouteHook().create_webhook_endpoint(capture.url, events=["execution.failed", "execution.cancelled"])
    failed = start(outcome="FAILED", error_code="GENERATION_FAILED")
    cancelled = start(seconds=60)
    ModelRouteHook().cancel_execution(cancelled)
    received = capture.wait_for("failed and cancelled", lambda r: len(r) == 2)
    assert types_of(received, failed) == ["execution.failed"]
    assert types_of(received, cancelled) == ["execution.cancelled"]


def test_failed_deliveries_follow_the_scaled_schedule_and_deactivate_the_endpoint(
    hooks: ModelRouteServer, capture: CaptureServer
) -> None:
    hooks.webhooks.configure(retry_scale=0.001)  # 2, 4, 8, 16, 30 minutes -> 0.12 ... 1.8 s
    endpoint = ModelRouteHook().create_webhook_endpoint(capture.url, events=["execution.completed"])
    capture.status = 500
    first = start()

    def attempts_of_first() -> list[dict[str, Any]]:
        return [d for d in hooks.webhooks.deliveries() if d["execution_id"] == first]

    _wait(lambda: len(attempts_of_first()) == 6, "the first delivery and its 5 retries")
    attempts = attempts_of_first()
    assert [d["attempt"] for d in attempts] == [1, 2, 3, 4, 5, 6]
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(attempts)]
    assert all(gap >= wait * 0.001 for gap, wait in zip(gaps, (120, 240, 480, 960, 1800), strict=True)), gaps
    start()
    capture.wait_for("ten failures in a row", lambda r: len(r) >= 10)
    listed = {e["id"]: e for e in ModelRouteHook().list_webhook_endpoints()}
    _wait(
        lambda: not ModelRouteHook().list_webhook_endpoints()[0]["is_active"],
        "the endpoint to be deactivated",
    )
    assert listed[endpoint["id"]]["failure_count"] >= 9


def test_a_receiver_that_recovers_gets_the_retried_delivery(
    hooks: ModelRouteServer, capture: CaptureServer
) -> None:
    hooks.webhooks.configure(retry_scale=0.001)
    ModelRouteHook().create_webhook_endpoint(capture.url, events=["execution.completed"])
    capture.status = 503
    execution_id = start()
    capture.wait_for("the first attempt", lambda r: len(r) == 1)
    capture.status = 200
    received = capture.wait_for("the retry", lambda r: len(r) == 2)
    assert (
        received[0].body == received[1].body
        and types_of(received, execution_id) == ["execution.completed"] * 2
    )
    _wait(lambda: ModelRouteHook().list_webhook_endpoints()[0]["last_success"], "last_success to be set")


def test_faults_drop_duplicate_wrong_secret_delay_and_reorder(
    hooks: ModelRouteServer, capture: CaptureServer
) -> None:
    endpoint = ModelRouteHook().create_webhook_endpoint(capture.url)
    webhooks = hooks.webhooks
    webhooks.add_fault("drop", event_type="execution.started")
    webhooks.add_fault("duplicate", event_type="execution.completed")
    dropped_and_doubled = start()
    received = capture.wait_for("two copies of completed", lambda r: len(r) == 2)
    assert types_of(received, dropped_and_doubled) == ["execution.completed"] * 2
    assert received[0].body == received[1].body  # same event id: the receiver deduplicates

    webhooks.add_fault("wrong_secret", event_type="execution.started")
    webhooks.add_fault("delay", event_type="execution.completed", seconds=0.5)
    forged = start()
    received = capture.wait_for("started and a late completed", lambda r: len(types_of(r, forged)) == 2)
    started, completed = (r for r in received if types_of([r], forged))
    with pytest.raises(mode.SignatureRejected):
        verified(started, endpoint["secret"])
    assert verified(completed, endpoint["secret"])["type"] == "execution.completed"
    _wait(lambda: len([d for d in webhooks.deliveries() if d["execution_id"] == forged]) == 2, "the log")
    late = [d for d in webhooks.deliveries() if d["execution_id"] == forged]
    assert late[1]["at"] - late[0]["at"] >= 0.5

    webhooks.add_fault("reorder", event_type="execution.started")
    reordered = start()
    received = capture.wait_for("both events", lambda r: len(types_of(r, reordered)) == 2)
    assert types_of(received, reordered) == ["execution.completed", "execution.started"], (
        webhooks.deliveries()
    )
    assert webhooks.stats()["fault_reorder"] == 1 and webhooks.stats()["fault_drop"] == 1


def _wait(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
