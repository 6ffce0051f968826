"""ModelRouteHook against the real local server: every endpoint, the retry rules, the error model."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import time

import pytest

from airflow_provider_modelroute import api
from airflow_provider_modelroute._compat import AirflowFailException
from airflow_provider_modelroute.exceptions import (
    ModelRouteApiError,
    ModelRouteAuthError,
    ModelRouteConfigError,
    ModelRouteConnectionError,
    ModelRouteInputError,
    ModelRouteNotFoundError,
    ModelRouteRateLimitError,
    ModelRouteTransferError,
)
from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
from airflow_provider_modelroute.testing import ModelRouteServer
from tests.conftest import connection_json


def wait_until_terminal(hook: ModelRouteHook, execution_id: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = hook.get_execution(execution_id)
        if api.is_terminal(doc["status"]):
            return doc
        time.sleep(0.05)
    raise AssertionError(f"{execution_id} did not finish")


def use_connection(
    monkeypatch: pytest.MonkeyPatch, server: ModelRouteServer, conn_id: str = "mr", **kw
) -> None:
    conn = json.loads(connection_json(server))
    conn.update(kw.pop("fields", {}))
    conn["extra"].update(kw)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


# --- endpoints -------------------------------------------------------------------------------


def test_execution_lifecycle_every_endpoint(server: ModelRouteServer) -> None:
    hook = ModelRouteHook()
    created = hook.create_execution(
        "test-image", {"prompt": "a red fox"}, idempotency_key="k-lifecycle", metadata={"team": "data"}
    )
    assert created["id"].startswith("exec_")
    assert created["status"] == "PENDING"
    assert created["metadata"] == {"team": "data"}

    done = wait_until_terminal(hook, created["id"])
    assert done["status"] == "COMPLETED"
    files = api.result_files(done)
    assert len(files) == 1 and files[0]["content_type"] == "image/png"

    result = hook.get_execution_result(created["id"])
    assert [f["file_id"] for f in api.result_files(result)] == [files[0]["file_id"]]

    assert hook.cancel_execution(created["id"]) is None  # already finished: not an error

    stats = server.stats()
    assert stats["requests"]["POST /v1/executions"] == 1
    assert stats["requests"]["GET /v1/executions/{id}/result"] == 1
    assert stats["requests"]["POST /v1/executions/{id}/cancel"] == 1


def test_cancel_running_execution(server: ModelRouteServer) -> None:
    hook = ModelRouteHook()
    created = hook.create_execution("test-image", {"prompt": "slow", "_simulate": {"seconds": 30}})
    cancelled = hook.cancel_execution(created["id"])
    assert cancelled is not None and cancelled["status"] == "CANCELLED"
    assert hook.get_execution(created["id"])["status"] == "CANCELLED"
    assert server.stats()["cancels"] == {created["id"]: 1}


def test_execution_url_uses_dashboard_extra(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_connection(monkeypatch, server, dashboard_url="https://dash.example.com/")
    assert ModelRouteHook("mr").execution_url("exec_1") == "https://dash.example.com/executions/exec_1"


def test_download_streams_exact_bytes(server: ModelRouteServer) -> None:
    hook = ModelRouteHook()
    created = hook.create_execution("test-file", {"size_bytes": 3 * 1024 * 1024 + 17, "seed": "dl"})
    file_id = api.result_files(wait_until_terminal(hook, created["id"]))[0]["file_id"]

    download = hook.download_file(file_id, chunk_size=256 * 1024)
    digest, chunks = hashlib.sha256(), 0
    for chunk in download:
        assert len(chunk) <= 256 * 1024
        digest.update(chunk)
        chunks += 1
    info = server.file_info(file_id)
    assert download.size_bytes == info["size_bytes"] == 3 * 1024 * 1024 + 17
    assert digest.hexdigest() == info["sha256"]
    assert chunks > 1
    assert "Signature" not in repr(download)
    assert server.stats()["storage_requests_with_authorization"] == 0


def _file_id(hook: ModelRouteHook, size: int = 2 * 1024 * 1024) -> str:
    created = hook.create_execution("test-file", {"size_bytes": size, "seed": str(size)})
    return api.result_files(wait_until_terminal(hook, created["id"]))[0]["file_id"]


def test_download_resumes_after_truncation(server: ModelRouteServer) -> None:
    hook = ModelRouteHook()
    file_id = _file_id(hook)
    server.add_fault("GET /files/{file_id}", "truncate", count=2, after_bytes=300_000)
    digest = hashlib.sha256()
    for chunk in hook.download_file(file_id):
        digest.update(chunk)
    assert digest.hexdigest() == server.file_info(file_id)["sha256"]
    assert server.stats()["requests"]["GET /files/{file_id}"] == 3


def test_download_gets_fresh_url_when_expired(server: ModelRouteServer) -> None:
    hook = ModelRouteHook()
    file_id = _file_id(hook)
    download = hook.download_file(file_id)
    server.add_fault("GET /files/{file_id}", "expire_url", count=1)
    data = b"".join(download)
    assert hashlib.sha256(data).hexdigest() == server.file_info(file_id)["sha256"]
    assert server.stats()["requests"]["GET /v1/files/{file_id}/url"] == 2


def test_download_gives_up_without_leaking_the_signature(
    server: ModelRouteServer, caplog: pytest.LogCaptureFixture
) -> None:
    hook = ModelRouteHook()
    file_id = _file_id(hook)
    server.add_fault("GET /files/{file_id}", "truncate", count=None, after_bytes=1000)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ModelRouteTransferError, match="stopped at byte") as err:
        for _ in hook.download_file(file_id):
            pass
    assert "Signature" not in str(err.value)
    assert "Signature" not in caplog.text


def test_storage_url_refused_unless_local_testing_allowed(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    file_id = _file_id(ModelRouteHook(), 1000)
    use_connection(monkeypatch, server, allow_insecure_storage_urls=False)
    with pytest.raises(ModelRouteTransferError, match="allow_insecure_storage_urls"):
        ModelRouteHook("mr").download_file(file_id)
    assert server.stats()["requests"].get("GET /files/{file_id}", 0) == 0


def test_upload_then_use_as_input(server: ModelRouteServer) -> None:
    hook = ModelRouteHook()
    png_execution = wait_until_terminal(hook, hook.create_execution("test-image", {"prompt": "src"})["id"])
    png = b"".join(hook.download_file(api.result_files(png_execution)[0]["file_id"]))
    opened = []

    def open_source() -> io.BytesIO:
        opened.append(1)
        return io.BytesIO(png)

    server.add_fault("PUT /files/{file_id}", "drop", count=1)
    uploaded = hook.upload_file(open_source, filename="in.png", content_type="image/png", size_bytes=len(png))
    assert uploaded["file_id"].startswith("file_")
    assert uploaded["content_type"] == "image/png"
    assert uploaded["size_bytes"] == len(png)
    assert len(opened) == 2  # the dropped upload was retried from a fresh handle
    assert server.file_info(uploaded["file_id"])["sha256"] == hashlib.sha256(png).hexdigest()

    created = hook.create_execution("test-image", {"prompt": "x", "image": uploaded["file_id"]})
    done = wait_until_terminal(hook, created["id"])
    assert done["status"] == "COMPLETED"


def test_upload_rejects_oversized_file_before_any_request(server: ModelRouteServer) -> None:
    with pytest.raises(ModelRouteConfigError, match="up to"):
        ModelRouteHook().upload_file(
            io.BytesIO, filename="big", content_type="x/y", size_bytes=api.MAX_FILE_SIZE + 1
        )
    assert server.stats()["requests"] == {}


# --- idempotency and retries -------------------------------------------------------------------


@pytest.mark.parametrize("key", ["explicit-key", None])
def test_create_is_retried_once_created_never_duplicated(server: ModelRouteServer, key: str | None) -> None:
    server.add_fault("POST /v1/executions", "drop", count=2)
    created = ModelRouteHook().create_execution("test-image", {"prompt": "p"}, idempotency_key=key)
    stats = server.stats()
    assert stats["requests"]["POST /v1/executions"] == 3
    assert stats["executions_created"] == 1
    assert list(stats["idempotency_keys"].values()) == [1]
    if key:
        assert stats["idempotency_keys"] == {key: 1}
    assert server.execution(created["id"])["id"] == created["id"]


def test_same_key_returns_original_execution(server: ModelRouteServer) -> None:
    hook = ModelRouteHook()
    first = hook.create_execution("test-image", {"prompt": "p"}, idempotency_key="same")
    second = hook.create_execution("test-image", {"prompt": "p"}, idempotency_key="same")
    assert first["id"] == second["id"]
    with pytest.raises(ModelRouteInputError) as err:
        hook.create_execution("test-image", {"prompt": "other"}, idempotency_key="same")
    assert err.value.code == "IDEMPOTENCY_CONFLICT"
    assert isinstance(err.value, AirflowFailException)
    assert server.stats()["executions_created"] == 1


RETRYABLE = sorted(code for code, spec in api.ERROR_CODES.items() if spec.retryable)
NOT_RETRYABLE = sorted(code for code, spec in api.ERROR_CODES.items() if not spec.retryable)


@pytest.mark.parametrize("code", RETRYABLE)
def test_retryable_codes_are_retried(server: ModelRouteServer, code: str) -> None:
    server.add_fault("GET /v1/executions/{id}", "error", count=2, code=code, retry_after=0)
    hook = ModelRouteHook()
    created = hook.create_execution("test-image", {"prompt": "p"})
    assert hook.get_execution(created["id"])["id"] == created["id"]
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == 3


@pytest.mark.parametrize("code", NOT_RETRYABLE)
def test_non_retryable_codes_fail_at_once(server: ModelRouteServer, code: str) -> None:
    server.add_fault("GET /v1/executions/{id}", "error", count=None, code=code)
    hook = ModelRouteHook()
    created = hook.create_execution("test-image", {"prompt": "p"})
    with pytest.raises(ModelRouteApiError) as err:
        hook.get_execution(created["id"])
    exc = err.value
    assert exc.code == code
    assert exc.retryable is False
    assert exc.http_status == api.ERROR_CODES[code].http_status
    assert exc.request_id and exc.request_id.startswith("req_")
    assert api.ERROR_CODES[code].hint in str(exc)
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == 1


def test_error_classes_and_fail_fast_marking(server: ModelRouteServer) -> None:
    hook = ModelRouteHook()
    created = hook.create_execution("test-image", {"prompt": "p"})
    expected = {
        "UNAUTHORIZED": (ModelRouteAuthError, True),
        "INPUT_VALIDATION_ERROR": (ModelRouteInputError, True),
        "FILE_NOT_FOUND": (ModelRouteNotFoundError, False),
        "INSUFFICIENT_BALANCE": (ModelRouteApiError, False),
    }
    for code, (cls, fail_fast) in expected.items():
        server.add_fault("GET /v1/executions/{id}", "error", count=1, code=code)
        with pytest.raises(cls) as err:
            hook.get_execution(created["id"])
        assert isinstance(err.value, AirflowFailException) is fail_fast, code


def test_validation_details_name_the_field(server: ModelRouteServer) -> None:
    with pytest.raises(ModelRouteInputError) as err:
        ModelRouteHook().create_execution("test-image", {"prompt": ""})
    assert err.value.details and any(d["field"] == "input.prompt" for d in err.value.details)
    assert "input.prompt" in str(err.value)
    assert server.stats()["requests"]["POST /v1/executions"] == 1


def test_unknown_execution_is_not_found(server: ModelRouteServer) -> None:
    with pytest.raises(ModelRouteNotFoundError) as err:
        ModelRouteHook().get_execution("exec_00000000-0000-0000-0000-00000000abcd")
    assert err.value.code == "EXECUTION_NOT_FOUND"


def test_retry_after_is_honoured(server: ModelRouteServer) -> None:
    hook = ModelRouteHook()
    created = hook.create_execution("test-image", {"prompt": "p"})
    server.add_fault("GET /v1/executions/{id}", "rate_limit", count=1, retry_after=1)
    started = time.monotonic()
    hook.get_execution(created["id"])
    assert time.monotonic() - started >= 1.0
    assert server.stats()["rate_limited"] == 1


def test_rate_limit_gives_up_after_retry_budget(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_connection(monkeypatch, server, max_retries=2)
    hook = ModelRouteHook("mr")
    created = hook.create_execution("test-image", {"prompt": "p"})
    server.add_fault("GET /v1/executions/{id}", "rate_limit", count=None, retry_after=0)
    with pytest.raises(ModelRouteRateLimitError) as err:
        hook.get_execution(created["id"])
    assert err.value.code == "RATE_LIMITED" and err.value.retryable
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == 3


def test_retry_deadline_bounds_total_time(server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch) -> None:
    use_connection(monkeypatch, server, max_retries=50, retry_deadline=1.5)
    hook = ModelRouteHook("mr")
    created = hook.create_execution("test-image", {"prompt": "p"})
    server.add_fault("GET /v1/executions/{id}", "rate_limit", count=None, retry_after=1)
    started = time.monotonic()
    with pytest.raises(ModelRouteRateLimitError):
        hook.get_execution(created["id"])
    assert time.monotonic() - started < 4
    assert server.stats()["requests"]["GET /v1/executions/{id}"] <= 3


def test_rate_limit_headers_are_read(
    modelroute_server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ModelRouteServer(rate_limit=3, rate_window=2.0, pending_seconds=0, processing_seconds=0) as small:
        use_connection(monkeypatch, small, max_retries=3)
        hook = ModelRouteHook("mr")
        created = hook.create_execution("test-image", {"prompt": "p"})
        assert hook.core.rate_limit.limit == 3
        assert hook.core.rate_limit.remaining == 2
        for _ in range(4):  # the 4th request must wait for the window to reset instead of getting a 429
            hook.get_execution(created["id"])
        assert small.stats()["rate_limited"] == 0


def test_connection_errors_are_retried_then_reported(
    monkeypatch: pytest.MonkeyPatch, server: ModelRouteServer
) -> None:
    use_connection(monkeypatch, server, fields={"host": "http://127.0.0.1:9"}, max_retries=1)
    with pytest.raises(ModelRouteConnectionError, match=r"127\.0\.0\.1:9"):
        ModelRouteHook("mr").get_execution("exec_1")


def test_slow_response_times_out_and_retries(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_connection(monkeypatch, server, timeout=0.3)
    hook = ModelRouteHook("mr")
    created = hook.create_execution("test-image", {"prompt": "p"})
    server.add_fault("GET /v1/executions/{id}", "slow", count=1, seconds=1.0)
    assert hook.get_execution(created["id"])["id"] == created["id"]
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == 2


# --- configuration and secrets ----------------------------------------------------------------


def test_malformed_key_fails_before_any_request(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = server.api_key[:-1] + ("0" if server.api_key[-1] != "0" else "1")
    use_connection(monkeypatch, server, fields={"password": bad})
    with pytest.raises(ModelRouteConfigError, match="checksum") as err:
        ModelRouteHook("mr").get_execution("exec_1")
    assert bad not in str(err.value)
    assert isinstance(err.value, AirflowFailException)
    assert server.stats()["requests"] == {}


def test_missing_connection_fails_at_once_naming_it(server: ModelRouteServer) -> None:
    async def open_async_client() -> None:
        async with ModelRouteHook("nowhere").async_client():
            pass

    for attempt in (
        lambda: ModelRouteHook("nowhere").get_execution("exec_1"),
        lambda: asyncio.run(open_async_client()),
    ):
        with pytest.raises(
            ModelRouteConfigError, match="connection 'nowhere' does not exist: create it"
        ) as err:
            attempt()
        assert isinstance(err.value, AirflowFailException)  # no retry can create it
    assert server.stats()["requests"] == {}


@pytest.mark.parametrize(
    ("extra", "field"), [({"timeout": "soon"}, "timeout"), ({"max_retries": -1}, "max_retries")]
)
def test_bad_extras_name_the_field(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch, extra: dict, field: str
) -> None:
    use_connection(monkeypatch, server, **extra)
    with pytest.raises(ModelRouteConfigError, match=field):
        ModelRouteHook("mr").get_execution("exec_1")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (None, "https://api.modelroute.ai"),
        ("api.modelroute.ai", "https://api.modelroute.ai"),
        ("https://eu.modelroute.ai/v1/", "https://eu.modelroute.ai"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ],
)
def test_base_url_normalisation(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch, host: str | None, expected: str
) -> None:
    use_connection(monkeypatch, server, fields={"host": host})
    assert ModelRouteHook("mr").core.settings.base_url == expected


def test_secrets_never_in_logs_errors_or_reprs(
    server: ModelRouteServer, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    hook = ModelRouteHook()
    created = hook.create_execution("test-image", {"prompt": "p"})
    server.add_fault("GET /v1/executions/{id}", "error", count=2, code="SERVICE_UNAVAILABLE")
    hook.get_execution(created["id"])
    server.add_fault("GET /v1/executions/{id}", "error", count=1, code="UNAUTHORIZED")
    with pytest.raises(ModelRouteAuthError) as err:
        hook.get_execution(created["id"])
    done = wait_until_terminal(hook, created["id"])
    url = hook.get_file_url(api.result_files(done)[0]["file_id"])["url"]
    signature = url.split("Signature=")[1].split("&")[0]
    for _ in hook.download_file(api.result_files(done)[0]["file_id"]):
        pass
    captured = capsys.readouterr()
    logs = caplog.text + captured.out + captured.err  # Airflow 3 logs hooks through structlog (stdout)
    assert "retry" in logs.lower()  # the retries were logged...
    assert "/files/" in logs  # ...and so was the storage request (urllib3 debug line)...
    texts = [logs, str(err.value), repr(err.value), repr(hook.core.settings), repr(hook.core)]
    for text in texts:  # ...and none of this carries a secret
        assert server.api_key not in text
        assert signature not in text


def test_test_connection(server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch) -> None:
    ok, message = ModelRouteHook().test_connection()
    assert ok, message
    use_connection(monkeypatch, server, fields={"password": api.make_api_key()})
    ok, message = ModelRouteHook("mr").test_connection()
    assert not ok and "UNAUTHORIZED" in message and "API key" in message
    use_connection(monkeypatch, server, fields={"password": "sk_nope"})
    ok, message = ModelRouteHook("mr").test_connection()
    assert not ok and "API key" in message
    # The words of the UI's form, and never the UI Test button's temporary connection id
    assert message.startswith("This connection has an unusable ModelRoute API key")
    assert "'mr'" not in message and "password" not in message


# --- async twin --------------------------------------------------------------------------------


def test_async_client_reads_retries_and_cancels(server: ModelRouteServer) -> None:
    hook = ModelRouteHook()
    created = hook.create_execution("test-image", {"prompt": "a", "_simulate": {"seconds": 30}})
    server.add_fault("GET /v1/executions/{id}", "error", count=2, code="MODEL_OVERLOADED")

    async def run() -> tuple[dict, dict | None]:
        async with hook.async_client() as client:
            doc = await client.get_execution(created["id"])
            return doc, await client.cancel_execution(created["id"])

    doc, cancelled = asyncio.run(run())
    assert doc["status"] in ("PENDING", "PROCESSING")
    assert cancelled is not None and cancelled["status"] == "CANCELLED"
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == 3


def test_async_client_raises_the_same_error_model(server: ModelRouteServer) -> None:
    async def run() -> None:
        async with ModelRouteHook().async_client() as client:
            await client.get_execution("exec_00000000-0000-0000-0000-00000000abcd")

    with pytest.raises(ModelRouteNotFoundError):
        asyncio.run(run())
