"""Asset drills on a real Airflow (scheduler, triggerer, dag-processor, api-server with the receiver).

    .venv/bin/python -m pytest tests/drills/test_asset_drills.py -m drill -q -s

The example DAGs of ``example_modelroute_assets.py`` run as shipped, except that the outside
executions' asset names the stack's webhook connection and the ``test-image`` model (the example
names ``modelroute_default`` and ``flux-1.1-pro``, which the generating example also uses).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from airflow_provider_modelroute import api
from tests.airflow_versions import AIRFLOW_V_3_1_PLUS
from tests.drills.harness import EXAMPLE_DAG, EXAMPLE_DAG_FILE, REPO, serve, wait_for
from tests.drills.test_webhook_drills import CONN_ID, WebhookStack

pytestmark = [
    pytest.mark.drill,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not AIRFLOW_V_3_1_PLUS, reason="the receiver is an api-server plugin app (Airflow 3.1+)"
    ),
]

ASSETS_FILE = REPO / "example_dags" / "example_modelroute_assets.py"
ON_NEW_IMAGES, LAND_OUTSIDE = "example_modelroute_on_new_images", "example_modelroute_land_outside_executions"
OUTSIDE_URI = f"modelroute://{CONN_ID}/test-image"


class AssetStack(WebhookStack):
    """The webhook stack, with the scheduler creating asset-triggered runs, and the assets example."""

    def dag_files(self) -> list[Path]:
        return [EXAMPLE_DAG_FILE, ASSETS_FILE]

    def _prepare_home(self) -> None:
        super()._prepare_home()
        self.env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "True"  # asset-triggered runs need it
        copy = self.home / "dags" / ASSETS_FILE.name
        text = copy.read_text().replace("modelroute://modelroute_default/flux-1.1-pro", OUTSIDE_URI)
        copy.write_text(text.replace("file:///tmp/modelroute/outside/", self.local_destination("outside")[0]))


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[AssetStack]:
    home = Path(tempfile.mkdtemp(prefix="modelroute-asset-drills-"))
    yield from serve(
        AssetStack(home), lambda: request.session.testsfailed, (EXAMPLE_DAG, ON_NEW_IMAGES, LAND_OUTSIDE)
    )


def query(stack: AssetStack, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the metadata DB (read-only; SQLite in WAL mode lets readers in)."""
    with contextlib.closing(sqlite3.connect(f"file:{stack.db_path}?mode=ro", uri=True, timeout=30)) as db:
        return list(db.execute(sql, args).fetchall())


def asset_events(stack: AssetStack, uri: str) -> list[dict[str, Any]]:
    rows = query(
        stack, "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.uri = ?", uri
    )
    return [json.loads(extra) for (extra,) in rows]


def asset_runs(stack: AssetStack, dag_id: str) -> list[tuple[str, str]]:
    """(run id, state) of the DAG's asset-triggered runs."""
    rows = query(
        stack, "SELECT run_id, state FROM dag_run WHERE dag_id = ? AND run_type = 'asset_triggered'", dag_id
    )
    return [(str(run_id), str(state)) for run_id, state in rows]


def test_asset_drill_1_a_landed_file_starts_the_downstream_dag(stack: AssetStack) -> None:
    """The generating example lands an image; its asset event (files, sha256) starts the downstream DAG."""
    destination, folder = stack.local_destination("landed")
    stack.trigger(EXAMPLE_DAG, "assets-1", {"prompt": "a drill lighthouse", "destination": destination})
    [result] = stack.wait_for_runs(EXAMPLE_DAG, ["assets-1"], timeout=300).values()
    assert result.state == "success", result.tasks

    def landed() -> list[dict[str, Any]] | None:
        found = [
            e for e in asset_events(stack, "modelroute_generated_images") if destination in json.dumps(e)
        ]
        return found or None

    [event] = wait_for("the landed images' asset event", landed, timeout=60, describe=stack.tails)
    [file] = event["files"]
    data = (folder / Path(file["uri"]).name).read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (file["size_bytes"], file["sha256"])
    assert file["sha256"] == stack.server.file_info(file["file_id"])["sha256"]
    done = wait_for(
        "an asset-triggered run of the downstream DAG to succeed",
        lambda: [r for r in asset_runs(stack, ON_NEW_IMAGES) if r[1] == "success"] or None,
        timeout=300,
        interval=1,
        describe=stack.tails,
    )
    print(f"\nasset drill 1: downstream runs {done}")


def test_asset_drill_2_an_outside_execution_starts_a_dag_that_lands_its_file(stack: AssetStack) -> None:
    """An execution started through the API, not by Airflow: its webhook starts the landing DAG."""
    from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

    conn = {"AIRFLOW_CONN_MODELROUTE_DEFAULT": stack.env["AIRFLOW_CONN_MODELROUTE_DEFAULT"]}
    with mock.patch.dict(os.environ, conn):
        execution_id = ModelRouteHook().create_execution("test-image", {"prompt": "made by the team's app"})[
            "id"
        ]

    def recorded() -> dict[str, Any] | None:
        return next((e for e in asset_events(stack, OUTSIDE_URI) if e["execution_id"] == execution_id), None)

    event = wait_for("the outside execution's asset event", recorded, timeout=300, describe=stack.tails)
    assert event["status"] == "COMPLETED" and event["model"] == "test-image" and event["file_ids"]

    def landed_run() -> list[tuple[str, str]] | None:
        return [r for r in asset_runs(stack, LAND_OUTSIDE) if r[1] in ("success", "failed")] or None

    runs = wait_for(
        "the landing DAG's asset-triggered run", landed_run, timeout=300, interval=1, describe=stack.tails
    )
    assert [state for _, state in runs] == ["success"], runs
    lands = query(
        stack, "SELECT state FROM task_instance WHERE dag_id = ? AND task_id = 'land'", LAND_OUTSIDE
    )
    assert lands == [("success",)], lands
    folder = stack.local_destination("outside")[1]
    for file_id in event["file_ids"]:
        [path] = folder.glob(f"{file_id}.*")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == stack.server.file_info(file_id)["sha256"]
    assert api.result_files(stack.server.execution(execution_id))
    print(f"\nasset drill 2: {execution_id} landed by {runs}")
