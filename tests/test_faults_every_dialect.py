"""The core transfer and retry fault tests, against every dialect the local server plays."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
from airflow_provider_modelroute.testing import ModelRouteServer, content
from airflow_provider_modelroute.testing.dialects import Dialect
from airflow_provider_modelroute.transfers.modelroute import StorageToModelRouteOperator
from tests.conftest import task_states, xcom
from tests.test_transfer import (
    DOWNLOAD,
    STORAGE,
    file_sha256,
    hidden_leftovers,
    produce,
    run_tasks,
    sha256,
)

pytestmark = pytest.mark.usefixtures("airflow_db")

MiB = 1024 * 1024
POLL = "GET /v1/executions/{id}"
SUBMIT = "POST /v1/executions"
PUT = "PUT /files/{file_id}"


def serving_route(dialect: Dialect) -> str:
    """The route whose answer carries a file's bytes: ``/download`` itself, or the storage host."""
    return DOWNLOAD if dialect.download == "bytes" else STORAGE


def test_download_faults_are_survived(
    server: ModelRouteServer, request: pytest.FixtureRequest, tmp_path: Path, dialect: Dialect
) -> None:
    _, (file_id,) = produce(server, "test-file", size_bytes=3 * MiB + 1)
    serving = serving_route(dialect)
    server.add_fault(serving, "truncate", count=2, after_bytes=700_000)
    server.add_fault(serving, "drop", count=1)
    dr = run_tasks(
        request,
        {"task_id": "copy", "source_file_id": file_id, "destination": f"file://{tmp_path}/out.bin"},
    )
    assert task_states(dr) == {"copy": "success"}
    (record,) = xcom(dr, "copy")
    assert record["sha256"] == server.file_info(file_id)["sha256"] == file_sha256(tmp_path / "out.bin")
    stats = server.stats()
    assert stats["faults_fired"] == 3
    assert stats["requests"][serving] == 4  # each fault cost one request, then it finished
    assert stats["storage_requests_with_authorization"] == 0
    assert hidden_leftovers(tmp_path) == []


def test_an_expired_url_is_replaced_once(
    server: ModelRouteServer, request: pytest.FixtureRequest, dialect: Dialect
) -> None:
    if dialect.download == "bytes":
        pytest.skip("the bytes reading serves no presigned URL")
    _, (file_id,) = produce(server, "flux-1.1-pro", prompt="p")
    server.add_fault(STORAGE, "expire_url", count=1)
    data = b"".join(ModelRouteHook().download_file(file_id))
    assert sha256(data) == server.file_info(file_id)["sha256"]
    assert server.stats()["requests"][DOWNLOAD] == 2
    assert server.stats()["requests"][STORAGE] == 2


def test_poll_faults_are_retried(server: ModelRouteServer, dialect: Dialect) -> None:
    hook = ModelRouteHook()
    created = hook.create_execution("test-image", {"prompt": "p", "_simulate": {"seconds": 30}})
    server.add_fault(POLL, "error", count=2, code="MODEL_OVERLOADED")
    server.add_fault(POLL, "rate_limit", count=1, retry_after=0)
    server.add_fault(POLL, "drop", count=1)
    assert hook.get_execution(created["id"])["id"] == created["id"]
    assert server.stats()["requests"][POLL] == 5


def test_a_lost_submit_answer_runs_once(server: ModelRouteServer, dialect: Dialect) -> None:
    server.add_fault(SUBMIT, "drop", count=1)  # the execution exists; its answer is lost
    created = ModelRouteHook().create_execution("test-image", {"prompt": "p"})
    stats = server.stats()
    assert stats["requests"][SUBMIT] == 2  # retried with the same key...
    assert stats["executions_created"] == 1  # ...which did not start a second execution
    assert stats["idempotent_replays"] == 1
    assert server.execution_ids() == [created["id"]]


def test_upload_faults_are_retried(server: ModelRouteServer, tmp_path: Path, dialect: Dialect) -> None:
    png = content.png_from_prompt("upload", 8, 8)
    (tmp_path / "in.png").write_bytes(png)
    server.add_fault("POST /v1/files/upload", "error", count=1, code="SERVICE_UNAVAILABLE")
    server.add_fault(PUT, "error", count=1)  # the storage host's 503 SlowDown
    record = StorageToModelRouteOperator(task_id="upload", source=f"file://{tmp_path}/in.png").upload()
    assert server.file_info(record["file_id"])["sha256"] == sha256(png)
    requests = server.stats()["requests"]
    assert requests["POST /v1/files/upload"] == 2
    assert requests[PUT] == 2
    created = ModelRouteHook().create_execution("test-image", {"prompt": "x", "image": record["file_id"]})
    assert created["status"] in ("PENDING", "COMPLETED")
