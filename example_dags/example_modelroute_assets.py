"""Data-aware scheduling: run when ModelRoute output lands, and land executions started outside Airflow.

``example_modelroute_on_new_images`` runs each time ``example_modelroute_generate_and_store`` lands
images (its ``store`` task declares the asset; the event's extra lists the files with their sha256).

``example_modelroute_land_outside_executions`` runs when the webhook receiver hears that an execution
of ``flux-1.1-pro`` that no Airflow task waits for (one your app started through the API) completed,
and lands its files. The asset is ``modelroute://<connection id>/<model>`` (docs/assets.md); the
receiver must be set up for that connection (docs/webhooks.md). Triggered by hand, it lands the
``execution_id`` param instead.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.providers.common.compat.sdk import DAG, Asset, Param, task

from airflow_provider_modelroute.transfers.modelroute import ModelRouteToStorageOperator

GENERATED_IMAGES = Asset("modelroute_generated_images")  # what example_modelroute_generate_and_store lands
OUTSIDE_EXECUTIONS = Asset("modelroute://modelroute_default/flux-1.1-pro")

with DAG(
    dag_id="example_modelroute_on_new_images",
    schedule=GENERATED_IMAGES,
    start_date=datetime(2026, 1, 1),
    tags=["example", "modelroute"],
):

    @task
    def announce(triggering_asset_events: Any = None) -> list[dict]:
        """The files that landed: each with its ``uri``, ``file_id``, ``size_bytes`` and ``sha256``."""
        events = [event for found in (triggering_asset_events or {}).values() for event in found]
        files = [file for event in events for file in event.extra.get("files", [])]
        for file in files:
            print(f"New image {file['uri']} ({file['size_bytes']} bytes, sha256 {file['sha256']})")
        return files

    announce()

with DAG(
    dag_id="example_modelroute_land_outside_executions",
    schedule=OUTSIDE_EXECUTIONS,
    start_date=datetime(2026, 1, 1),
    params={
        "destination": Param("file:///tmp/modelroute/outside/", type="string"),
        "execution_id": Param("", type="string", description="Triggered by hand: the execution to land"),
    },
    tags=["example", "modelroute"],
):

    @task
    def completed_executions(triggering_asset_events: Any = None, params: Any = None) -> list[str]:
        """One execution id per event (several executions may complete before the run starts)."""
        events = [event for found in (triggering_asset_events or {}).values() for event in found]
        by_hand = [params["execution_id"]] if params["execution_id"] else []
        return [event.extra["execution_id"] for event in events] or by_hand

    ModelRouteToStorageOperator.partial(
        task_id="land", destination="{{ params.destination }}", overwrite="skip_if_identical"
    ).expand(execution_id=completed_executions())
