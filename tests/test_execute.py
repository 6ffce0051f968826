"""ModelRouteExecuteOperator in real DAG runs (dag.test) against the real local server."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from airflow_provider_modelroute.exceptions import ModelRouteConfigError
from airflow_provider_modelroute.operators.modelroute import (
    ModelRouteExecuteOperator,
    ModelRouteExecutionLink,
)
from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.testing.dialects import Dialect
from tests.airflow_versions import AIRFLOW_V_3_0_PLUS
from tests.conftest import make_dag, run_dag, task_instance, task_states, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture
def defer_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every deferral (trigger kwargs and timeout) while letting it happen."""
    calls: list[dict[str, Any]] = []
    original = ModelRouteExecuteOperator.defer

    def spy(self: ModelRouteExecuteOperator, **kwargs: Any) -> None:
        calls.append({"trigger": kwargs["trigger"].serialize()[1], "timeout": kwargs.get("timeout")})
        original(self, **kwargs)

    monkeypatch.setattr(ModelRouteExecuteOperator, "defer", spy)
    return calls


def run_execute(request: pytest.FixtureRequest, **kwargs: Any) -> Any:
    params: dict[str, Any] = {
        "model": "test-image",
        "input": {"prompt": "a red fox"},
        "poll_interval": 0.05,
        "retry_delay": timedelta(0),
        **kwargs,
    }
    with make_dag(request.node.name) as dag:
        ModelRouteExecuteOperator(task_id="generate", **params)
    return run_dag(dag)


def only_key(server: ModelRouteServer) -> str:
    keys = list(server.stats()["idempotency_keys"])
    assert len(keys) == 1, keys
    return keys[0]


@pytest.mark.parametrize("deferrable", [False, True], ids=["sync", "deferrable"])
def test_submit_and_wait(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    defer_calls: list[dict[str, Any]],
    deferrable: bool,
) -> None:
    dr = run_execute(request, deferrable=deferrable, metadata={"team": "{{ dag.dag_id }}"})
    assert dr.state == "success"
    assert task_states(dr) == {"generate": "success"}

    result = xcom(dr, "generate")
    execution_id = xcom(dr, "generate", "execution_id")
    assert result["id"] == execution_id and result["status"] == "COMPLETED"
    assert result["files"][0]["content_type"] == "image/png"
    assert result["estimated_cost"] == "0.040"
    url = xcom(dr, "generate", "execution_url")
    assert url == f"{server.base_url}/executions/{execution_id}"  # the local server's dashboard page
    if AIRFLOW_V_3_0_PLUS:  # Airflow 3 stores each extra link's target in XCom when the task ends
        assert xcom(dr, "generate", ModelRouteExecutionLink().xcom_key) == url
    assert server.execution(execution_id)["metadata"] == {"team": dr.dag_id}  # templated
    assert server.stats()["executions_created"] == 1
    assert only_key(server).startswith("airflow-") and only_key(server).endswith("-g0")
    if deferrable:
        assert len(defer_calls) == 1
        kwargs = defer_calls[0]["trigger"]
        assert kwargs["execution_id"] == execution_id and kwargs["cancel_on_kill"] is True
        assert defer_calls[0]["timeout"] is None  # no timeout asked: ModelRoute expires executions
    else:
        assert defer_calls == []


def test_submit_without_waiting(server: ModelRouteServer, request: pytest.FixtureRequest) -> None:
    dr = run_execute(request, wait_for_completion=False, input={"prompt": "p", "_simulate": {"seconds": 30}})
    assert dr.state == "success"
    result = xcom(dr, "generate")
    assert result["status"] == "PENDING"
    assert xcom(dr, "generate", "execution_id") == result["id"]
    assert "GET /v1/executions/{id}" not in server.stats()["requests"]


@pytest.mark.parametrize("deferrable", [False, True], ids=["sync", "deferrable"])
@pytest.mark.parametrize(
    ("outcome", "code"),
    [("FAILED", "GENERATION_FAILED"), ("CANCELLED", None), ("EXPIRED", "EXPIRED")],
)
def test_unsuccessful_executions_fail_the_task(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    deferrable: bool,
    outcome: str,
    code: str | None,
) -> None:
    simulate = {"outcome": outcome, "error_code": code}
    dr = run_execute(request, deferrable=deferrable, input={"prompt": "p", "_simulate": simulate})
    assert dr.state == "failed"
    assert task_states(dr) == {"generate": "failed"}
    logs = capsys.readouterr().out
    assert f"ended {outcome}" in logs
    if code:
        assert code in logs
    assert server.stats()["executions_created"] == 1


@pytest.mark.parametrize("deferrable", [False, True], ids=["sync", "deferrable"])
def test_timeout_cancels_the_remote_execution(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    defer_calls: list[dict[str, Any]],
    deferrable: bool,
) -> None:
    dr = run_execute(
        request, deferrable=deferrable, timeout=0.5, input={"prompt": "p", "_simulate": {"seconds": 3600}}
    )
    assert dr.state == "failed"
    execution_id = xcom(dr, "generate", "execution_id")
    assert server.stats()["cancels"] == {execution_id: 1}
    assert server.execution(execution_id)["status"] == "CANCELLED"
    if deferrable:  # the framework's timeout must fire after our own deadline, never first
        deadline = defer_calls[0]["trigger"]["deadline"]
        assert deadline is not None
        assert defer_calls[0]["timeout"] > timedelta(seconds=0.4)


def test_execution_timeout_leaves_time_to_cancel(
    server: ModelRouteServer, request: pytest.FixtureRequest
) -> None:
    # Our deadline falls 20 % (2 s) before Airflow's: time enough to cancel on a loaded machine.
    dr = run_execute(
        request,
        execution_timeout=timedelta(seconds=10),
        input={"prompt": "p", "_simulate": {"seconds": 3600}},
    )
    assert dr.state == "failed"
    execution_id = xcom(dr, "generate", "execution_id")
    assert server.execution(execution_id)["status"] == "CANCELLED"


@pytest.mark.parametrize(
    "deferrable",
    [False, True],
    ids=["sync", "deferrable"],
)
def test_retry_after_failure_mid_wait_reattaches(
    server: ModelRouteServer, request: pytest.FixtureRequest, deferrable: bool
) -> None:
    # INTERNAL_ERROR is not retryable: the first try fails while waiting, the execution runs on.
    # (Airflow 3.0 resumes a deferred task's retry at execute_complete with the old event: the
    # operator notices and starts the try over, so this also holds there.)
    server.add_fault("GET /v1/executions/{id}", "error", count=1, code="INTERNAL_ERROR")
    dr = run_execute(
        request, deferrable=deferrable, retries=1, input={"prompt": "p", "_simulate": {"seconds": 1}}
    )
    assert dr.state == "success"
    ti = task_instance(dr, "generate")
    assert ti.state == "success" and ti.try_number == 2
    stats = server.stats()
    assert stats["executions_created"] == 1  # the retry re-attached; it did not pay twice
    assert stats["idempotent_replays"] == 1
    assert stats["cancels"] == {}
    assert xcom(dr, "generate")["id"] == server.execution_ids()[0]


def without_state_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Submit as on Airflow < 3.3, whose context has no ``task_state_store``."""
    submit = ModelRouteExecuteOperator.submit

    def submit_without_store(self: ModelRouteExecuteOperator, context: Any) -> dict[str, Any]:
        return submit(self, {k: v for k, v in context.items() if k != "task_state_store"})

    monkeypatch.setattr(ModelRouteExecuteOperator, "submit", submit_without_store)


@pytest.fixture(params=["state-store", "no-state-store"])
def state_store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """With Airflow 3.3's task state store (where there is one), and as on Airflow < 3.3 without it."""
    if request.param == "no-state-store":
        without_state_store(monkeypatch)
    return str(request.param)


def test_failed_execution_is_not_replayed_forever(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    dialect: Dialect,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # as on Airflow < 3.3, without a task state store: only the try number bounds the replays
    without_state_store(monkeypatch)
    server.add_fault(
        "POST /v1/executions", "outcome", count=1, outcome="FAILED", error_code="GENERATION_FAILED"
    )
    dr = run_execute(request, retries=2)
    assert dr.state == "success"
    assert task_instance(dr, "generate").try_number == 2
    stats = server.stats()
    assert stats["executions_created"] == 2  # the retryable failure was retried, once
    keys = sorted(stats["idempotency_keys"])
    assert [key[-3:] for key in keys] == ["-g0", "-g1"]
    assert keys[0][:-3] == keys[1][:-3]  # same task instance, next generation


@pytest.mark.parametrize("reading", ["sync", "literal"])
def test_each_try_starts_at_most_one_execution(
    server: ModelRouteServer, request: pytest.FixtureRequest, state_store: str, reading: str
) -> None:
    # A create answered FAILED at once (sync) or soon after: never taken for an earlier try's replay.
    server.dialect = reading
    simulate = {"outcome": "FAILED", "error_code": "GENERATION_FAILED", "seconds": 0}
    dr = run_execute(request, retries=2, input={"prompt": "p", "_simulate": simulate})
    assert dr.state == "failed"
    assert task_instance(dr, "generate").try_number == 3
    assert server.stats()["executions_created"] == 3  # one per try, never a loop


@pytest.mark.parametrize("deferrable", [False, True], ids=["sync", "deferrable"])
@pytest.mark.parametrize("reading", ["literal", "sync"])
def test_a_failure_a_new_execution_would_repeat_fails_at_once(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    deferrable: bool,
    reading: str,
) -> None:
    server.dialect = reading
    simulate = {"outcome": "FAILED", "error_code": "CONTENT_MODERATION_REJECTED"}
    dr = run_execute(request, retries=3, deferrable=deferrable, input={"prompt": "p", "_simulate": simulate})
    assert dr.state == "failed"
    assert task_instance(dr, "generate").try_number == 1  # no Airflow retry...
    assert server.stats()["executions_created"] == 1  # ...and no new execution
    logs = capsys.readouterr().out
    assert "CONTENT_MODERATION_REJECTED" in logs and "change it" in logs  # the code and a hint
    assert "A new execution would fail the same way" in logs


@pytest.mark.parametrize(
    ("fault", "code"),
    [(None, "FILE_NOT_FOUND"), ({"code": "UNAUTHORIZED"}, "UNAUTHORIZED"), ({"code": "X_NEW"}, "X_NEW")],
)
def test_errors_at_submit_that_no_retry_fixes_fail_at_once(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    fault: dict[str, Any] | None,
    code: str,
) -> None:
    image = "file_00000000-0000-0000-0000-000000000000"  # a new user's input that does not exist
    if fault is not None:
        status = {"X_NEW": 422}.get(code)  # a code the docs do not list: a non-retryable 4xx
        server.add_fault(
            "POST /v1/executions", "error", count=None, **fault, **({"status": status} if status else {})
        )
    dr = run_execute(request, retries=2, input={"prompt": "p", "image": image})
    assert dr.state == "failed"
    assert task_instance(dr, "generate").try_number == 1
    assert code in capsys.readouterr().out
    assert server.stats()["executions_created"] == 0
    assert server.stats()["requests"]["POST /v1/executions"] == 1  # no HTTP retry either


def test_a_finished_answer_needs_no_wait(
    server: ModelRouteServer, request: pytest.FixtureRequest, defer_calls: list[dict[str, Any]]
) -> None:
    server.dialect = "sync"  # the POST answers the COMPLETED execution, with its result
    dr = run_execute(request, deferrable=True)
    assert dr.state == "success"
    assert xcom(dr, "generate")["files"][0]["file_id"].startswith("file_")
    assert defer_calls == []
    assert "GET /v1/executions/{id}" not in server.stats()["requests"]
    assert server.stats()["executions_created"] == 1


@pytest.mark.parametrize("deferrable", [False, True], ids=["sync", "deferrable"])
def test_a_timed_out_wait_is_resumed_by_the_retry(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    deferrable: bool,
) -> None:
    # The execution runs until the retry starts (then it is COMPLETED): try 1 times out whatever
    # the machine's speed, and try 2 finds it done.
    execute = ModelRouteExecuteOperator.execute

    def execute_completing_on_retry(self: Any, context: Any) -> Any:
        if context["ti"].try_number >= 2:
            [execution_id] = server.execution_ids()
            server.set_execution_status(execution_id, "COMPLETED")
        return execute(self, context)

    monkeypatch.setattr(ModelRouteExecuteOperator, "execute", execute_completing_on_retry)
    dr = run_execute(
        request,
        deferrable=deferrable,
        timeout=1,
        retries=1,
        input={"prompt": "p", "_simulate": {"seconds": 3600}},
    )
    assert dr.state == "success"
    assert task_instance(dr, "generate").try_number == 2
    stats = server.stats()
    assert stats["executions_created"] == 1 and stats["cancels"] == {}  # re-attached, paid once
    logs = capsys.readouterr().out
    assert "timeout=1 s (this operator's `timeout` parameter)" in logs  # names the limit
    assert "the next try re-attaches" in logs


def test_restart_on_timeout_cancels_and_starts_again(
    server: ModelRouteServer, request: pytest.FixtureRequest
) -> None:
    dr = run_execute(
        request,
        timeout=0.5,
        retries=1,
        restart_on_timeout=True,
        input={"prompt": "p", "_simulate": {"seconds": 30}},
    )
    assert dr.state == "failed"
    stats = server.stats()
    assert stats["executions_created"] == 2  # the user asked for a new one per try
    assert sorted(stats["cancels"]) == sorted(server.execution_ids())
    assert {server.execution(e)["status"] for e in server.execution_ids()} == {"CANCELLED"}


def test_retry_of_a_finished_execution_returns_it_at_once(
    server: ModelRouteServer, request: pytest.FixtureRequest
) -> None:
    # The first try's wait fails; by the retry the execution has completed: it is returned at once.
    server.add_fault("GET /v1/executions/{id}", "error", count=1, code="INTERNAL_ERROR")
    # retry_delay: Airflow 2.11's dag.test() starts a retry at once, before the execution is done
    dr = run_execute(
        request,
        retries=1,
        retry_delay=timedelta(seconds=0.5),
        input={"prompt": "p", "_simulate": {"seconds": 0}},
    )
    assert dr.state == "success"
    stats = server.stats()
    assert stats["executions_created"] == 1
    # the failed poll, then the retry's one read of the replayed execution: no wait on retry
    assert stats["requests"]["GET /v1/executions/{id}"] == 2
    assert xcom(dr, "generate")["status"] == "COMPLETED"


def test_force_new_execution(server: ModelRouteServer, request: pytest.FixtureRequest) -> None:
    server.add_fault("GET /v1/executions/{id}", "error", count=1, code="INTERNAL_ERROR")
    dr = run_execute(request, retries=1, force_new_execution=True)
    assert dr.state == "success"
    assert server.stats()["executions_created"] == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "no-such-model"}, "INPUT_VALIDATION_ERROR"),
        ({"input": {"prompt": ""}}, "input.prompt"),
        ({"input": "{{ 'not a dict' }}"}, "input must be a dict"),
    ],
)
def test_bad_input_fails_at_once_without_retrying(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    kwargs: dict[str, Any],
    message: str,
) -> None:
    dr = run_execute(request, retries=3, **kwargs)
    assert dr.state == "failed"
    ti = task_instance(dr, "generate")
    assert ti.state == "failed" and ti.try_number == 1  # no retry loop on bad input
    assert message in capsys.readouterr().out
    assert server.stats()["executions_created"] == 0


def test_bad_arguments_are_refused_when_the_dag_is_parsed() -> None:
    with pytest.raises(ModelRouteConfigError, match="poll_interval must be positive"):
        ModelRouteExecuteOperator(task_id="t", model="m", input={}, poll_interval=0)
    with pytest.raises(ModelRouteConfigError, match="timeout must be positive"):
        ModelRouteExecuteOperator(task_id="t", model="m", input={}, timeout=-1)


def test_on_kill_cancels(server: ModelRouteServer) -> None:
    from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

    execution = ModelRouteHook().create_execution("test-image", {"prompt": "p", "_simulate": {"seconds": 60}})
    operator = ModelRouteExecuteOperator(task_id="t", model="test-image", input={"prompt": "p"})
    operator.execution_id = execution["id"]
    operator.on_kill()
    assert server.stats()["cancels"] == {execution["id"]: 1}
    assert server.execution(execution["id"])["status"] == "CANCELLED"
    operator.cancel_on_kill = False
    operator.on_kill()
    assert server.stats()["cancels"] == {execution["id"]: 1}
