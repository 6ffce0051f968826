"""ModelRouteHook against the real local server: every endpoint, the retry rules, the error model."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable

import pytest
from airflow.secrets import BaseSecretsBackend

from airflow_provider_modelroute import api
from airflow_provider_modelroute.exceptions import (
    ModelRouteApiError,
    ModelRouteConfigError,
    ModelRouteConnectionError,
    ModelRouteError,
    ModelRoutePermanentError,
    ModelRouteTransferError,
)
from airflow_provider_modelroute.hooks.modelroute import ModelRouteAsyncHook, ModelRouteHook
from airflow_provider_modelroute.testing import ModelRouteServer, spec
from airflow_provider_modelroute.testing.dialects import Dialect
from airflow_provider_modelroute.testing.wire import CODE_STATUSES
from airflow_provider_modelroute.version_compat import (
    AirflowFailException,
    AirflowNotFoundException,
    BaseHook,
)
from tests.conftest import connection_json
from tests.waiting import wait_for

try:  # a refusal that Airflow 3 passes on rather than reporting the connection missing
    from airflow.sdk.exceptions import AirflowSecretsBackendAccessDenied
except ImportError:  # Airflow 2.11
    AirflowSecretsBackendAccessDenied = PermissionError  # type: ignore[misc,assignment]


def wait_until_terminal(hook: ModelRouteHook, execution_id: str) -> dict:
    return wait_for(
        f"{execution_id} to end",
        lambda: hook.get_execution(execution_id),
        until=lambda doc: api.is_terminal(doc["status"]),
    )


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


def _file_id(hook: ModelRouteHook, size: int = 2 * 1024 * 1024) -> str:
    created = hook.create_execution("test-file", {"size_bytes": size, "seed": str(size)})
    return api.result_files(wait_until_terminal(hook, created["id"]))[0]["file_id"]


DOWNLOAD = "GET /v1/files/{file_id}/download"
STORAGE = "GET /files/{file_id}"


def serving_endpoint(dialect: Dialect) -> str:
    """Where the bytes come from: /download itself (bytes reading) or the presigned URL."""
    return DOWNLOAD if dialect.download == "bytes" else STORAGE


def test_download_streams_exact_bytes(server: ModelRouteServer, dialect: Dialect) -> None:
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
    assert download.size_bytes == info["size_bytes"] == 3 * 1024 * 1024 + 17  # known before the bytes
    assert download.content_type == "application/octet-stream"
    assert digest.hexdigest() == info["sha256"]
    assert chunks > 1
    assert "Signature" not in repr(download)
    requests_seen = server.stats()["requests"]
    assert requests_seen[DOWNLOAD] == 1  # the seed page's endpoint, in every reading...
    assert "GET /v1/files/{file_id}/url" not in requests_seen  # ...never the llms.txt-only one
    assert requests_seen.get(STORAGE, 0) == (0 if dialect.download == "bytes" else 1)
    assert server.stats()["storage_requests_with_authorization"] == 0


def test_download_resumes_after_truncation(server: ModelRouteServer, dialect: Dialect) -> None:
    hook = ModelRouteHook()
    file_id = _file_id(hook)
    server.add_fault(serving_endpoint(dialect), "truncate", count=2, after_bytes=300_000)
    digest = hashlib.sha256()
    for chunk in hook.download_file(file_id):
        digest.update(chunk)
    assert digest.hexdigest() == server.file_info(file_id)["sha256"]
    assert server.stats()["requests"][serving_endpoint(dialect)] == 3  # resumed twice, with Range


@pytest.mark.parametrize("reading", ["presigned", "redirect"])
def test_download_gets_fresh_url_when_expired(server: ModelRouteServer, reading: str) -> None:
    server.dialect = reading
    hook = ModelRouteHook()
    file_id = _file_id(hook)
    server.add_fault(STORAGE, "truncate", count=1, after_bytes=300_000)  # a drop...
    server.add_fault(STORAGE, "expire_url", count=1)  # ...then the resume finds the URL expired
    data = b"".join(hook.download_file(file_id))
    assert hashlib.sha256(data).hexdigest() == server.file_info(file_id)["sha256"]
    requests_seen = server.stats()["requests"]
    assert requests_seen[DOWNLOAD] == 2  # a fresh URL, once
    assert requests_seen[STORAGE] == 3  # truncated, expired, resumed


def test_download_gives_up_without_leaking_the_signature(
    server: ModelRouteServer, dialect: Dialect, caplog: pytest.LogCaptureFixture
) -> None:
    hook = ModelRouteHook()
    file_id = _file_id(hook)
    server.add_fault(serving_endpoint(dialect), "truncate", count=None, after_bytes=1000)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ModelRouteTransferError, match="stopped at byte") as err:
        for _ in hook.download_file(file_id):
            pass
    assert "Signature" not in str(err.value)
    assert "Signature" not in caplog.text
    assert server.api_key not in str(err.value) + caplog.text


def test_a_json_file_served_as_bytes_is_not_mistaken_for_a_url_document(server: ModelRouteServer) -> None:
    document = json.dumps({"url": "https://example.com/x", "note": "a model's JSON output"}).encode()
    file_id = server.add_file(document, "application/json")
    download = ModelRouteHook().download_file(file_id)
    assert download.size_bytes == len(document) and download.content_type == "application/json"
    assert b"".join(download) == document


@pytest.mark.parametrize("reading", ["presigned", "redirect"])
def test_storage_url_refused_unless_local_testing_allowed(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch, reading: str
) -> None:
    server.dialect = reading
    file_id = _file_id(ModelRouteHook(), 1000)
    use_connection(monkeypatch, server, allow_insecure_storage_urls=False)
    with pytest.raises(ModelRouteTransferError, match="allow_insecure_storage_urls"):
        ModelRouteHook("mr").download_file(file_id)
    assert server.stats()["requests"].get(STORAGE, 0) == 0


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
    with pytest.raises(ModelRoutePermanentError) as err:  # a 409 with a code the docs do not list
        hook.create_execution("test-image", {"prompt": "other"}, idempotency_key="same")
    assert err.value.http_status == 409
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
    assert exc.http_status == CODE_STATUSES[code]
    assert exc.request_id and exc.request_id.startswith("req_")
    assert api.ERROR_CODES[code].hint in str(exc)
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == 1


def test_error_classes_and_fail_fast_marking(server: ModelRouteServer) -> None:
    hook = ModelRouteHook()
    created = hook.create_execution("test-image", {"prompt": "p"})
    expected = {
        "UNAUTHORIZED": (ModelRoutePermanentError, True),
        "INPUT_VALIDATION_ERROR": (ModelRoutePermanentError, True),
        "FILE_NOT_FOUND": (ModelRoutePermanentError, True),
        "INSUFFICIENT_BALANCE": (ModelRoutePermanentError, True),
        "INTERNAL_ERROR": (ModelRouteApiError, False),  # a server fault: a later try may succeed
    }
    for code, (cls, fail_fast) in expected.items():
        server.add_fault("GET /v1/executions/{id}", "error", count=1, code=code)
        with pytest.raises(cls) as err:
            hook.get_execution(created["id"])
        assert isinstance(err.value, AirflowFailException) is fail_fast, code


def test_validation_details_name_the_field(server: ModelRouteServer) -> None:
    with pytest.raises(ModelRoutePermanentError) as err:
        ModelRouteHook().create_execution("test-image", {"prompt": ""})
    assert err.value.details and any(d["field"] == "input.prompt" for d in err.value.details)
    assert "input.prompt" in str(err.value)
    assert server.stats()["requests"]["POST /v1/executions"] == 1


def test_unknown_execution_is_not_found_in_every_reading(server: ModelRouteServer, dialect: Dialect) -> None:
    with pytest.raises(ModelRoutePermanentError) as err:  # a documented error body, or a bare 404
        ModelRouteHook().get_execution("exec_00000000-0000-0000-0000-00000000abcd")
    assert err.value.http_status == 404 and isinstance(err.value, AirflowFailException)
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == 1  # not retried


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
    with pytest.raises(ModelRouteApiError) as err:
        hook.get_execution(created["id"])
    assert err.value.code == "RATE_LIMITED" and err.value.retryable
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == 3


def test_retry_deadline_bounds_total_time(server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch) -> None:
    use_connection(monkeypatch, server, max_retries=50, retry_deadline=1.5)
    hook = ModelRouteHook("mr")
    created = hook.create_execution("test-image", {"prompt": "p"})
    server.add_fault("GET /v1/executions/{id}", "rate_limit", count=None, retry_after=1)
    started = time.monotonic()
    with pytest.raises(ModelRouteApiError):
        hook.get_execution(created["id"])
    # 50 retries 1 s apart would take 50 s: the deadline stopped them after the first few
    assert time.monotonic() - started < 30
    assert server.stats()["requests"]["GET /v1/executions/{id}"] <= 3


@pytest.mark.parametrize("reset", ["unix", "delta", "absent"])
def test_rate_limit_headers_are_read(
    modelroute_server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch, reset: str
) -> None:
    with ModelRouteServer(
        rate_limit=3,
        rate_window=2.0,
        pending_seconds=0,
        processing_seconds=0,
        dialect=f"literal,rate_limit_reset={reset}",
    ) as small:
        use_connection(monkeypatch, small, max_retries=3)
        hook = ModelRouteHook("mr")
        started = time.time()
        created = hook.create_execution("test-image", {"prompt": "p"})
        seen = hook.transport.rate_limit
        assert seen.limit == 3
        if reset == "absent":  # no window end: Remaining cannot pace, Retry-After will
            assert seen.remaining is None and seen.reset is None
        else:  # a unix time or a delta: both read as the same absolute time
            assert seen.remaining == 2
            assert seen.reset is not None and started - 1 <= seen.reset <= started + 4
        for _ in range(4):  # the 4th request must wait for the window's end
            hook.get_execution(created["id"])
        # With Reset the client waits before sending; without it, one 429 and its Retry-After.
        assert small.stats()["rate_limited"] == (1 if reset == "absent" else 0)


def test_async_hook_is_not_paced_without_a_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    with ModelRouteServer(
        rate_limit=3, rate_window=2.0, processing_seconds=30, dialect="literal,rate_limit_reset=absent"
    ) as small:
        use_connection(monkeypatch, small, max_retries=3, retry_max_wait=0.1)
        created = ModelRouteHook("mr").create_execution("test-image", {"prompt": "p"})

        async def poll(times: int) -> None:
            async with ModelRouteAsyncHook("mr") as client:
                for _ in range(times):
                    await client.get_execution(created["id"])

        asyncio.run(asyncio.wait_for(poll(5), 30))  # over the limit: 429s and Retry-After, no stall
        assert small.stats()["requests"]["GET /v1/executions/{id}"] >= 5


def test_connection_errors_are_retried_then_reported(
    monkeypatch: pytest.MonkeyPatch, server: ModelRouteServer
) -> None:
    use_connection(monkeypatch, server, fields={"host": "http://127.0.0.1:9"}, max_retries=1)
    with pytest.raises(ModelRouteConnectionError, match=r"127\.0\.0\.1:9"):
        ModelRouteHook("mr").get_execution("exec_1")


def test_slow_response_times_out_and_retries(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a 2 s read timeout: only the answer held for 5 s can exceed it, even on a loaded machine
    use_connection(monkeypatch, server, timeout=2)
    hook = ModelRouteHook("mr")
    created = hook.create_execution("test-image", {"prompt": "p"})
    server.add_fault("GET /v1/executions/{id}", "slow", count=1, seconds=5)
    assert hook.get_execution(created["id"])["id"] == created["id"]
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == 2


# --- configuration and secrets ----------------------------------------------------------------


def test_the_docs_example_key_is_sent_with_a_warning(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    example = "sk_your_api_key_here"
    monkeypatch.setattr(server, "api_keys", [*server.api_keys, example])
    use_connection(monkeypatch, server, fields={"password": example})
    caplog.set_level(logging.WARNING)
    created = ModelRouteHook("mr").create_execution("test-image", {"prompt": "p"})
    assert created["id"].startswith("exec_")  # the server took the key: it was sent
    warning = " ".join(r.getMessage() for r in caplog.records if "API key" in r.getMessage())
    assert "password field" in warning and "64 hex digits" in warning  # names the field and the shape
    assert example not in caplog.text


def test_a_key_the_server_refuses_fails_at_once_with_a_hint(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    mistyped = server.api_key[:-1] + ("0" if server.api_key[-1] != "0" else "1")  # well-formed shape
    use_connection(monkeypatch, server, fields={"password": mistyped})
    with pytest.raises(ModelRoutePermanentError, match="password field") as err:
        ModelRouteHook("mr").get_execution("exec_1")
    assert err.value.code == "UNAUTHORIZED"
    assert "connection 'mr'" in str(err.value)  # which key: the one of this connection
    assert mistyped not in str(err.value)
    assert isinstance(err.value, AirflowFailException)
    assert server.stats()["requests"] == {"GET /v1/executions/{id}": 1}  # sent once, not retried


def test_an_empty_key_fails_before_any_request(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_connection(monkeypatch, server, fields={"password": ""})
    with pytest.raises(ModelRouteConfigError, match="no ModelRoute API key: put it in the password field"):
        ModelRouteHook("mr").get_execution("exec_1")
    assert server.stats()["requests"] == {}


def sync_and_async_lookups(conn_id: str) -> list[Callable[[], object]]:
    """A sync hook's first call and an async hook's entry: each reads the connection."""

    async def enter() -> None:
        async with ModelRouteAsyncHook(conn_id):
            pass

    return [lambda: ModelRouteHook(conn_id).get_execution("exec_1"), lambda: asyncio.run(enter())]


def test_missing_connection_fails_at_once_naming_it(server: ModelRouteServer) -> None:
    for attempt in sync_and_async_lookups("nowhere"):
        with pytest.raises(
            ModelRouteConfigError, match="connection 'nowhere' does not exist: create it"
        ) as err:
            attempt()
        assert isinstance(err.value, AirflowFailException)  # no retry can create it
    assert server.stats()["requests"] == {}


def test_extras_that_are_not_json_fail_naming_the_connection(
    server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = json.loads(connection_json(server))
    conn["extra"] = '{"timeout": 5,'  # Airflow itself would read this as no extras at all
    monkeypatch.setenv("AIRFLOW_CONN_MR_BROKEN", json.dumps(conn))
    try:  # some Airflows (3.1) refuse such a connection themselves and report it as missing
        BaseHook.get_connection("mr_broken")
        expected = "'mr_broken' has extras that are not JSON"
    except AirflowNotFoundException:
        expected = "'mr_broken' does not exist.*If it exists, Airflow could not read it"
    for attempt in sync_and_async_lookups("mr_broken"):
        with pytest.raises(ModelRouteConfigError, match=expected):
            attempt()
    assert server.stats()["requests"] == {}


class RefusingSecretsBackend(BaseSecretsBackend):
    """A secrets backend that refuses every lookup (as a vault does when a policy denies access)."""

    def get_connection(self, conn_id: str) -> None:  # type: ignore[override]
        raise AirflowSecretsBackendAccessDenied(f"policy denies reading {conn_id}")


def test_a_failing_secrets_backend_surfaces_as_itself_naming_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    try:  # Airflow 3.3 builds the configured backends on first use and can forget them
        from airflow.sdk.configuration import clear_secrets_backends_cache
    except ImportError:
        pytest.skip("this Airflow keeps its secrets backends for the life of the process")
    monkeypatch.setenv("AIRFLOW__SECRETS__BACKEND", f"{__name__}.RefusingSecretsBackend")
    clear_secrets_backends_cache()
    try:
        with pytest.raises(ModelRouteError, match=r"connection 'mr_vault'.*policy denies reading") as err:
            ModelRouteHook("mr_vault").get_execution("exec_1")
    finally:
        monkeypatch.delenv("AIRFLOW__SECRETS__BACKEND")
        clear_secrets_backends_cache()
    assert "does not exist" not in str(err.value)
    assert isinstance(err.value.__cause__, AirflowSecretsBackendAccessDenied)


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
    assert ModelRouteHook("mr").transport.settings.base_url == expected


def test_secrets_never_in_logs_errors_or_reprs(
    server: ModelRouteServer, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    hook = ModelRouteHook()
    created = hook.create_execution("test-image", {"prompt": "p"})
    server.add_fault("GET /v1/executions/{id}", "error", count=2, code="SERVICE_UNAVAILABLE")
    hook.get_execution(created["id"])
    server.add_fault("GET /v1/executions/{id}", "error", count=1, code="UNAUTHORIZED")
    with pytest.raises(ModelRoutePermanentError) as err:
        hook.get_execution(created["id"])
    done = wait_until_terminal(hook, created["id"])
    server.dialect = "presigned"  # /download answers the URL document: a signature to keep secret
    download = hook.download_file(api.result_files(done)[0]["file_id"])
    signature = str(download._url).split("Signature=")[1].split("&")[0]
    for _ in download:
        pass
    captured = capsys.readouterr()
    logs = caplog.text + captured.out + captured.err  # Airflow 3 logs hooks through structlog (stdout)
    assert "retry" in logs.lower()  # the retries were logged...
    assert "/files/" in logs  # ...and so was the storage request (urllib3 debug line)...
    texts = [logs, str(err.value), repr(err.value), repr(hook.transport.settings), repr(hook.transport)]
    for text in texts:  # ...and none of this carries a secret
        assert server.api_key not in text
        assert signature not in text


def test_test_connection(server: ModelRouteServer, dialect: Dialect, monkeypatch: pytest.MonkeyPatch) -> None:
    ok, message = ModelRouteHook().test_connection()  # the unknown probe id: a 404, with a body or bare
    assert ok, message
    use_connection(monkeypatch, server, fields={"password": spec.make_api_key()})
    ok, message = ModelRouteHook("mr").test_connection()
    assert not ok and "UNAUTHORIZED" in message and "API key" in message
    use_connection(monkeypatch, server, fields={"password": "sk_nope"})
    ok, message = ModelRouteHook("mr").test_connection()
    assert not ok and "API key" in message
    assert "'mr'" not in message  # never the UI Test button's temporary connection id


# --- async twin --------------------------------------------------------------------------------


def test_async_hook_reads_retries_and_cancels(server: ModelRouteServer) -> None:
    hook = ModelRouteHook()
    created = hook.create_execution("test-image", {"prompt": "a", "_simulate": {"seconds": 30}})
    server.add_fault("GET /v1/executions/{id}", "error", count=2, code="MODEL_OVERLOADED")

    async def run() -> tuple[dict, dict | None]:
        async with ModelRouteAsyncHook() as client:
            doc = await client.get_execution(created["id"])
            return doc, await client.cancel_execution(created["id"])

    doc, cancelled = asyncio.run(run())
    assert doc["status"] in ("PENDING", "PROCESSING")
    assert cancelled is not None and cancelled["status"] == "CANCELLED"
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == 3


def test_async_hook_raises_the_same_error_model(server: ModelRouteServer) -> None:
    async def run() -> None:
        async with ModelRouteAsyncHook() as client:
            await client.get_execution("exec_00000000-0000-0000-0000-00000000abcd")

    with pytest.raises(ModelRoutePermanentError):
        asyncio.run(run())


@pytest.mark.parametrize("wrapper", [None, "data", "endpoints", "items", "webhooks"])
def test_webhook_endpoints_are_listed_from_a_bare_or_a_wrapped_list(
    monkeypatch: pytest.MonkeyPatch, wrapper: str | None
) -> None:
    """The docs show no shape for ``GET /v1/webhooks/endpoints``: a bare list and the usual wrappers
    are read alike, from a server that is not the local one."""
    import http.server
    import threading

    endpoints = [{"id": "wh_1", "url": "https://example.com/hook", "is_active": True}]
    body = json.dumps(endpoints if wrapper is None else {wrapper: endpoints, "has_more": False}).encode()
    paths: list[str] = []

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # quiet
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer) as answerer:
        threading.Thread(target=answerer.serve_forever, daemon=True).start()
        conn = {"conn_type": "modelroute", "host": f"http://127.0.0.1:{answerer.server_port}"}
        conn["password"] = spec.make_api_key()
        monkeypatch.setenv("AIRFLOW_CONN_MR_OTHER", json.dumps(conn))
        try:
            assert ModelRouteHook("mr_other").list_webhook_endpoints() == endpoints
        finally:
            answerer.shutdown()
    assert paths == ["/v1/webhooks/endpoints"]
