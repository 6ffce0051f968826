"""``@task.modelroute`` in real DAG runs (dag.test) against the local server: found by Airflow, mapped,
re-attached on retry, and refusing a return value it cannot submit."""

from __future__ import annotations

import importlib
from datetime import timedelta
from typing import Any

import pytest

from airflow_provider_modelroute.decorators.modelroute import modelroute_task
from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.testing import ModelRouteServer
from tests.airflow_versions import AIRFLOW_V_3_0_PLUS
from tests.conftest import make_dag, run_dag, task_instance, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")


def airflow_task() -> Any:
    """Airflow's ``task`` decorator collection, where DAG authors import it from."""
    return importlib.import_module("airflow.sdk" if AIRFLOW_V_3_0_PLUS else "airflow.decorators").task


def test_airflow_finds_the_decorator() -> None:
    try:  # Airflow 3.2+ reads task decorators in the task runtime's manager
        from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime as Manager
    except ImportError:
        from airflow.providers_manager import ProvidersManager as Manager
    assert Manager().taskflow_decorators["modelroute"] is modelroute_task
    assert airflow_task().modelroute is modelroute_task


def mapped_states(dag_run: Any, task_id: str) -> dict[int, str]:
    return {ti.map_index: str(ti.state) for ti in dag_run.get_task_instances() if ti.task_id == task_id}


def test_mapped_taskflow_dag_runs_one_execution_per_item(
    server: ModelRouteServer, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    deferrals: list[str] = []
    defer = ModelRouteExecuteOperator.defer

    def spy(self: Any, **kwargs: Any) -> None:
        deferrals.append(self.task_id)
        defer(self, **kwargs)

    monkeypatch.setattr(ModelRouteExecuteOperator, "defer", spy)
    task = airflow_task()
    prompts = ["a red fox", "a blue whale", "a green parrot"]
    with make_dag(request.node.name, params={"style": "ink"}) as dag:

        @task.modelroute(model="test-image", poll_interval=0.05)
        def generate(prompt: str, params: Any = None) -> dict:  # the annotation makes no multiple outputs
            return {"prompt": prompt, "style": params["style"]}

        @task
        def collect(executions: Any) -> list[str]:
            return [execution["id"] for execution in executions]

        collect(generate.expand(prompt=prompts))

    dr = run_dag(dag)
    assert dr.state == "success"
    assert mapped_states(dr, "generate") == {0: "success", 1: "success", 2: "success"}
    assert mapped_states(dr, "collect") == {-1: "success"}
    assert deferrals == ["generate"] * 3  # deferrable by default
    stats = server.stats()
    assert stats["executions_created"] == 3 and stats["idempotent_replays"] == 0
    created = {server.execution(e)["input"]["prompt"]: e for e in server.execution_ids()}
    assert {server.execution(e)["input"]["style"] for e in created.values()} == {"ink"}
    for index, prompt in enumerate(prompts):
        result = xcom(dr, "generate", map_index=index)
        assert result["id"] == created[prompt] and result["status"] == "COMPLETED"
        assert xcom(dr, "generate", "execution_id", map_index=index) == created[prompt]
    assert xcom(dr, "collect") == [created[prompt] for prompt in prompts]


def test_the_function_may_return_model_and_options(
    server: ModelRouteServer, request: pytest.FixtureRequest
) -> None:
    task = airflow_task()
    with make_dag(request.node.name) as dag:

        @task.modelroute(poll_interval=0.05, deferrable=False)
        def generate() -> dict:
            request = {"model": "test-image", "input": {"prompt": "p", "model": "v2"}}
            return {**request, "metadata": {"team": "art"}}

        generate()

    dr = run_dag(dag)
    assert dr.state == "success"
    execution = server.execution(xcom(dr, "generate")["id"])
    assert execution["model"] == "test-image"
    assert execution["input"] == {"prompt": "p", "model": "v2"}  # an input field named like an option
    assert execution["metadata"] == {"team": "art"}
    assert server.stats()["executions_created"] == 1


def test_a_retried_mapped_item_reattaches(server: ModelRouteServer, request: pytest.FixtureRequest) -> None:
    # INTERNAL_ERROR is not retryable: one item's first try fails while waiting, its execution runs on.
    server.add_fault("GET /v1/executions/{id}", "error", count=1, code="INTERNAL_ERROR")
    task = airflow_task()
    with make_dag(request.node.name) as dag:

        @task.modelroute(model="test-image", poll_interval=0.05, retries=1, retry_delay=timedelta(0))
        def generate(prompt: str) -> dict:
            return {"prompt": prompt, "_simulate": {"seconds": 1}}

        generate.expand(prompt=["one", "two"])

    dr = run_dag(dag)
    assert dr.state == "success"
    tries = sorted(ti.try_number for ti in dr.get_task_instances() if ti.task_id == "generate")
    assert tries == [1, 2]
    stats = server.stats()
    assert stats["executions_created"] == 2  # the retry re-attached; it did not pay twice
    assert stats["idempotent_replays"] == 1
    assert stats["cancels"] == {}


@pytest.mark.parametrize(
    ("model", "returned", "says"),
    [
        ("test-image", "a red fox", "returned str, not a dict"),
        ("test-image", {"model": "test-image", "prompt": "p"}, "without an 'input' dict"),
        ("test-image", {"input": {"prompt": "p"}, "seed": 1}, "unknown fields ['seed'] beside 'input'"),
        ("", {"prompt": "p"}, "model must be a non-empty model slug, e.g. model='flux-1.1-pro'"),
    ],
    ids=["not-a-dict", "no-input", "unknown-field", "no-model"],
)
def test_a_request_it_cannot_submit_fails_at_once(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    model: str,
    returned: Any,
    says: str,
) -> None:
    task = airflow_task()
    with make_dag(request.node.name) as dag:

        @task.modelroute(model=model, retries=2, retry_delay=timedelta(0))
        def generate() -> Any:
            return returned

        generate()

    dr = run_dag(dag)
    assert dr.state == "failed"
    ti = task_instance(dr, "generate")
    assert str(ti.state) == "failed" and ti.try_number == 1  # no retry can fix it
    logs = capsys.readouterr().out
    assert says in logs
    if model:
        assert "return the execution's input as a dict" in logs
    assert "POST /v1/executions" not in server.stats()["requests"]
