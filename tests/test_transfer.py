"""ModelRouteToStorageOperator and StorageToModelRouteOperator in real DAG runs (dag.test).

Everything is real: the local ModelRoute server (with injected faults), the local filesystem,
fsspec's memory filesystem and S3 on a loopback moto server reached through the Amazon provider.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modelroute import api
from airflow_provider_modelroute.exceptions import ModelRouteConfigError
from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.testing import ModelRouteServer, content
from airflow_provider_modelroute.testing.dialects import Dialect
from airflow_provider_modelroute.transfers.modelroute import (
    ModelRouteToStorageOperator,
    StorageToModelRouteOperator,
)
from airflow_provider_modelroute.version_compat import AirflowFailException
from tests.conftest import (
    S3Bucket,
    attach_filesystem,
    connection_json,
    make_dag,
    memory_uri,
    run_dag,
    task_instance,
    task_states,
    xcom,
)

pytestmark = pytest.mark.usefixtures("airflow_db")

MiB = 1024 * 1024
RECORD_KEYS = {"file_id", "uri", "size_bytes", "content_type", "sha256"}
STORAGE = "GET /files/{file_id}"
DOWNLOAD = "GET /v1/files/{file_id}/download"


# --- helpers -------------------------------------------------------------------------------------


def produce(server: ModelRouteServer, model: str, **input: Any) -> tuple[str, list[str]]:
    """Create a COMPLETED execution at once; return its id and its file ids."""
    execution = ModelRouteHook().create_execution(model, input)
    document = server.set_execution_status(execution["id"], "COMPLETED")
    return execution["id"], [f["file_id"] for f in api.result_files(document)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def file_bytes(file_id: str) -> bytes:
    return b"".join(ModelRouteHook().download_file(file_id))


def run_tasks(request: pytest.FixtureRequest, *tasks: dict[str, Any]) -> Any:
    """One DAG of independent copy tasks (each dict: task_id plus operator arguments)."""
    with make_dag(request.node.name) as dag:
        for task in tasks:
            ModelRouteToStorageOperator(**task)
    return run_dag(dag)


def hidden_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob(".*")] if directory.exists() else []


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert "Signature" not in text
        assert "X-Amz-" not in text


@pytest.fixture
def memory_root() -> Iterator[tuple[Any, str]]:
    """fsspec's memory filesystem attached for ``memory://``, and a fresh root folder in it."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    attach_filesystem("memory", fs)  # airflow.sdk.io on 3.x, airflow.io.store on 2.11
    root = f"/t-{uuid.uuid4().hex[:10]}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


# --- construction -------------------------------------------------------------------------------


def test_bad_arguments_are_refused_when_the_dag_is_parsed() -> None:
    for sources in ({}, {"source_file_id": "file_a", "execution_id": "exec_b"}):
        with pytest.raises(ModelRouteConfigError, match=r"source_file_id.*execution_id") as caught:
            ModelRouteToStorageOperator(task_id="t", destination="file:///tmp/x/", **sources)
        assert isinstance(caught.value, AirflowFailException)
    with pytest.raises(ModelRouteConfigError, match="overwrite must be one of 'fail', 'replace', 'skip_if"):
        ModelRouteToStorageOperator(task_id="t", destination="s3://b/", source_file_id="f", overwrite="yes")
    with pytest.raises(ModelRouteConfigError, match="chunk_size must be a positive"):
        ModelRouteToStorageOperator(task_id="t", destination="s3://b/", source_file_id="f", chunk_size=0)
    with pytest.raises(ModelRouteConfigError, match="destination must be an object storage URL"):
        ModelRouteToStorageOperator(task_id="t", destination="", source_file_id="f")
    with pytest.raises(ModelRouteConfigError, match="source must be an object storage URL"):
        StorageToModelRouteOperator(task_id="t", source="")
    # Templated values are only checked when the task runs.
    op = ModelRouteToStorageOperator(
        task_id="t", destination="{{ var.value.out }}", source_file_id="{{ ti.xcom_pull('x') }}"
    )
    assert set(op.template_fields) == {"source_file_id", "execution_id", "destination", "destination_conn_id"}
    assert set(StorageToModelRouteOperator.template_fields) == {
        "source",
        "source_conn_id",
        "filename",
        "content_type",
    }


# --- destinations -------------------------------------------------------------------------------


def test_copy_to_local_folder_and_file_name(
    server: ModelRouteServer, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    _, (png_id,) = produce(server, "test-image", prompt="a red fox")
    _, (bin_id,) = produce(server, "test-file", size_bytes=3 * MiB + 17)
    (tmp_path / "existing").mkdir()
    dr = run_tasks(
        request,
        {"task_id": "to_folder", "source_file_id": png_id, "destination": f"file://{tmp_path}/new/"},
        {"task_id": "to_name", "source_file_id": bin_id, "destination": f"file://{tmp_path}/named/data.raw"},
        {"task_id": "to_dir", "source_file_id": bin_id, "destination": f"file://{tmp_path}/existing"},
    )
    assert dr.state == "success"
    assert task_states(dr) == {"to_folder": "success", "to_name": "success", "to_dir": "success"}

    png_path = tmp_path / "new" / f"{png_id}.png"  # a folder: {file_id}.{ext from content type}
    bin_path = tmp_path / "named" / "data.raw"  # a file name: used as is
    dir_path = tmp_path / "existing" / f"{bin_id}.bin"  # an existing directory is a folder
    png, big = server.file_info(png_id), server.file_info(bin_id)
    assert xcom(dr, "to_folder") == [
        {
            "file_id": png_id,
            "uri": f"file://{png_path}",
            "size_bytes": png["size_bytes"],
            "content_type": "image/png",
            "sha256": png["sha256"],
        }
    ]
    assert xcom(dr, "to_name") == [
        {
            "file_id": bin_id,
            "uri": f"file://{bin_path}",
            "size_bytes": 3 * MiB + 17,
            "content_type": "application/octet-stream",
            "sha256": big["sha256"],
        }
    ]
    assert xcom(dr, "to_dir")[0]["uri"] == f"file://{dir_path}"
    assert file_sha256(png_path) == png["sha256"]
    assert file_sha256(bin_path) == file_sha256(dir_path) == big["sha256"]
    assert hidden_leftovers(tmp_path) == []


def test_copy_to_memory(
    server: ModelRouteServer, request: pytest.FixtureRequest, memory_root: tuple[Any, str]
) -> None:
    fs, root = memory_root
    _, (file_id,) = produce(server, "test-file", size_bytes=2 * MiB + 3)
    dr = run_tasks(
        request,
        {
            "task_id": "copy",
            "source_file_id": file_id,
            "destination": f"memory://{root}/out/",
            "chunk_size": 256 * 1024,
        },
    )
    assert dr.state == "success"
    assert task_states(dr) == {"copy": "success"}
    info = server.file_info(file_id)
    (record,) = xcom(dr, "copy")
    assert record == {
        "file_id": file_id,
        "uri": memory_uri(f"{root}/out/{file_id}.bin"),
        "size_bytes": info["size_bytes"],
        "content_type": "application/octet-stream",
        "sha256": info["sha256"],
    }
    assert fs.ls(f"{root}/out", detail=False) == [f"{root}/out/{file_id}.bin"]  # no staged leftovers
    assert sha256(fs.cat_file(f"{root}/out/{file_id}.bin")) == info["sha256"]


def test_copy_to_s3(server: ModelRouteServer, request: pytest.FixtureRequest, s3_bucket: S3Bucket) -> None:
    _, (big_id,) = produce(server, "test-file", size_bytes=11 * MiB + 5)  # multipart: 8 MiB parts
    _, (png_id,) = produce(server, "test-image", prompt="a lighthouse")
    dr = run_tasks(
        request,
        {
            "task_id": "to_prefix",
            "source_file_id": big_id,
            "destination": f"s3://{s3_bucket.name}/results/",
            "destination_conn_id": s3_bucket.conn_id,
        },
        {
            "task_id": "to_key",
            "source_file_id": png_id,
            "destination": f"s3://{s3_bucket.name}/named/lighthouse.png",
            "destination_conn_id": s3_bucket.conn_id,
        },
    )
    assert dr.state == "success"
    assert task_states(dr) == {"to_prefix": "success", "to_key": "success"}
    big, png = server.file_info(big_id), server.file_info(png_id)
    assert xcom(dr, "to_prefix") == [
        {
            "file_id": big_id,
            "uri": f"s3://{s3_bucket.name}/results/{big_id}.bin",
            "size_bytes": 11 * MiB + 5,
            "content_type": "application/octet-stream",
            "sha256": big["sha256"],
        }
    ]
    assert xcom(dr, "to_key")[0]["uri"] == f"s3://{s3_bucket.name}/named/lighthouse.png"
    assert xcom(dr, "to_key")[0]["sha256"] == png["sha256"]
    assert s3_bucket.keys() == ["named/lighthouse.png", f"results/{big_id}.bin"]
    assert sha256(s3_bucket.read(f"results/{big_id}.bin")) == big["sha256"]
    assert sha256(s3_bucket.read("named/lighthouse.png")) == png["sha256"]
    assert s3_bucket.pending_uploads() == []


def test_copy_every_file_of_an_execution(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pull = "{{ ti.xcom_pull(task_ids='generate', key='execution_id') }}"
    with make_dag(request.node.name) as dag:
        generate = ModelRouteExecuteOperator(
            task_id="generate",
            model="test-multi",
            input={"prompt": "three cats", "count": 3},
            poll_interval=0.05,
            deferrable=False,
        )
        to_folder = ModelRouteToStorageOperator(
            task_id="to_folder", execution_id=pull, destination=f"file://{tmp_path}/{{{{ ds_nodash }}}}/"
        )
        to_one_name = ModelRouteToStorageOperator(
            task_id="to_one_name", execution_id=pull, destination=f"file://{tmp_path}/single/cat.png"
        )
        generate >> [to_folder, to_one_name]
    dr = run_dag(dag)
    assert dr.state == "failed"
    assert task_states(dr) == {"generate": "success", "to_folder": "success", "to_one_name": "failed"}
    assert "names a single file, but there are 3 files to copy" in capsys.readouterr().out
    assert task_instance(dr, "to_one_name").try_number == 1

    file_ids = [f["file_id"] for f in xcom(dr, "generate")["files"]]
    records = xcom(dr, "to_folder")
    assert [r["file_id"] for r in records] == file_ids and len(file_ids) == 3
    (folder,) = [p for p in tmp_path.iterdir() if p.name != "single"]  # the templated folder
    for record in records:
        assert set(record) == RECORD_KEYS
        info = server.file_info(record["file_id"])
        assert record["sha256"] == info["sha256"] and record["size_bytes"] == info["size_bytes"]
        path = folder / f"{record['file_id']}.png"
        assert record["uri"] == f"file://{path}" and file_sha256(path) == info["sha256"]
    assert not (tmp_path / "single").exists()  # the refused copy wrote nothing


def test_executions_without_files_fail_clearly(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hook = ModelRouteHook()
    running = hook.create_execution("test-image", {"prompt": "slow", "_simulate": {"seconds": 3600}})["id"]
    failed = hook.create_execution("test-image", {"prompt": "x", "_simulate": {"outcome": "FAILED"}})["id"]
    server.set_execution_status(failed, "FAILED", "GENERATION_FAILED")
    out = f"file://{tmp_path}/out/"
    dr = run_tasks(
        request,
        {"task_id": "running", "execution_id": running, "destination": out},
        {"task_id": "failed", "execution_id": failed, "destination": out, "retries": 2},
    )
    assert dr.state == "failed"
    assert task_states(dr) == {"running": "failed", "failed": "failed"}
    assert task_instance(dr, "failed").try_number == 1  # a FAILED execution never gets files: no retry
    logs = capsys.readouterr().out
    # still PENDING or already PROCESSING, by how fast this Airflow starts the task (2.11 is quick)
    assert any(f"Execution {running} is {s}, not COMPLETED" in logs for s in ("PENDING", "PROCESSING"))
    assert f"ModelRoute execution {failed} ended FAILED. GENERATION_FAILED" in logs
    assert not (tmp_path / "out").exists()


# --- overwrite ----------------------------------------------------------------------------------


def test_overwrite_modes(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, (file_id,) = produce(server, "test-file", size_bytes=MiB + 1)
    multi_id, multi_files = produce(server, "test-multi", prompt="two", count=2)
    data, info = file_bytes(file_id), server.file_info(file_id)
    old = 1_000_000_000

    def existing(name: str, payload: bytes) -> Path:
        path = tmp_path / name / f"{file_id}.bin"
        path.parent.mkdir()
        path.write_bytes(payload)
        os.utime(path, (old, old))
        return path

    fail = existing("fail", b"keep me")
    fail_identical = existing("fail_identical", data)
    replace = existing("replace", b"old bytes")
    identical = existing("identical", data)
    same_size = existing("same_size", b"\0" * len(data))
    # A multi-file copy checks every target before copying any byte.
    (tmp_path / "multi").mkdir()
    (tmp_path / "multi" / f"{multi_files[1]}.png").write_bytes(b"taken")

    def task(name: str, mode: str, **kw: Any) -> dict[str, Any]:
        args = {"source_file_id": file_id, "destination": f"file://{tmp_path}/{name}/"}
        return {"task_id": name, "overwrite": mode, "retries": 2, **args, **kw}

    dr = run_tasks(
        request,
        task("fail", "fail"),
        task("fail_identical", "fail"),
        task("replace", "replace"),
        task("identical", "skip_if_identical"),
        task("same_size", "skip_if_identical"),
        task("multi", "fail", source_file_id=None, execution_id=multi_id),
    )
    assert dr.state == "failed"
    assert task_states(dr) == {
        "fail": "failed",
        "fail_identical": "success",
        "replace": "success",
        "identical": "success",
        "same_size": "success",
        "multi": "failed",
    }
    assert task_instance(dr, "fail").try_number == 1  # exists + "fail": no retry loop
    assert "already exists and overwrite='fail'" in capsys.readouterr().out
    assert fail.read_bytes() == b"keep me"
    assert file_sha256(replace) == file_sha256(same_size) == info["sha256"]
    assert os.stat(identical).st_mtime == os.stat(fail_identical).st_mtime == old  # left untouched
    assert os.stat(same_size).st_mtime != old  # same size, other bytes: replaced
    for name in ("fail_identical", "replace", "identical", "same_size"):
        assert xcom(dr, name) == [
            {
                "file_id": file_id,
                "uri": f"file://{tmp_path}/{name}/{file_id}.bin",
                "size_bytes": MiB + 1,
                "content_type": "application/octet-stream",
                "sha256": info["sha256"],
            }
        ]
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == [f"{multi_files[1]}.png"]
    assert hidden_leftovers(tmp_path) == []


def test_a_retry_finishes_a_multi_file_copy_with_the_default_overwrite(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server.dialect = "presigned"  # the bytes come from presigned URLs
    execution_id, file_ids = produce(server, "test-multi", prompt="two", count=2)
    server.add_fault(STORAGE, "slow", count=1, seconds=0)  # the first file arrives...
    server.add_fault(STORAGE, "truncate", count=5, after_bytes=0)  # ...the second fails the first try
    dr = run_tasks(
        request,
        {
            "task_id": "copy",
            "execution_id": execution_id,
            "destination": f"file://{tmp_path}/",
            "retries": 1,
            "retry_delay": timedelta(0),
        },
    )
    assert dr.state == "success"
    assert task_states(dr) == {"copy": "success"}
    assert task_instance(dr, "copy").try_number == 2
    logs = capsys.readouterr().out
    assert "stopped at byte 0" in logs  # try 1 failed on the second file...
    assert f"already holds file {file_ids[0]} (same size and sha256)" in logs  # ...try 2 kept the first
    assert server.stats()["requests"][STORAGE] == 5 + 1 + 2
    records = xcom(dr, "copy")
    assert [r["file_id"] for r in records] == file_ids
    for record in records:
        info = server.file_info(record["file_id"])
        assert record["sha256"] == info["sha256"] == file_sha256(tmp_path / f"{record['file_id']}.png")
    assert hidden_leftovers(tmp_path) == []


# --- faults -------------------------------------------------------------------------------------


def test_download_faults_are_survived_and_never_leak_the_url(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3's debug lines quote request URLs
    server.dialect = "presigned"  # the bytes come from a presigned URL, which can expire
    _, (file_id,) = produce(server, "test-file", size_bytes=3 * MiB + 1)
    server.add_fault(STORAGE, "truncate", count=2, after_bytes=700_000)
    server.add_fault(STORAGE, "drop", count=2)
    server.add_fault(STORAGE, "expire_url", count=1)
    dr = run_tasks(
        request,
        {
            "task_id": "copy",
            "source_file_id": file_id,
            "destination": f"file://{tmp_path}/out.bin",
            "chunk_size": 256 * 1024,
        },
    )
    assert dr.state == "success"
    assert task_states(dr) == {"copy": "success"}
    info = server.file_info(file_id)
    (record,) = xcom(dr, "copy")
    assert record["sha256"] == info["sha256"] == file_sha256(tmp_path / "out.bin")
    assert record["size_bytes"] == info["size_bytes"]
    stats = server.stats()
    assert stats["faults_fired"] == 5
    assert stats["requests"][DOWNLOAD] == 2  # the expired URL was replaced once
    assert stats["requests"][STORAGE] == 6
    assert stats["storage_requests_with_authorization"] == 0
    logs = capsys.readouterr()
    assert "resuming" in logs.out  # the faults really happened, and were logged...
    assert_no_secret(logs.out, logs.err, caplog.text, json.dumps(record))  # ...without the signature
    assert_no_secret(*(str(r.args) for r in caplog.records))
    assert hidden_leftovers(tmp_path) == []


def partial_then_stuck(server: ModelRouteServer, after_bytes: int) -> None:
    """The first response breaks after ``after_bytes``; every resume after it breaks at once."""
    serving = DOWNLOAD if server.dialect.download == "bytes" else STORAGE
    server.add_fault(serving, "truncate", count=1, after_bytes=after_bytes)
    server.add_fault(serving, "truncate", count=None, after_bytes=0)


def test_persistent_truncation_leaves_nothing_locally(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    dialect: Dialect,
) -> None:
    _, (file_id,) = produce(server, "test-file", size_bytes=4 * MiB)
    partial_then_stuck(server, 2 * MiB + 100)
    dr = run_tasks(
        request,
        {"task_id": "to_folder", "source_file_id": file_id, "destination": f"file://{tmp_path}/out/"},
        {
            "task_id": "to_name",
            "source_file_id": file_id,
            "destination": f"file://{tmp_path}/named.bin",
            "chunk_size": MiB,
        },
    )
    assert dr.state == "failed"
    assert task_states(dr) == {"to_folder": "failed", "to_name": "failed"}
    assert "stopped at byte" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out"]  # no file, no hidden partial
    assert server.stats()["bytes_served"] >= 2 * MiB  # bytes were written before the failure


def test_persistent_truncation_leaves_nothing_on_s3(
    server: ModelRouteServer, request: pytest.FixtureRequest, s3_bucket: S3Bucket
) -> None:
    _, (file_id,) = produce(server, "test-file", size_bytes=12 * MiB)
    partial_then_stuck(server, 7 * MiB)  # > one 5 MiB part: a multipart upload is under way
    dr = run_tasks(
        request,
        {
            "task_id": "copy",
            "source_file_id": file_id,
            "destination": f"s3://{s3_bucket.name}/out/{file_id}.bin",
            "destination_conn_id": s3_bucket.conn_id,
            "chunk_size": MiB,
        },
    )
    assert dr.state == "failed"
    assert task_states(dr) == {"copy": "failed"}
    assert s3_bucket.keys() == []
    assert s3_bucket.pending_uploads() == []  # the multipart upload was aborted


def test_replace_keeps_the_old_object_when_the_copy_fails(
    server: ModelRouteServer, request: pytest.FixtureRequest, tmp_path: Path, memory_root: tuple[Any, str]
) -> None:
    fs, root = memory_root
    _, (file_id,) = produce(server, "test-file", size_bytes=2 * MiB)
    (tmp_path / "out.bin").write_bytes(b"previous")
    fs.pipe_file(f"{root}/out.bin", b"previous")
    partial_then_stuck(server, MiB + 10)
    dr = run_tasks(
        request,
        *(
            {
                "task_id": task_id,
                "source_file_id": file_id,
                "destination": destination,
                "overwrite": "replace",
                "chunk_size": 256 * 1024,
            }
            for task_id, destination in (
                ("local", f"file://{tmp_path}/out.bin"),
                ("memory", f"memory://{root}/out.bin"),
            )
        ),
    )
    assert task_states(dr) == {"local": "failed", "memory": "failed"}
    assert (tmp_path / "out.bin").read_bytes() == b"previous"
    assert fs.cat_file(f"{root}/out.bin") == b"previous"
    assert fs.ls(root, detail=False) == [f"{root}/out.bin"]
    assert hidden_leftovers(tmp_path) == []


def test_unknown_file_fails_and_writes_nothing(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dr = run_tasks(
        request,
        {
            "task_id": "copy",
            "source_file_id": "file_00000000-0000-0000-0000-000000000000",
            "destination": f"file://{tmp_path}/out/",
        },
    )
    assert dr.state == "failed"
    assert task_states(dr) == {"copy": "failed"}
    assert "FILE_NOT_FOUND" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_unauthorized_fails_at_once_naming_the_api_key(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, (file_id,) = produce(server, "test-image", prompt="x")
    server.add_fault(DOWNLOAD, "error", count=None, code="UNAUTHORIZED")
    dr = run_tasks(
        request,
        {
            "task_id": "copy",
            "source_file_id": file_id,
            "destination": f"file://{tmp_path}/out/",
            "retries": 3,
        },
    )
    assert dr.state == "failed"
    assert task_states(dr) == {"copy": "failed"}
    assert task_instance(dr, "copy").try_number == 1  # AirflowFailException: no task retry
    assert server.stats()["requests"][DOWNLOAD] == 1  # and no HTTP retry
    logs = capsys.readouterr().out
    assert "UNAUTHORIZED" in logs and "API key" in logs
    assert list(tmp_path.iterdir()) == []


# --- memory bound -------------------------------------------------------------------------------

_BOUNDED_COPY = textwrap.dedent(
    """
    import json, resource, sys
    from airflow_provider_modelroute.transfers.modelroute import ModelRouteToStorageOperator

    op = ModelRouteToStorageOperator(task_id="copy", source_file_id=sys.argv[1], destination=sys.argv[2])
    op.hook.transport  # connection looked up, clients built: only the copy itself is measured
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    records = op.transfer()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kib": after - before, "records": records}))
    """
)


def test_150_mb_copy_runs_in_bounded_memory(server: ModelRouteServer, tmp_path: Path) -> None:
    size = api.MAX_FILE_SIZE  # 150 MiB
    _, (file_id,) = produce(server, "test-file", size_bytes=size)
    env = {**os.environ, "AIRFLOW_CONN_MODELROUTE_DEFAULT": connection_json(server)}
    done = subprocess.run(
        [sys.executable, "-c", _BOUNDED_COPY, file_id, f"file://{tmp_path}/"],
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    (record,) = result["records"]
    path = tmp_path / f"{file_id}.bin"
    assert record["size_bytes"] == size == path.stat().st_size
    assert record["sha256"] == server.file_info(file_id)["sha256"] == file_sha256(path)
    assert result["growth_kib"] < 100 * 1024, f"peak RSS grew {result['growth_kib'] / 1024:.0f} MiB"
    assert_no_secret(done.stdout, done.stderr)


_FULL_DISK_COPY = textwrap.dedent(
    """
    import json, resource, signal, sys
    from airflow_provider_modelroute.transfers.modelroute import ModelRouteToStorageOperator

    op = ModelRouteToStorageOperator(task_id="copy", source_file_id=sys.argv[1], destination=sys.argv[2])
    op.hook.transport
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
    try:
        op.transfer()
    except Exception as exc:  # the OSError itself, or the storage error that names the destination
        print(json.dumps({"errno": getattr(exc, "errno", None) or getattr(exc.__cause__, "errno", None)}))
    """
)


def test_a_failed_local_write_fails_the_copy_and_leaves_nothing(
    server: ModelRouteServer, tmp_path: Path
) -> None:
    """A failed write (here: a file size limit, as a full disk would) in the writer thread fails the copy."""
    _, (file_id,) = produce(server, "test-file", size_bytes=8 * MiB)
    env = {**os.environ, "AIRFLOW_CONN_MODELROUTE_DEFAULT": connection_json(server)}
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_COPY, file_id, f"file://{tmp_path}/out/", str(3 * MiB)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"errno": errno.EFBIG}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out"]  # no file, no hidden partial


# --- upload -------------------------------------------------------------------------------------


def test_upload_then_use_as_execution_input(
    server: ModelRouteServer, request: pytest.FixtureRequest, tmp_path: Path, memory_root: tuple[Any, str]
) -> None:
    fs, root = memory_root
    png = content.png_from_prompt("input photo", 32, 32)
    (tmp_path / "photo.png").write_bytes(png)
    fs.pipe_file(f"{root}/in/scan.data", png)
    with make_dag(request.node.name) as dag:
        upload = StorageToModelRouteOperator(task_id="upload", source=f"file://{tmp_path}/photo.png")
        generate = ModelRouteExecuteOperator(
            task_id="generate",
            model="test-image",
            input={"prompt": "x", "image": "{{ ti.xcom_pull(task_ids='upload') }}"},
            wait_for_completion=True,
            deferrable=False,
            poll_interval=0.05,
        )
        upload >> generate
        StorageToModelRouteOperator(
            task_id="upload_memory",
            source=f"memory://{root}/in/scan.data",
            filename="scan.png",
            content_type="image/png",
        )
    dr = run_dag(dag)
    assert dr.state == "success"
    assert task_states(dr) == {"upload": "success", "generate": "success", "upload_memory": "success"}

    file_id = xcom(dr, "upload")
    assert isinstance(file_id, str) and file_id.startswith("file_")
    assert xcom(dr, "upload", "file") == {
        "file_id": file_id,
        "content_type": "image/png",  # guessed from the name
        "size_bytes": len(png),
        "filename": "photo.png",
        "source": f"file://{tmp_path}/photo.png",
    }
    assert server.file_info(file_id)["sha256"] == sha256(png)
    execution_id = xcom(dr, "generate", "execution_id")
    assert server.execution(execution_id)["input"]["image"] == file_id
    assert xcom(dr, "generate")["status"] == "COMPLETED"

    memory_record = xcom(dr, "upload_memory", "file")
    assert memory_record["filename"] == "scan.png" and memory_record["content_type"] == "image/png"
    assert server.file_info(xcom(dr, "upload_memory"))["sha256"] == sha256(png)


def test_unopenable_urls_fail_at_once_before_any_request(server: ModelRouteServer) -> None:
    copy = ModelRouteToStorageOperator(
        task_id="copy", source_file_id="file_1", destination="nosuch://user:pw@bucket/out/"
    )
    upload = StorageToModelRouteOperator(task_id="upload", source="nosuch://bucket/in.png")
    for run, field in ((copy.transfer, "destination"), (upload.upload, "source")):
        with pytest.raises(
            ModelRouteConfigError, match=f"{field} 'nosuch://bucket/.*' cannot be opened"
        ) as err:
            run()
        assert isinstance(err.value, AirflowFailException)  # a retry would fail the same way
        assert "pw" not in str(err.value)
    assert server.stats()["requests"] == {}


def test_upload_of_a_missing_source_fails(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with make_dag(request.node.name) as dag:
        StorageToModelRouteOperator(task_id="upload", source=f"file://{tmp_path}/missing.png")
    dr = run_dag(dag)
    assert dr.state == "failed"
    assert task_states(dr) == {"upload": "failed"}
    assert "missing.png does not exist" in capsys.readouterr().out
    assert server.stats()["requests"].get("POST /v1/files/upload", 0) == 0


def test_upload_refused_by_the_api_fails_at_once(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "in.png").write_bytes(content.png_from_prompt("x", 4, 4))
    server.add_fault("POST /v1/files/upload", "error", count=None, code="INSUFFICIENT_BALANCE")
    with make_dag(request.node.name) as dag:
        StorageToModelRouteOperator(task_id="upload", source=f"file://{tmp_path}/in.png", retries=2)
    dr = run_dag(dag)
    assert task_states(dr) == {"upload": "failed"}
    assert task_instance(dr, "upload").try_number == 1  # no retry can top up the balance
    assert "INSUFFICIENT_BALANCE" in capsys.readouterr().out
    assert server.stats()["requests"]["POST /v1/files/upload"] == 1


@pytest.mark.parametrize("reading", ["literal", "presigned", "sync"])  # confirm: required, 404, 405
def test_upload_options_and_confirm_readings(server: ModelRouteServer, tmp_path: Path, reading: str) -> None:
    server.dialect = reading
    png = content.png_from_prompt("y", 4, 4)
    (tmp_path / "in.png").write_bytes(png)
    upload = StorageToModelRouteOperator(
        task_id="upload", source=f"file://{tmp_path}/in.png", purpose="UPLOAD", region="APAC", ttl_days=30
    )
    record = upload.upload()
    info = server.file_info(record["file_id"])
    assert info["sha256"] == sha256(png)
    assert info["upload"] == {
        "content_type": "image/png",
        "purpose": "UPLOAD",
        "region": "APAC",
        "ttl_days": 30,
    }
    assert server.stats()["requests"]["POST /v1/files/confirm"] == 1  # asked once, never "upload again"
    assert server.stats()["requests"]["PUT /files/{file_id}"] == 1
    created = ModelRouteHook().create_execution("test-image", {"prompt": "x", "image": record["file_id"]})
    assert created["status"] in ("PENDING", "COMPLETED")  # the file is usable in every reading


def test_upload_options_are_checked_when_the_dag_is_parsed() -> None:
    for options, field in (
        ({"purpose": "OUTPUT"}, "purpose"),
        ({"region": "MARS"}, "region"),
        ({"ttl_days": 0}, "ttl_days"),
        ({"ttl_days": 366}, "ttl_days"),
    ):
        with pytest.raises(ModelRouteConfigError, match=field):
            StorageToModelRouteOperator(task_id="upload", source="file:///x.png", **options)
