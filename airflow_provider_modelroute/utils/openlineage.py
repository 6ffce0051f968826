"""OpenLineage for the operators, imported only when the OpenLineage provider asks. A ModelRoute file is
the dataset ``modelroute://<API host>`` + its ``file_...`` id; storage objects are named as common-io does."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from airflow.providers.common.compat.openlineage.facet import (
    Dataset,
    ExternalQueryRunFacet,
    OutputDataset,
    OutputStatisticsOutputDatasetFacet,
)
from airflow.providers.openlineage.extractors import OperatorLineage
from attr import define
from openlineage.client.generated.base import JobFacet, RunFacet

from airflow_provider_modelroute import api
from airflow_provider_modelroute.version_compat import object_storage_path


class _ModelRouteFacet:
    @staticmethod
    def _get_schema() -> str:
        return "https://github.com/modelroute/airflow-provider-modelroute#openlineage"


@define
class ModelRouteJobFacet(_ModelRouteFacet, JobFacet):
    """The model a ModelRoute task runs."""

    model: str


@define
class ModelRouteExecutionRunFacet(_ModelRouteFacet, RunFacet):
    """The execution behind a task run: its id, status and cost fields as the API gave them."""

    executionId: str  # OpenLineage facets use camelCase
    status: str | None = None
    holdAmount: str | None = None
    estimatedCost: str | None = None
    cost: str | None = None


def execute_lineage(task: Any) -> OperatorLineage:
    """ModelRouteExecuteOperator: the model as job facet, its input files in, its produced files out."""
    inputs = [file_dataset(task.hook, ref) for ref in _file_references(task.input)]
    job_facets = {"modelroute": ModelRouteJobFacet(model=str(task.model))}
    summary = task.summary
    if not summary or not summary.get("id"):
        return OperatorLineage(inputs=inputs, job_facets=job_facets)
    execution_id = str(summary["id"])
    run_facets: dict[str, RunFacet] = {
        "externalQuery": ExternalQueryRunFacet(externalQueryId=execution_id, source="modelroute"),
        "modelroute_execution": ModelRouteExecutionRunFacet(
            execution_id,
            summary.get("status"),
            *(
                None if summary.get(n) is None else str(summary[n])
                for n in ("hold_amount", "estimated_cost", "cost")
            ),
        ),
    }
    return OperatorLineage(
        inputs=inputs,
        outputs=[file_dataset(task.hook, str(entry["file_id"])) for entry in summary.get("files") or []],
        job_facets=job_facets,
        run_facets=run_facets,
    )


def to_storage_lineage(task: Any) -> OperatorLineage:
    """ModelRouteToStorageOperator: each copied ModelRoute file in, its destination object out."""
    records = task.records or []
    return OperatorLineage(
        inputs=[file_dataset(task.hook, str(record["file_id"])) for record in records],
        outputs=[
            storage_dataset(str(r["uri"]), task.destination_conn_id, r.get("size_bytes")) for r in records
        ],
    )


def upload_lineage(task: Any) -> OperatorLineage:
    """StorageToModelRouteOperator: the source object in, the ModelRoute file out."""
    record = task.record
    source = storage_dataset(api.display_uri(task.source), task.source_conn_id)
    outputs = [file_dataset(task.hook, str(record["file_id"]))] if record else []
    return OperatorLineage(inputs=[source], outputs=outputs)


def file_dataset(hook: Any, file_id: str) -> Dataset:
    """A ModelRoute file: namespace ``modelroute://<API host>``, name its ``file_...`` id."""
    return Dataset(
        namespace=f"modelroute://{urlsplit(hook.transport.settings.base_url).netloc}", name=file_id
    )


def storage_dataset(url: str, conn_id: str | None, size_bytes: int | None = None) -> Dataset:
    """An ``ObjectStoragePath`` as common-io's FileTransferOperator names it; outputs carry their size."""
    path = object_storage_path(url, conn_id or None)
    # Airflow 2.11 keeps "conn_id@" in the namespace; 3.x does not
    namespace = re.sub(r"^([a-z0-9+.-]+://)[^@/]*@", r"\1", str(path.namespace))
    if size_bytes is None:
        return Dataset(namespace=namespace, name=path.key)
    statistics = OutputStatisticsOutputDatasetFacet(rowCount=None, size=size_bytes, fileCount=1)
    return OutputDataset(namespace=namespace, name=path.key, outputFacets={"outputStatistics": statistics})


def _file_references(value: Any) -> list[str]:
    """Every ``file_...`` reference in a model input, in order, once."""
    if isinstance(value, str):
        return [value] if api.FILE_ID_RE.fullmatch(value) else []
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return list(dict.fromkeys(ref for item in items for ref in _file_references(item)))
