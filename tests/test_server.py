"""The local ModelRoute server speaks the documented API: checked with plain HTTP, not our hook."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import requests

from airflow_provider_modelroute.testing import ModelRouteServer, RemoteModelRouteServer, spec
from airflow_provider_modelroute.testing.dialects import CHOICES, ENV_VAR, PRESETS, Dialect, dialect_from
from tests.waiting import wait_for


@pytest.fixture
def http(server: ModelRouteServer) -> Iterator[requests.Session]:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {server.api_key}"
    yield session
    session.close()


def create(server: ModelRouteServer, http: requests.Session, input: dict, **body: object) -> dict:
    response = http.post(
        f"{server.base_url}/v1/executions", json={"model": "test-image", "input": input, **body}
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def poll_statuses(server: ModelRouteServer, http: requests.Session, execution_id: str) -> list[str]:
    """Every status the execution showed, in order, until a terminal one."""
    seen: list[str] = []

    def latest() -> str:
        status = str(http.get(f"{server.base_url}/v1/executions/{execution_id}").json()["status"])
        if not seen or seen[-1] != status:
            seen.append(status)
        return status

    wait_for(f"{execution_id} to end", latest, until=spec.TERMINAL_STATUSES.__contains__, interval=0.01)
    return seen


def test_auth_and_error_body(server: ModelRouteServer) -> None:
    url = f"{server.base_url}/v1/executions/exec_x"
    for headers in (
        {},
        {"Authorization": f"Bearer {spec.make_api_key()}"},
        {"Authorization": server.api_key},
    ):
        response = requests.get(url, headers=headers)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "UNAUTHORIZED" and error["retryable"] is False
        assert "X-RateLimit-Remaining" in response.headers  # on every answer
        assert response.headers["X-Request-Id"].startswith("req_") == error["request_id"].startswith("req_")


def test_status_progression_result_and_terminal_states(
    http: requests.Session, server: ModelRouteServer
) -> None:
    phase = 60.0  # each state lasts a minute; the test moves the execution's clock instead of waiting
    saved = server.pending_seconds, server.processing_seconds, server.awaiting_webhook_seconds
    server.pending_seconds = server.processing_seconds = server.awaiting_webhook_seconds = phase
    try:
        created = create(server, http, {"prompt": "fox"}, metadata={"a": "b"})
        assert created["status"] == "PENDING" and created["id"].startswith("exec_")
        assert {"hold_amount", "estimated_cost", "expires_at", "created_at"} <= set(created)
        early = http.get(f"{server.base_url}/v1/executions/{created['id']}/result")
        assert early.status_code == 409
        execution, seen = server._executions[created["id"]], []
        for elapsed in (1.0, phase + 1, 2 * phase + 1, 3 * phase + 1):  # one second into each state
            with server._lock:
                execution.created = time.time() - elapsed
            seen.append(http.get(f"{server.base_url}/v1/executions/{created['id']}").json()["status"])
        assert seen == ["PENDING", "PROCESSING", "AWAITING_WEBHOOK", "COMPLETED"]
    finally:
        server.pending_seconds, server.processing_seconds, server.awaiting_webhook_seconds = saved
    done = http.get(f"{server.base_url}/v1/executions/{created['id']}").json()
    assert done["result"]["content_type"] == "image/png" and done["metadata"] == {"a": "b"}
    result = http.get(f"{server.base_url}/v1/executions/{created['id']}/result").json()
    assert result["output"]["images"][0]["file_id"] == done["result"]["file_id"]
    cancel = http.post(f"{server.base_url}/v1/executions/{created['id']}/cancel")
    assert cancel.status_code == 409  # a terminal state never changes
    assert http.get(f"{server.base_url}/v1/executions/{created['id']}").json()["status"] == "COMPLETED"


@pytest.mark.parametrize(
    ("simulate", "status", "code"),
    [
        ({"outcome": "FAILED", "error_code": "GENERATION_FAILED"}, "FAILED", "GENERATION_FAILED"),
        ({"outcome": "EXPIRED"}, "EXPIRED", "EXPIRED"),
        ({"outcome": "CANCELLED"}, "CANCELLED", None),
    ],
)
def test_simulated_outcomes(
    server: ModelRouteServer, http: requests.Session, simulate: dict, status: str, code: str | None
) -> None:
    created = create(server, http, {"prompt": "p", "_simulate": simulate})
    assert poll_statuses(server, http, created["id"])[-1] == status
    doc = http.get(f"{server.base_url}/v1/executions/{created['id']}").json()
    assert (doc.get("error") or {}).get("code") == code


def test_outcome_fault_and_cancel(server: ModelRouteServer, http: requests.Session) -> None:
    server.add_fault("POST /v1/executions", "outcome", outcome="FAILED", error_code="MODEL_UNAVAILABLE")
    failed = create(server, http, {"prompt": "p"})
    assert poll_statuses(server, http, failed["id"])[-1] == "FAILED"
    slow = create(server, http, {"prompt": "p", "_simulate": {"seconds": 60}})
    cancelled = http.post(f"{server.base_url}/v1/executions/{slow['id']}/cancel").json()
    assert cancelled["status"] == "CANCELLED"
    assert server.stats()["cancels"] == {slow["id"]: 1}


def test_execution_ttl_expires_long_runs() -> None:
    with ModelRouteServer(
        pending_seconds=0, processing_seconds=5, execution_ttl=0.2, rate_limit=None
    ) as server:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {server.api_key}"
        created = create(server, session, {"prompt": "p"})
        assert poll_statuses(server, session, created["id"])[-1] == "EXPIRED"


def test_validation_and_moderation_errors(server: ModelRouteServer, http: requests.Session) -> None:
    cases = [
        ({"model": "nope", "input": {"prompt": "p"}}, "INPUT_VALIDATION_ERROR", "model"),
        ({"model": "test-image"}, "INPUT_VALIDATION_ERROR", "input"),
        ({"model": "test-file", "input": {"size_bytes": spec.MAX_FILE_SIZE + 1}}, None, "input.size_bytes"),
        ({"model": "test-image", "input": {"prompt": "forbidden"}}, "CONTENT_MODERATION_REJECTED", None),
        (
            {"model": "test-image", "input": {"prompt": "p", "image": "file_nope"}},
            "FILE_NOT_FOUND",
            "input.image",
        ),
    ]
    for body, code, field in cases:
        response = http.post(f"{server.base_url}/v1/executions", json=body)
        error = response.json()["error"]
        assert response.status_code == 400, body
        assert error["code"] == (code or "INPUT_VALIDATION_ERROR")
        if field:
            assert error["details"][0]["field"] == field
    assert server.stats()["executions_created"] == 0


def test_idempotency_key(server: ModelRouteServer, http: requests.Session) -> None:
    headers = {"Idempotency-Key": "k1"}
    body = {"model": "test-image", "input": {"prompt": "p"}}
    first = http.post(f"{server.base_url}/v1/executions", json=body, headers=headers).json()
    again = http.post(f"{server.base_url}/v1/executions", json=body, headers=headers).json()
    assert first["id"] == again["id"]
    conflict = http.post(
        f"{server.base_url}/v1/executions", json={**body, "input": {"prompt": "q"}}, headers=headers
    )
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    stats = server.stats()
    assert stats["executions_created"] == 1 and stats["idempotent_replays"] == 1
    assert stats["idempotency_keys"] == {"k1": 1}


def _large_file(server: ModelRouteServer, http: requests.Session, size: int) -> str:
    created = http.post(
        f"{server.base_url}/v1/executions", json={"model": "test-file", "input": {"size_bytes": size}}
    ).json()
    poll_statuses(server, http, created["id"])
    return str(http.get(f"{server.base_url}/v1/executions/{created['id']}").json()["result"]["file_id"])


def test_download_in_each_reading(server: ModelRouteServer, http: requests.Session, dialect: Dialect) -> None:
    size = 1024 * 1024 + 5
    file_id = _large_file(server, http, size)
    sha = server.file_info(file_id)["sha256"]
    answer = http.get(f"{server.base_url}/v1/files/{file_id}/download", allow_redirects=False)
    if dialect.download == "bytes":  # the seed page's `curl ... -o result.png`
        assert answer.status_code == 200 and int(answer.headers["Content-Length"]) == size
        assert hashlib.sha256(answer.content).hexdigest() == sha
        ranged = http.get(f"{server.base_url}/v1/files/{file_id}/download", headers={"Range": "bytes=10-"})
        assert ranged.status_code == 206 and ranged.content == answer.content[10:]
    elif dialect.download == "json":  # the seed page's "Presigned URL response"
        document = answer.json()
        assert set(document) == {"url", "expires_at", "content_type", "size_bytes"}
        assert document["size_bytes"] == size and document["url"].startswith(server.storage_url)
        assert hashlib.sha256(requests.get(document["url"]).content).hexdigest() == sha
    else:
        assert answer.status_code == 302
        assert hashlib.sha256(requests.get(answer.headers["Location"]).content).hexdigest() == sha
    missing = http.get(f"{server.base_url}/v1/files/file_nope/download")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "FILE_NOT_FOUND"
    url_endpoint = http.get(f"{server.base_url}/v1/files/{file_id}/url")
    assert url_endpoint.status_code == (200 if dialect.url_endpoint else 404)
    assert "X-RateLimit-Limit" in answer.headers  # on every answer


def test_storage_rules(server: ModelRouteServer, http: requests.Session) -> None:
    size = 3 * 1024 * 1024 + 5
    file_id = _large_file(server, http, size)
    info = server.file_info(file_id)
    doc = http.get(f"{server.base_url}/v1/files/{file_id}/url").json()
    assert doc["size_bytes"] == size and doc["content_type"] == "application/octet-stream"
    assert doc["url"].startswith(server.storage_url) and "X-Amz-Signature=" in doc["url"]
    body = requests.get(doc["url"]).content
    assert hashlib.sha256(body).hexdigest() == info["sha256"]

    ranged = requests.get(doc["url"], headers={"Range": f"bytes={size - 10}-"})
    assert ranged.status_code == 206 and ranged.content == body[-10:]
    assert ranged.headers["Content-Range"] == f"bytes {size - 10}-{size - 1}/{size}"

    with_auth = requests.get(doc["url"], headers={"Authorization": f"Bearer {server.api_key}"})
    assert with_auth.status_code == 400
    assert server.stats()["storage_requests_with_authorization"] == 1
    tampered = requests.get(doc["url"].replace("Signature=", "Signature=0"))
    assert tampered.status_code == 403
    assert http.get(f"{server.base_url}/v1/files/file_nope/url").json()["error"]["code"] == "FILE_NOT_FOUND"


def test_presigned_urls_expire() -> None:
    with ModelRouteServer(pending_seconds=0, processing_seconds=0, url_ttl=3, rate_limit=None) as server:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {server.api_key}"
        file_id = _large_file(server, session, 100)
        url = session.get(f"{server.base_url}/v1/files/{file_id}/url").json()["url"]
        assert requests.get(url).status_code == 200
        # expiry is in whole seconds: the URL lives 3 to 4 s, then answers 403 for good
        expired = wait_for(
            "the URL to expire", lambda: requests.get(url), until=lambda r: r.status_code == 403
        )
        assert b"expired" in expired.content


def test_largest_file_streams_exactly(server: ModelRouteServer, http: requests.Session) -> None:
    file_id = _large_file(server, http, spec.MAX_FILE_SIZE)
    url = http.get(f"{server.base_url}/v1/files/{file_id}/url").json()["url"]
    digest, total = hashlib.sha256(), 0
    with requests.get(url, stream=True) as response:
        for chunk in response.iter_content(1024 * 1024):
            digest.update(chunk)
            total += len(chunk)
    assert total == spec.MAX_FILE_SIZE
    assert digest.hexdigest() == server.file_info(file_id)["sha256"]


def test_upload_flow_in_each_reading(
    server: ModelRouteServer, http: requests.Session, dialect: Dialect
) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 100
    declared = {"filename": "a.bin", "content_type": "application/octet-stream", "size_bytes": len(png)}
    upload = f"{server.base_url}/v1/files/upload"
    v1_only, v2_only = http.post(upload, json=declared), http.post(upload, json={"purpose": "INPUT"})
    assert (v1_only.status_code, v2_only.status_code) == (
        (200, 400) if dialect.upload == "v1" else (400, 200)
    )
    refused = v2_only if dialect.upload == "v1" else v1_only
    assert refused.json()["error"]["details"][0]["field"] == (
        "filename" if dialect.upload == "v1" else "purpose"
    )
    slot = http.post(upload, json={**declared, "purpose": "INPUT", "region": "EU", "ttl_days": 7}).json()
    assert slot["file_id"].startswith("file_") and "expires_at" in slot
    other_type = requests.put(slot["upload_url"], data=png, headers={"Content-Type": "image/png"})
    assert other_type.status_code == 403  # presigned for the declared content type
    with_key = requests.put(
        slot["upload_url"], data=png, headers={"Authorization": f"Bearer {server.api_key}"}
    )
    assert with_key.status_code == 400
    put = requests.put(slot["upload_url"], data=png, headers={"Content-Type": "application/octet-stream"})
    assert put.status_code == 200
    body = {"model": "test-image", "input": {"prompt": "p", "image": slot["file_id"]}}
    confirm = http.post(f"{server.base_url}/v1/files/confirm", json={"file_id": slot["file_id"]})
    if dialect.confirm == "required":
        assert server.file_info(slot["file_id"])["upload"]["region"] == "EU"
        assert confirm.json()["content_type"] == "image/png"  # sniffed from the magic bytes
        assert confirm.json()["size_bytes"] == len(png)
    else:
        assert confirm.status_code == int(dialect.confirm)  # an API version without the step
    assert http.post(f"{server.base_url}/v1/executions", json=body).status_code in (200, 202)


def test_an_unconfirmed_upload_is_not_usable(server: ModelRouteServer, http: requests.Session) -> None:
    slot = http.post(f"{server.base_url}/v1/files/upload", json={"purpose": "INPUT"}).json()
    assert requests.put(slot["upload_url"], data=b"\x89PNG\r\n\x1a\n").status_code == 200
    body = {"model": "test-image", "input": {"prompt": "p", "image": slot["file_id"]}}
    unconfirmed = http.post(f"{server.base_url}/v1/executions", json=body)
    assert unconfirmed.json()["error"]["code"] == "FILE_NOT_FOUND"


def test_submit_and_replay_in_each_reading(
    server: ModelRouteServer, http: requests.Session, dialect: Dialect
) -> None:
    body, headers = {"model": "test-image", "input": {"prompt": "p"}}, {"Idempotency-Key": "k-replay"}
    first = http.post(f"{server.base_url}/v1/executions", json=body, headers=headers)
    if dialect.submit == "sync":  # the seed's example reads result.file_id from the POST answer
        assert first.status_code == 200 and first.json()["result"]["file_id"].startswith("file_")
    else:
        assert first.status_code == 202 and first.json()["status"] == "PENDING"
        poll_statuses(server, http, first.json()["id"])
    again = http.post(f"{server.base_url}/v1/executions", json=body, headers=headers)
    assert again.json()["id"] == first.json()["id"]
    expected = "COMPLETED" if dialect.replay == "current" else first.json()["status"]
    assert again.json()["status"] == expected  # the original answer (maybe stale), or the current state
    assert (again.headers.get("Idempotent-Replayed") == "true") is dialect.replay_header
    assert server.stats()["executions_created"] == 1


def test_unknown_execution_in_each_reading(
    server: ModelRouteServer, http: requests.Session, dialect: Dialect
) -> None:
    response = http.get(f"{server.base_url}/v1/executions/exec_unknown")
    assert response.status_code == 404
    if dialect.unknown_id == "bare-404":
        assert response.content == b""
    else:
        assert response.json()["error"]["retryable"] is False


@pytest.mark.parametrize("reset", ["unix", "delta", "absent"])
def test_rate_limit_headers_and_429(reset: str) -> None:
    with ModelRouteServer(
        rate_limit=2, rate_window=30, dialect=f"literal,rate_limit_reset={reset}"
    ) as server:
        headers = {"Authorization": f"Bearer {server.api_key}"}
        url = f"{server.base_url}/v1/executions/exec_x"
        responses = [requests.get(url, headers=headers) for _ in range(3)]
        assert [r.status_code for r in responses] == [404, 404, 429]
        assert [r.headers["X-RateLimit-Remaining"] for r in responses] == ["1", "0", "0"]
        assert responses[0].headers["X-RateLimit-Limit"] == "2"
        value = responses[0].headers.get("X-RateLimit-Reset")
        if reset == "unix":
            assert value is not None and time.time() <= int(value) <= time.time() + 32
        elif reset == "delta":
            assert value is not None and 0 <= int(value) <= 31
        else:
            assert value is None
        assert 1 <= int(responses[2].headers["Retry-After"]) <= 31
        assert responses[2].json()["error"]["code"] == "RATE_LIMITED"
        assert server.stats()["rate_limited"] == 1


def test_defaults_read_the_docs_literally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    server = ModelRouteServer()
    try:
        assert server.dialect == PRESETS["literal"]
        assert server.rate_limit == 60 and server.rate_window == 60  # the polling page's example
        assert server.awaiting_webhook_seconds >= 1  # waiting for the AI provider takes a while
    finally:
        server.stop()
    monkeypatch.setenv(ENV_VAR, "sync,download=json")
    server = ModelRouteServer()
    try:
        assert server.dialect.submit == "sync" and server.dialect.download == "json"
    finally:
        server.stop()
    assert ModelRouteServer(dialect="redirect").dialect == PRESETS["redirect"]  # the argument wins
    with pytest.raises(ValueError, match="presets: literal"):
        dialect_from("nope")
    with pytest.raises(ValueError, match="download must be one of"):
        dialect_from("literal,download=ftp")


def test_every_reading_is_played_by_some_preset() -> None:
    for reading, values in CHOICES.items():
        assert {getattr(preset, reading) for preset in PRESETS.values()} == set(values), reading


def test_faults(server: ModelRouteServer, http: requests.Session) -> None:
    server.add_fault("*", "error", count=1, code="SERVICE_UNAVAILABLE")
    response = http.get(f"{server.base_url}/v1/executions/exec_x")
    assert response.status_code == 503 and response.json()["error"]["retryable"] is True

    server.add_fault("POST /v1/executions", "drop")
    with pytest.raises(requests.ConnectionError):
        create(server, http, {"prompt": "dropped"})
    assert server.stats()["executions_created"] == 1  # dropped after the execution was created

    server.add_fault("GET /v1/executions/{id}", "slow", seconds=0.3)
    started = time.monotonic()
    http.get(f"{server.base_url}/v1/executions/exec_x")
    assert time.monotonic() - started >= 0.3

    file_id = _large_file(server, http, 1_000_000)
    url = http.get(f"{server.base_url}/v1/files/{file_id}/url").json()["url"]
    server.add_fault("GET /files/{file_id}", "truncate", after_bytes=1000)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url).content  # noqa: B018
    server.add_fault("GET /files/{file_id}", "expire_url")
    assert requests.get(url).status_code == 403
    assert requests.get(url).status_code == 200  # count=1: the fault is spent
    assert server.stats()["faults_fired"] == 5
    with pytest.raises(ValueError, match="unknown fault kind"):
        server.add_fault("*", "meteor")


def test_thousands_of_concurrent_polls(server: ModelRouteServer, http: requests.Session) -> None:
    execution_id = create(server, http, {"prompt": "p"})["id"]
    headers = {"Authorization": f"Bearer {server.api_key}"}
    tls = ssl.create_default_context()  # shared: building one per client costs ~25 ms

    async def waiter() -> list[int]:  # like a trigger: its own client, one poll at a time
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=headers, timeout=120, verify=tls
        ) as client:
            return [(await client.get(f"/v1/executions/{execution_id}")).status_code for _ in range(4)]

    async def wait_all() -> set[int]:
        results = await asyncio.gather(*(waiter() for _ in range(500)))
        return {status for statuses in results for status in statuses}

    assert asyncio.run(wait_all()) == {200}
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == 2000


def test_standalone_process_and_remote_control() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_modelroute.testing",
            "--processing-seconds",
            "0",
            "--dialect",
            "sync",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        conn = json.loads(info["airflow_conn"])
        assert conn["conn_type"] == "modelroute" and conn["password"] == info["api_key"]
        assert info["dialect"] == "sync"
        remote = RemoteModelRouteServer(info["admin_url"])
        remote.add_fault("GET /v1/executions/{id}", "error", code="MODEL_OVERLOADED")
        headers = {"Authorization": f"Bearer {info['api_key']}"}
        created = requests.post(
            f"{info['base_url']}/v1/executions",
            json={"model": "test-image", "input": {"prompt": "p"}},
            headers=headers,
        ).json()
        assert (
            requests.get(f"{info['base_url']}/v1/executions/{created['id']}", headers=headers).status_code
            == 503
        )
        assert remote.stats()["faults_fired"] == 1
        assert remote.execution_ids() == [created["id"]]
        assert remote.set_execution_status(created["id"], "FAILED", "GENERATION_FAILED")["status"] == "FAILED"
        assert remote.execution(created["id"])["error"]["code"] == "GENERATION_FAILED"
        remote.reset()
        assert remote.stats()["executions_created"] == 0
        assert remote.set_dialect("presigned")["download"] == "json"
        assert remote.stats()["dialect"] == "presigned"
    finally:
        process.terminate()
        assert process.wait(timeout=120) == 0


def test_request_log_keeps_the_order_of_arrival(server: ModelRouteServer) -> None:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {server.api_key}"
    created = http.post(
        f"{server.base_url}/v1/executions", json={"model": "test-image", "input": {"prompt": "p"}}
    )
    execution_id = created.json()["id"]
    http.get(f"{server.base_url}/v1/executions/{execution_id}")
    http.post(f"{server.base_url}/v1/executions/{execution_id}/cancel")
    log = server.request_log()
    assert [(e["route"], e["id"]) for e in log] == [
        ("POST /v1/executions", None),
        ("GET /v1/executions/{id}", execution_id),
        ("POST /v1/executions/{id}/cancel", execution_id),
    ]
    assert [e["at"] for e in log] == sorted(e["at"] for e in log)
    server.reset()
    assert server.request_log() == []
