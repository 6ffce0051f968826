"""Webhook drills on a real Airflow: api-server with the receiver plugin, triggerer, scheduler, LocalExecutor.

    .venv/bin/python -m pytest tests/drills/test_webhook_drills.py -m drill -q -x -s

The receiver is registered the documented way (``python -m airflow_provider_modelroute.webhooks
setup``), and the local ModelRoute server sends real, signed deliveries to the api-server: to the
registered endpoint and to each execution's ``webhook_url``. The drills share one stack, and each
resets the server's counters, faults and delivery log first.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_provider_modelroute.webhooks.mode import sign
from tests.airflow_versions import AIRFLOW_V_3_1_PLUS, TRIGGER_ON_KILL_SUPPORTED
from tests.drills.harness import PYTHON, AirflowStack, DrillError, serve, wait_for

pytestmark = [
    pytest.mark.drill,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not AIRFLOW_V_3_1_PLUS, reason="the receiver is an api-server plugin app (Airflow 3.1+)"
    ),
]

DAG_ID = "drill_modelroute_webhooks"  # the default 10-minute safety net
FAST_DAG_ID = "drill_modelroute_webhooks_fast"  # a 5 s safety net
CONN_ID, FAST_CONN_ID = "modelroute_webhooks", "modelroute_webhooks_fast"
FAST_POLL_INTERVAL = 5
#: The documented retry waits (2, 4, 8... minutes) x this: a refused delivery comes again after 0.6 s.
RETRY_SCALE = 0.005
STATUS_READS = "GET /v1/executions/{id}"
RESUME_BOUND = 2.0


class WebhookStack(AirflowStack):
    """The drill stack, plus the receiver registered with the local server and two webhook connections."""

    webhook_secret = ""

    def _migrate(self) -> None:
        super()._migrate()
        receiver_base = f"http://127.0.0.1:{self.api_port}"
        conn = json.loads(self.env["AIRFLOW_CONN_MODELROUTE_DEFAULT"])
        env = {**self.env, f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(conn)}
        setup = subprocess.run(
            [
                PYTHON,
                "-m",
                "airflow_provider_modelroute.webhooks",
                "--conn-id",
                CONN_ID,
                "setup",
                "--public-url",
                receiver_base,
                "--no-test",
            ],
            env=env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if setup.returncode != 0:
            raise DrillError(f"webhook setup failed: {setup.stderr[-2000:]}")
        # An environment connection cannot be written: setup prints the extras to add (a JSON line)
        # and says to restart the processes that read it (this stack starts them after this).
        assert f"AIRFLOW_CONN_{CONN_ID.upper()}" in setup.stdout and "restart" in setup.stdout, setup.stdout
        [line] = [line for line in setup.stdout.splitlines() if line.startswith("{")]
        extras = json.loads(line)
        self.webhook_secret = extras["webhook_secret"]
        fast = {
            **extras,
            "webhook_receiver_url": f"{receiver_base}/modelroute/webhooks/{FAST_CONN_ID}",
            "webhook_poll_interval": FAST_POLL_INTERVAL,
        }
        for conn_id, more in ((CONN_ID, extras), (FAST_CONN_ID, fast)):
            self.env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(
                {**conn, "extra": {**conn["extra"], **more}}
            )
        self.env["AIRFLOW_VAR_MODELROUTE_ADMIN_URL"] = self.modelroute_info["admin_url"]

    def find_secrets(self, paths: Any = None) -> list[str]:
        hits = super().find_secrets(paths)
        for path in paths if paths is not None else self.log_files():
            with contextlib.suppress(OSError):
                if self.webhook_secret in path.read_text(errors="replace"):
                    hits.append(f"{path}: the webhook secret")
        return hits


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[WebhookStack]:
    home = Path(tempfile.mkdtemp(prefix="modelroute-webhook-drills-"))
    yield from serve(WebhookStack(home), lambda: request.session.testsfailed, (DAG_ID, FAST_DAG_ID))


def triggers_left(stack: WebhookStack) -> int:
    """Trigger rows in the metadata DB (read-only; SQLite in WAL mode lets readers in)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{stack.db_path}?mode=ro", uri=True, timeout=30)) as db:
        return int(db.execute("SELECT COUNT(*) FROM trigger").fetchone()[0])


@contextlib.contextmanager
def drill(stack: WebhookStack, name: str) -> Iterator[None]:
    # Airflow on SQLite reuses trigger ids: let the previous drill's triggers be cleaned up first,
    # so that no late event of theirs lands on this drill's tasks.
    wait_for("the previous drill's triggers to be gone", lambda: triggers_left(stack) == 0, timeout=300)
    stack.server.reset()
    stack.server.configure_webhooks(retry_scale=RETRY_SCALE)
    try:
        yield
    except BaseException:
        print(f"\n{name} FAILED; AIRFLOW_HOME {stack.home}\n{stack.tails(60)}")
        raise
    hits = stack.find_secrets()
    assert hits == [], hits


def ti_of(stack: WebhookStack, dag_id: str, run_id: str) -> dict[str, Any]:
    assert stack.api is not None
    return stack.api.task_instance(dag_id, run_id, "generate")


def wait_deferred(stack: WebhookStack, dag_id: str, run_id: str) -> dict[str, Any]:
    """Wait until the task is deferred (the receiver resumes it whether or not the triggerer has
    started its trigger yet: on a loaded machine that can take the triggerer tens of seconds), and
    until the scheduler has processed the deferring process's exit.

    Airflow 3.3.2 fails a task resumed before its scheduler has processed that exit, if it has queued
    the resumed task meanwhile (apache/airflow#72716). The receiver waits 5 s after a deferral, enough
    for a responsive scheduler; a loaded machine's can take longer, so the drills deliver only once
    the scheduler's log shows the report ("TaskInstance Finished ... state=deferred").
    """

    def deferred() -> dict[str, Any] | None:
        ti = ti_of(stack, dag_id, run_id)
        return ti if ti["state"] == "deferred" else None

    ti = wait_for(f"{run_id} to be deferred", deferred, timeout=180, interval=0.2, describe=stack.tails)
    report = f"TaskInstance Finished: dag_id={dag_id}, task_id={ti['task_id']}, run_id={run_id},"
    scheduler_log = stack.components_dir / "scheduler.log"

    def reported() -> bool:
        text = scheduler_log.read_text(errors="replace") if scheduler_log.exists() else ""
        return any(report in line and "state=deferred" in line for line in text.splitlines())

    wait_for(f"the scheduler to process {run_id}'s deferral", reported, timeout=180, interval=0.2)
    return ti


def execution_of(stack: WebhookStack, run_id: str) -> dict[str, Any]:
    [execution] = stack.executions_by_run()[run_id]
    return execution


def completed_deliveries(stack: WebhookStack, execution_id: str) -> list[dict[str, Any]]:
    return [
        d
        for d in stack.server.webhook_deliveries()
        if d["execution_id"] == execution_id and d["event_type"] == "execution.completed"
    ]


def succeeded(stack: WebhookStack, dag_id: str, run_ids: list[str], timeout: float = 240) -> None:
    results = stack.wait_for_runs(dag_id, run_ids, timeout=timeout)
    failed = {r.run_id: r.tasks for r in results.values() if r.state != "success"}
    assert not failed, f"runs failed: {failed}"
    tries = {r.run_id: r.try_number("generate") for r in results.values()}
    assert set(tries.values()) == {1}, f"a webhook drill needed a retry: {tries}"


def post_delivery(url: str, body: bytes, secret: str, timestamp: int) -> httpx.Response:
    stamp = str(timestamp)
    headers = {"X-Signature": sign(secret, stamp, body), "X-Signature-Timestamp": stamp}
    return httpx.post(url, content=body, headers=headers, timeout=30)


def test_webhook_drill_1_a_delivery_ends_a_10_minute_wait_within_2_s(stack: WebhookStack) -> None:
    """Three deferred waits with a 10-minute safety net end by webhook: resumed within 2 s, no status read."""
    with drill(stack, "webhook drill 1"):
        run_ids = [f"wh1-{i}" for i in range(3)]
        for run_id in run_ids:
            stack.trigger(DAG_ID, run_id, {"seconds": 30})
        for run_id in run_ids:
            wait_deferred(stack, DAG_ID, run_id)
        resumed_at: dict[str, float] = {}

        def all_resumed() -> bool:
            for run_id in set(run_ids) - set(resumed_at):
                if ti_of(stack, DAG_ID, run_id)["state"] != "deferred":
                    resumed_at[run_id] = time.time()
            return len(resumed_at) == len(run_ids)

        wait_for("the waits to be resumed", all_resumed, timeout=120, interval=0.1)
        latencies = {}
        for run_id in run_ids:
            execution_id = execution_of(stack, run_id)["id"]
            first = min(d["sent_at"] for d in completed_deliveries(stack, execution_id) if d["status"] == 200)
            latencies[run_id] = resumed_at[run_id] - first
        assert max(latencies.values()) <= RESUME_BOUND, f"delivery -> resumed (s): {latencies}"
        succeeded(stack, DAG_ID, run_ids)
        stats = stack.server.stats()
        assert stats["requests"].get(STATUS_READS, 0) == 0, (
            f"status reads despite webhooks: {stats['requests']}"
        )
        assert stats["cancels"] == {}, stats["cancels"]
        if TRIGGER_ON_KILL_SUPPORTED:
            # Airflow stops the trigger of a task resumed from outside through on_kill, and logs it as
            # a user action; the trigger (if it had started) says what happened right after.
            def explained() -> bool:
                logs = ["".join(stack.task_logs(DAG_ID, r, "generate").values()) for r in run_ids]
                return all(
                    "invoking on_kill" not in text or "and the task resumed from its webhook" in text
                    for text in logs
                )

            wait_for("the triggers to be stopped", lambda: triggers_left(stack) == 0, timeout=300)
            wait_for("each stopped trigger to say the task resumed from its webhook", explained, timeout=60)
        shown = sorted(round(v, 2) for v in latencies.values())
        print(f"\nwebhook drill 1: delivery -> task resumed: {shown} s")


def test_webhook_drill_2_forged_and_stale_deliveries_resume_nothing(stack: WebhookStack) -> None:
    """Forged, stale and misrouted deliveries are refused while the task stays deferred; then the
    server's own first delivery (signed with a wrong secret) is refused and its retry ends the wait."""
    with drill(stack, "webhook drill 2"):
        run_id = "wh2-0"
        stack.trigger(DAG_ID, run_id, {"seconds": 600})
        wait_deferred(stack, DAG_ID, run_id)
        execution = execution_of(stack, run_id)
        url = stack.server.execution(execution["id"])["webhook_url"]
        assert "route=" in url and "token=" in url, url
        document = {**execution, "status": "COMPLETED", "result": {"file_id": "file_forged"}}
        body = json.dumps({"id": "evt_forged", "type": "execution.completed", "data": document}).encode()
        now = int(time.time())
        answers = {
            "forged": post_delivery(url, body, "whsec_guessed", now).status_code,
            "stale": post_delivery(url, body, stack.webhook_secret, now - 600).status_code,
            "misrouted": post_delivery(
                url.split("&token=")[0] + "&token=" + "0" * 64, body, stack.webhook_secret, now
            ).status_code,
        }
        assert answers == {"forged": 401, "stale": 401, "misrouted": 403}, answers
        assert ti_of(stack, DAG_ID, run_id)["state"] == "deferred", "a refused delivery resumed the task"

        stack.server.add_webhook_fault("wrong_secret", count=2, event_type="execution.completed")
        stack.server.set_execution_status(execution["id"], "COMPLETED")
        succeeded(stack, DAG_ID, [run_id])
        statuses = [d["status"] for d in completed_deliveries(stack, execution["id"])]
        assert statuses.count(401) == 2 and 200 in statuses, statuses
        assert stack.server.stats()["requests"].get(STATUS_READS, 0) == 0


def test_webhook_drill_3_a_duplicated_delivery_is_a_no_op(stack: WebhookStack) -> None:
    """Each delivery of the end arrives three times (to two targets): one resume, one try, all 2xx."""
    with drill(stack, "webhook drill 3"):
        run_id = "wh3-0"
        stack.trigger(DAG_ID, run_id, {"seconds": 600})
        wait_deferred(stack, DAG_ID, run_id)
        execution_id = execution_of(stack, run_id)["id"]
        stack.server.add_webhook_fault("duplicate", count=2, event_type="execution.completed", copies=3)
        stack.server.set_execution_status(execution_id, "COMPLETED")
        succeeded(stack, DAG_ID, [run_id])
        deliveries = completed_deliveries(stack, execution_id)
        assert len(deliveries) == 6 and {d["status"] for d in deliveries} == {200}, deliveries
        assert len({d["event_id"] for d in deliveries}) == 1
        assert stack.server.stats()["requests"].get(STATUS_READS, 0) == 0


def test_webhook_drill_4_a_dropped_delivery_is_caught_by_the_safety_net(stack: WebhookStack) -> None:
    """Every delivery of the end is lost: the 5 s safety-net poll finds the execution COMPLETED."""
    with drill(stack, "webhook drill 4"):
        run_id = "wh4-0"
        stack.server.add_webhook_fault("drop", count=2, event_type="execution.completed")
        stack.trigger(FAST_DAG_ID, run_id, {"seconds": 2})
        succeeded(stack, FAST_DAG_ID, [run_id])
        execution_id = execution_of(stack, run_id)["id"]
        deliveries = completed_deliveries(stack, execution_id)
        assert [d["fault"] for d in deliveries] == ["drop", "drop"], deliveries
        reads = stack.server.stats()["requests"].get(STATUS_READS, 0)
        assert reads >= 1, "the safety net never looked"


def test_webhook_drill_5_an_event_before_the_deferral_completes_the_task(stack: WebhookStack) -> None:
    """The execution ends and its webhook is delivered while the task is still running (before it
    defers): the trigger finds the recorded event at once, and nobody reads the execution's status."""
    with drill(stack, "webhook drill 5"):
        run_id = "wh5-0"
        started = time.monotonic()
        stack.trigger(DAG_ID, run_id, {"seconds": 0, "early": True})
        succeeded(stack, DAG_ID, [run_id])
        took = time.monotonic() - started
        assert took < 300, (
            f"the run took {took:.0f} s: the 10-minute safety net, not the early event, ended it"
        )
        assert stack.server.stats()["requests"].get(STATUS_READS, 0) == 0
        logs = "".join(stack.task_logs(DAG_ID, run_id, "generate").values())
        assert "ended before the task deferred (webhook)" in logs, logs[-3000:]
