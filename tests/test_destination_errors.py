"""Destination storage errors: named by URI and connection, checked before downloading, not retried."""

from __future__ import annotations

from datetime import timedelta

import pytest

from airflow_provider_modelroute.testing import ModelRouteServer
from tests.conftest import S3Bucket, task_instance
from tests.test_transfer import produce, run_tasks

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_missing_bucket_fails_at_once_before_downloading(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    s3_bucket: S3Bucket,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, (file_id,) = produce(server, "test-image", prompt="a lighthouse")
    missing = f"{s3_bucket.name}-missing"
    dr = run_tasks(
        request,
        {
            "task_id": "copy",
            "source_file_id": file_id,
            "destination": f"s3://{missing}/images/",
            "destination_conn_id": s3_bucket.conn_id,
            "retries": 2,
            "retry_delay": timedelta(0),
        },
    )
    assert dr.state == "failed"
    ti = task_instance(dr, "copy")
    assert ti.state == "failed" and ti.try_number == 1  # no retry: a retry would not create the bucket
    logs = capsys.readouterr().out
    assert (
        f"Cannot write to destination s3://{missing}/images (through destination_conn_id='aws_moto')" in logs
    )
    assert "Create the bucket (or container) or fix the destination URL" in logs
    assert "ModelRouteConfigError" in logs  # fails at once
    requests = server.stats()["requests"]
    assert "GET /v1/files/{file_id}/url" not in requests and "GET /files/{file_id}" not in requests
