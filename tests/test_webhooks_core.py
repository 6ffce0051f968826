"""The webhook core: signatures, both body shapes, deduplication, routes and tokens, connection settings."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from airflow_provider_modelroute.exceptions import ModelRouteConfigError
from airflow_provider_modelroute.webhooks import mode, receiver

SECRET = "whsec_test_secret_0123456789"
EXECUTION = {
    "id": "exec_11111111-2222-3333-4444-555555555555",
    "status": "COMPLETED",
    "model": "flux-1.1-pro",
    "result": {"file_id": "file_abc", "content_type": "image/png", "width": 8, "height": 8},
}


def overview_body(execution: dict[str, Any] = EXECUTION, event_type: str = "execution.completed") -> bytes:
    """The webhooks overview's shape."""
    return json.dumps(
        {
            "id": "evt_1",
            "event_type": event_type,
            "timestamp": "2026-01-01T00:00:00Z",
            "version": "1",
            "organization_id": "org_1",
            "execution_id": execution["id"],
            "data": execution,
        }
    ).encode()


def executions_page_body(
    execution: dict[str, Any] = EXECUTION, event_type: str = "execution.completed"
) -> bytes:
    """The executions/webhooks page's shape."""
    return json.dumps(
        {"id": "evt_2", "type": event_type, "timestamp": 1767225600, "data": execution}
    ).encode()


# -- signatures -----------------------------------------------------------------------------------


def test_signature_accepts_what_was_signed_over_timestamp_and_raw_body() -> None:
    body, now = overview_body(), int(time.time())
    signature = mode.sign(SECRET, now, body)
    assert mode.verify(SECRET, signature, str(now), body) == now
    assert mode.verify(SECRET, signature.upper(), f" {now} ", body, now=now + 299) == now


@pytest.mark.parametrize(
    "change",
    ["secret", "body", "timestamp", "missing signature", "missing timestamp", "not a number"],
)
def test_signature_rejects_anything_changed_or_missing(change: str) -> None:
    body, now = overview_body(), int(time.time())
    signature, timestamp, secret, sent = mode.sign(SECRET, now, body), str(now), SECRET, body
    if change == "secret":
        secret = "whsec_another"
    elif change == "body":
        sent = body.replace(b"COMPLETED", b"FAILED")
    elif change == "timestamp":
        timestamp = str(now - 1)
    elif change == "missing signature":
        signature = ""
    elif change == "missing timestamp":
        timestamp = ""
    else:
        timestamp = "yesterday"
    with pytest.raises(mode.SignatureRejected) as caught:
        mode.verify(secret, signature, timestamp, sent)
    assert SECRET not in str(caught.value)
    assert not signature or signature not in str(caught.value)


@pytest.mark.parametrize("skew", [-301, 301, 3600])
def test_stale_or_future_timestamp_is_rejected_even_with_a_valid_signature(skew: int) -> None:
    body, now = overview_body(), int(time.time())
    signature = mode.sign(SECRET, now, body)
    with pytest.raises(mode.SignatureRejected, match="300 s"):
        mode.verify(SECRET, signature, str(now), body, now=now + skew)


# -- body shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [overview_body(), executions_page_body()], ids=["overview", "executions-page"]
)
def test_both_documented_shapes_parse_into_the_triggers_done_event(body: bytes) -> None:
    done = receiver.parse_event(body)
    assert done["status"] == "done" and done["execution_id"] == EXECUTION["id"]
    assert done["execution"]["status"] == "COMPLETED"
    assert [f["file_id"] for f in done["execution"]["files"]] == ["file_abc"]
    assert done["webhook_event_id"] == json.loads(body)["id"]


def test_terminal_event_without_status_takes_it_from_the_event_type() -> None:
    bare = {"id": EXECUTION["id"]}
    event = receiver.parse_event(executions_page_body(bare, "execution.failed"))
    assert event["execution"]["status"] == "FAILED"
    started = receiver.parse_event(overview_body({**bare, "status": "PROCESSING"}, "execution.started"))
    assert started["execution"]["status"] == "PROCESSING"


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"type": "execution.completed", "data": EXECUTION},
        {"id": "evt_3", "data": EXECUTION},
        {"id": "evt_3", "type": "execution.completed", "data": "nope"},
        {"id": "evt_3", "type": "execution.completed", "data": {"status": "COMPLETED"}},
        {"id": "evt_3", "type": "execution.completed", "execution_id": "exec_other", "data": EXECUTION},
    ],
)
def test_malformed_events_are_refused(document: Any) -> None:
    with pytest.raises(ValueError):
        receiver.parse_event(json.dumps(document).encode())


# -- routes and tokens ------------------------------------------------------------------------------


def test_route_roundtrips_and_its_token_binds_it_to_the_secret() -> None:
    route = mode.TaskRoute("dag", "manual__2026-01-01T00:00:00+00:00", "generate", 3)
    encoded = route.encode()
    assert mode.TaskRoute.decode(encoded) == route
    token = mode.route_token(SECRET, encoded)
    assert mode.token_matches(SECRET, encoded, token)
    assert not mode.token_matches("whsec_other", encoded, token)
    other = mode.TaskRoute("dag", "manual__2026-01-01T00:00:00+00:00", "generate", 4).encode()
    assert not mode.token_matches(SECRET, other, token)
    assert not mode.token_matches(SECRET, encoded, None)


def test_execution_webhook_url_names_the_receiver_route_and_token() -> None:
    from urllib.parse import parse_qs, urlsplit

    receiver_url = mode.receiver_url("https://airflow.example.com/", "modelroute default")
    assert receiver_url == "https://airflow.example.com/modelroute/webhooks/modelroute%20default"
    route = mode.TaskRoute("d", "r", "t")
    url = route.webhook_url(receiver_url, SECRET)
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert url.startswith(receiver_url + "?")
    assert mode.TaskRoute.decode(query["route"]) == route
    assert mode.token_matches(SECRET, query["route"], query["token"])
    assert SECRET not in url
    with pytest.raises(ModelRouteConfigError, match="http"):
        mode.receiver_url("airflow.example.com", "c")


# -- connection settings ----------------------------------------------------------------------------


def test_webhook_mode_is_on_only_with_a_secret_and_a_receiver_url() -> None:
    assert mode.WebhookConfig.from_extras("c", {}) is None
    on = mode.WebhookConfig.from_extras(
        "c", {"webhook_secret": SECRET, "webhook_receiver_url": "https://a.example/modelroute/webhooks/c/"}
    )
    assert on is not None and on.poll_interval == mode.DEFAULT_POLL_INTERVAL
    assert on.receiver_url == "https://a.example/modelroute/webhooks/c" and SECRET not in repr(on)
    legacy = mode.WebhookConfig.from_extras(
        "c",
        {
            "extra__modelroute__webhook_secret": SECRET,
            "webhook_receiver_url": "https://a.example/x",
            "webhook_poll_interval": "30",
        },
    )
    assert legacy is not None and legacy.poll_interval == 30.0


@pytest.mark.parametrize(
    ("extras", "names"),
    [
        ({"webhook_secret": SECRET}, "webhook_receiver_url"),
        ({"webhook_secret": SECRET, "webhook_receiver_url": "a.example"}, "webhook_receiver_url"),
        (
            {
                "webhook_secret": SECRET,
                "webhook_receiver_url": "https://a.example",
                "webhook_poll_interval": 0,
            },
            "webhook_poll_interval",
        ),
    ],
)
def test_half_configured_webhook_mode_names_the_field_to_fix(extras: dict[str, Any], names: str) -> None:
    with pytest.raises(ModelRouteConfigError, match=names) as caught:
        mode.WebhookConfig.from_extras("c", extras)
    assert SECRET not in str(caught.value)


def test_the_connection_form_masks_the_webhook_secret() -> None:
    from airflow_provider_modelroute.get_provider_info import get_provider_info

    fields = get_provider_info()["connection-types"][0]["conn-fields"]
    assert fields["webhook_secret"]["schema"]["format"] == "password"  # Airflow 3.2+ masks it
    assert {"webhook_receiver_url", "webhook_poll_interval"} <= set(fields)


def test_the_plugin_mounts_the_receiver_only_where_airflow_mounts_plugin_apps() -> None:
    from tests.airflow_versions import AIRFLOW_V_3_1_PLUS

    apps = receiver.ModelRouteWebhooksPlugin.fastapi_apps
    assert [a["url_prefix"] for a in apps] == (["/modelroute"] if AIRFLOW_V_3_1_PLUS else [])


@pytest.mark.parametrize(
    ("pushed", "claimed", "foreign"),
    [
        ("exec_a", "exec_a", False),
        ("exec_a", "exec_b", True),
        (None, "exec_b", False),
        ("exec_a", None, False),
    ],
)
def test_an_event_about_another_execution_is_foreign(
    pushed: str | None, claimed: str | None, foreign: bool
) -> None:
    """A late trigger event landing on a task that got its (reused, SQLite) trigger id is recognised."""
    from types import SimpleNamespace

    from airflow_provider_modelroute.operators.modelroute import is_foreign_event

    ti = SimpleNamespace(
        task_id="t", map_index=-1, xcom_pull=lambda **kw: pushed if kw["key"] == "execution_id" else 1
    )
    event = {"status": "done"} if claimed is None else {"status": "done", "execution_id": claimed}
    assert is_foreign_event({"ti": ti}, event) is foreign  # type: ignore[arg-type]
