"""ModelRouteCancelExecutionOperator: cancel an execution, for pipelines that clean up after themselves.

Cheap to import (DAG files import it at every parse): the hook is imported only when the task runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute import api
from airflow_provider_modelroute._compat import BaseOperator
from airflow_provider_modelroute.exceptions import (
    ModelRouteApiError,
    ModelRouteAuthError,
    ModelRouteError,
    ModelRouteNotFoundError,
)

if TYPE_CHECKING:
    from airflow_provider_modelroute._compat import Context
    from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook


class ModelRouteCancelExecutionOperator(BaseOperator):
    """
    Cancel a ModelRoute execution (its hold is released). One that has already finished is not an error.

    Returns (XCom) the execution's summary after the cancel request, as the execute operator does.

    :param execution_id: The ``exec_...`` id, e.g.
        ``{{ ti.xcom_pull(task_ids='generate', key='execution_id') }}``. (templated)
    :param modelroute_conn_id: The Airflow connection to ModelRoute.
    """

    template_fields: Sequence[str] = ("execution_id",)
    ui_color = "#e3ecfa"

    def __init__(self, *, execution_id: str, modelroute_conn_id: str = "modelroute_default", **kwargs: Any):
        super().__init__(**kwargs)
        self.execution_id = execution_id
        self.modelroute_conn_id = modelroute_conn_id

    @cached_property
    def hook(self) -> ModelRouteHook:
        from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

        return ModelRouteHook(self.modelroute_conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        execution_id = str(self.execution_id)
        refusal: ModelRouteApiError | None = None
        try:
            answer = self.hook.cancel_execution(execution_id)
        except (ModelRouteAuthError, ModelRouteNotFoundError):
            raise
        except ModelRouteApiError as exc:
            if exc.retryable:
                raise
            answer, refusal = None, exc  # how the API refuses a finished one is not documented
        if isinstance(answer, dict) and answer.get("status"):
            execution = answer
        else:
            execution = self.hook.get_execution(execution_id)
        status = str(execution.get("status"))
        if answer is None and api.is_terminal(status):
            self.log.info("ModelRoute execution %s had already finished: it is %s", execution_id, status)
        elif answer is None:
            raise refusal or ModelRouteError(
                f"ModelRoute refused to cancel execution {execution_id} ({status})"
            )
        else:
            self.log.info("Cancelled ModelRoute execution %s: it is now %s", execution_id, status)
        return api.execution_summary(execution)
