"""Asset events: one per file a transfer lands, and one per outside execution a webhook reports done.

A DAG scheduled on such an asset runs when new output lands, or when an execution that no Airflow
task submitted completes (``modelroute://<connection id>/<model>``, docs/assets.md).
"""

from __future__ import annotations

from typing import Any

from airflow_provider_modelroute import api
from airflow_provider_modelroute.version_compat import Asset, AssetAlias

RECORDED = "asset event recorded"


def model_asset_uri(conn_id: str, model: str) -> str:
    """The asset a webhook's completed outside execution updates: ``modelroute://<conn id>/<model>``."""
    return f"modelroute://{conn_id}/{model}"


def record_landed_files(context: Any, execution_id: str | None, records: list[dict[str, Any]]) -> None:
    """Put the landed files on the task's outlets: one event per file through each ``AssetAlias``
    (on the file's own URI), and the list of files as the extra of each declared ``Asset``."""
    files = [{k: record[k] for k in ("file_id", "uri", "size_bytes", "sha256")} for record in records]
    for outlet in context["task"].outlets or ():
        if isinstance(outlet, AssetAlias):
            for file in files:
                context["outlet_events"][outlet].add(
                    Asset(file["uri"]), extra={"execution_id": execution_id, **file}
                )
        elif isinstance(outlet, Asset):
            context["outlet_events"][outlet].extra = {"execution_id": execution_id, "files": files}


def record_outside_execution(conn_id: str, execution: dict[str, Any], event_id: str) -> str | None:
    """Record a COMPLETED execution (its summary, with ``files``) on its model's ``modelroute://`` asset
    if a DAG is scheduled on it (None: none is). Runs in the api-server (Airflow 3.1+); a repeated
    delivery records nothing more."""
    from airflow.assets.manager import AssetManager
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    if execution.get("status") != api.ExecutionStatus.COMPLETED.value or "model" not in execution:
        return None
    uri = model_asset_uri(conn_id, str(execution["model"]))
    extra = {
        "execution_id": execution["id"],
        "file_ids": [entry["file_id"] for entry in execution.get("files", [])],
        "status": execution["status"],
        "model": execution["model"],
        "webhook_event_id": event_id,
    }
    with create_session() as session:
        found = session.scalars(select(AssetModel).where(AssetModel.uri == uri)).unique()
        scheduled = [asset for asset in found if asset.scheduled_dags]
        for asset in scheduled:
            recent = select(AssetEvent.extra).where(AssetEvent.asset_id == asset.id)
            extras = session.scalars(recent.order_by(AssetEvent.id.desc()).limit(100))
            if not any(seen.get("webhook_event_id") == event_id for seen in extras):
                AssetManager().register_asset_change(asset=asset, extra=extra, session=session)
    return RECORDED if scheduled else None
