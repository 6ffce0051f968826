"""Production drills: the example DAG on a real Airflow (scheduler, triggerer, dag-processor, api-server,
LocalExecutor) against the local ModelRoute server and moto S3, with processes killed and faults
injected. Each drill ends with the runs' states, the server's counters and the stored files checked.

    make drills        # i.e. .venv/bin/python -m pytest tests/drills -m drill

The drills share one stack (started once, ~30 s on an idle machine) and run in order; each resets the
server's counters and faults first. Every wait polls a condition with a deadline in minutes (no fixed
sleep). The summary table is printed and written to ``build/drill-results.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.airflow_versions import AIRFLOW_V_3_0_PLUS
from tests.drills.harness import (
    CONNECTION_EXTRAS,
    EXAMPLE_DAG,
    HELD_DAG,
    PARALLELISM,
    PROCESSING_SECONDS,
    REPO,
    RETRY_DELAY_SECONDS,
    AirflowStack,
    DrillError,
    RunResult,
    start_stack,
    wait_for,
)

pytestmark = [
    pytest.mark.drill,
    pytest.mark.timeout(1800),  # a backstop: every wait in a drill has its own deadline and message
    pytest.mark.skipif(
        not AIRFLOW_V_3_0_PLUS,
        reason="the drills run Airflow 3's own components (api-server, dag-processor, execution API)",
    ),
]

BAD_INPUTS_DAG = "drill_modelroute_bad_inputs"
RESULTS_FILE = REPO / "build" / "drill-results.md"
MAX_RETRIES = int(CONNECTION_EXTRAS["max_retries"])


@dataclass
class DrillResult:
    name: str
    runs: int
    succeeded: int
    executions: int
    files_verified: int
    secrets: int
    seconds: float
    notes: str


RESULTS: list[DrillResult] = []
TIMINGS: dict[str, float] = {}
DB_CONTENTION: dict[str, int] = {}


def results_table() -> str:
    lines = [
        "| drill | runs | succeeded | executions created | files verified | secrets found | seconds "
        "| notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS:
        lines.append(
            f"| {r.name} | {r.runs} | {r.succeeded} | {r.executions} | {r.files_verified} | {r.secrets} "
            f"| {r.seconds:.0f} | {r.notes} |"
        )
    return "\n".join(lines)


def write_results() -> None:
    total = sum(r.seconds for r in RESULTS) + sum(TIMINGS.values())
    setup = ", ".join(f"{k} {v:.0f} s" for k, v in TIMINGS.items())
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(
        f"# Drill results ({time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs)\n\n"
        f"Settings: LocalExecutor parallelism {PARALLELISM}, SQLite, executions PROCESSING "
        f"{PROCESSING_SECONDS:.0f} s, retry_delay {RETRY_DELAY_SECONDS} s (cluster policy).\n"
        f"Setup: {setup}. Total: {total:.0f} s. Database push-back over the whole session: "
        f"{DB_CONTENTION.get('api_server_5xx', '?')} api-server 5xx answers, "
        f"{DB_CONTENTION.get('database_is_locked', '?')} 'database is locked' log lines.\n\n"
        f"{results_table()}\n"
    )


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[AirflowStack]:
    failed_before = request.session.testsfailed
    stack = AirflowStack()
    # The scheduler creates no scheduled runs ([scheduler] use_job_schedule is off), so every run in
    # the drills is one a drill triggered.
    start_stack(stack, (EXAMPLE_DAG, HELD_DAG, BAD_INPUTS_DAG))
    TIMINGS["stack start"] = stack.timings["startup"]
    yield stack
    stack.stop()
    DB_CONTENTION.update(stack.db_contention())
    write_results()
    kept = request.session.testsfailed != failed_before or os.environ.get("MODELROUTE_DRILLS_KEEP")
    if not kept:
        stack.cleanup()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n\n{results_table()}\n(written to {RESULTS_FILE})")
        if kept:
            print(f"Drill logs kept in {stack.home}")


@contextlib.contextmanager
def drill(stack: AirflowStack, name: str) -> Iterator[dict[str, Any]]:
    """Reset the server, time the drill, and print the stack's log tails if it fails."""
    stack.server.reset()
    for component in ("triggerer", "scheduler"):
        assert stack.components[component].alive, f"{component} is not running before {name}"
    record: dict[str, Any] = {"started": time.monotonic()}
    try:
        yield record
    except BaseException:
        print(f"\n{name} FAILED; AIRFLOW_HOME {stack.home}\n{stack.tails(60)}")
        raise
    finally:
        record["seconds"] = time.monotonic() - record["started"]


def destinations(stack: AirflowStack, drill_name: str, count: int) -> dict[str, str]:
    """run_id -> destination folder: even runs to the local disk, odd runs to S3 (moto)."""
    found = {}
    for i in range(count):
        run_id = f"{drill_name}-{i:02d}"
        if i % 2:
            found[run_id] = stack.s3_destination(f"{drill_name}/{run_id}")
        else:
            found[run_id] = stack.local_destination(f"{drill_name}/{run_id}")[0]
    return found


def trigger_all(stack: AirflowStack, drill_name: str, targets: dict[str, str]) -> None:
    for run_id, destination in targets.items():
        stack.trigger(EXAMPLE_DAG, run_id, {"prompt": f"{drill_name}: {run_id}", "destination": destination})


def check_outcome(
    stack: AirflowStack, results: dict[str, RunResult], targets: dict[str, str]
) -> tuple[int, int, int]:
    """Every run succeeded with exactly one execution whose files are at its destination, verified.

    Returns (succeeded, executions created for these runs, files verified).
    """
    failed = {
        r.run_id: {t: (ti["state"], ti["try_number"]) for t, ti in r.tasks.items()}
        for r in results.values()
        if r.state != "success"
    }
    if failed:
        raise DrillError(f"Runs did not succeed: {failed}")
    by_run = stack.executions_by_run()
    duplicates = {run: [e["id"] for e in found] for run, found in by_run.items() if len(found) > 1}
    if duplicates:
        raise DrillError(f"Runs with more than one execution (paid twice): {duplicates}")
    files = 0
    for run_id, destination in targets.items():
        if run_id not in by_run:
            raise DrillError(f"No execution on the server for run {run_id}")
        files += stack.verify_files(by_run[run_id][0], destination)
    return len(results), sum(len(by_run.get(run, [])) for run in targets), files


def unexplained_retries(stack: AirflowStack, results: dict[str, RunResult]) -> tuple[list[str], int]:
    """Tasks that needed more than one try, except the known Airflow race (see the harness).

    Returns (unexplained "run/task" names, number of tries lost to the Airflow race).
    """
    race = stack.stale_defer_exit_failures()
    extra_tries = {(r.run_id, t): r.try_number(t) - 1 for r in results.values() for t in r.tasks}
    unexplained = sorted(f"{run}/{task}" for (run, task), n in extra_tries.items() if n > race[run, task])
    return unexplained, sum(min(n, race[key]) for key, n in extra_tries.items())


def secrets_in(stack: AirflowStack, run_ids: list[str], dag_id: str = EXAMPLE_DAG) -> list[str]:
    """API keys or presigned signatures in these runs' task/trigger logs or any component log."""
    paths = [
        p
        for run in run_ids
        for p in (stack.logs_dir / f"dag_id={dag_id}" / f"run_id={run}").rglob("*")
        if p.is_file()
    ]
    paths += [p for p in stack.components_dir.glob("*.log")]
    return stack.find_secrets(paths)


def race_note(race: int) -> str:
    return (
        f" (except {race} wait tr{'y' if race == 1 else 'ies'} lost to Airflow race #72716)" if race else ""
    )


def assert_no_leftovers(stack: AirflowStack) -> None:
    """No partial/temporary file in any local destination, no unfinished S3 multipart upload."""
    partial = [str(p) for p in stack.data_dir.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert partial == [], f"partial files left behind: {partial}"
    assert stack.pending_multipart_uploads() == [], stack.pending_multipart_uploads()


def assert_nothing_left_or_leaked(
    stack: AirflowStack, run_ids: list[str], dag_id: str = EXAMPLE_DAG
) -> list[str]:
    """The checks that end every drill: nothing partial at any destination, no secret in the logs."""
    assert_no_leftovers(stack)
    secrets = secrets_in(stack, run_ids, dag_id)
    assert secrets == [], secrets
    return secrets


# -- the drills -------------------------------------------------------------------------------------


def test_drill_1_happy_path(stack: AirflowStack) -> None:
    """20 concurrent runs of the example DAG: all succeed, 20 executions, 20 verified files."""
    with drill(stack, "drill 1") as record:
        targets = destinations(stack, "drill1", 20)
        trigger_all(stack, "drill1", targets)
        results = stack.wait_for_runs(EXAMPLE_DAG, list(targets), timeout=900)
        succeeded, executions, files = check_outcome(stack, results, targets)
        retried, race = unexplained_retries(stack, results)
        assert retried == [], f"tasks needed a retry on the happy path: {retried}"
        stats = stack.server.stats()
        assert stats["executions_created"] == 20, stats
        assert stats["storage_requests_with_authorization"] == 0, stats
        secrets = assert_nothing_left_or_leaked(stack, list(targets))
    RESULTS.append(
        DrillResult(
            "1 happy path",
            20,
            succeeded,
            executions,
            files,
            len(secrets),
            record["seconds"],
            f"10 local + 10 S3 destinations; every task at try 1{race_note(race)}",
        )
    )


def test_drill_2_triggerer_killed(stack: AirflowStack) -> None:
    """SIGKILL the triggerer while every wait is deferred, restart it: the new one runs them all to the
    end, nothing paid twice. The executions (held DAG) run until the drill ends them, after the restart."""
    with drill(stack, "drill 2") as record:
        targets = destinations(stack, "drill2", 10)
        run_ids = list(targets)
        for run_id, destination in targets.items():
            stack.trigger(HELD_DAG, run_id, {"prompt": f"drill2: {run_id}", "destination": destination})
        assert stack.api is not None
        api_client = stack.api

        def waits() -> dict[str, dict[str, Any]]:
            return {ti["dag_run_id"]: ti for ti in api_client.task_instances(HELD_DAG, run_ids, "wait")}

        def describe_waits() -> str:
            shown = {
                run: (ti["state"], (ti.get("trigger") or {}).get("triggerer_id"))
                for run, ti in waits().items()
            }
            return f"wait tasks (state, triggerer job): {shown}"

        def running_triggers(exclude: set[int]) -> dict[str, int] | None:
            """run -> the triggerer job running its wait's trigger (not one of ``exclude``), once every
            wait is deferred and its trigger has started there (its trigger log for that job exists)."""
            found = {}
            for run, ti in waits().items():
                job = (ti.get("trigger") or {}).get("triggerer_id")
                started = job in stack.trigger_log_jobs(HELD_DAG, run, "wait")
                if ti["state"] == "deferred" and job and job not in exclude and started:
                    found[run] = int(job)
            return found if len(found) == len(run_ids) else None

        before = wait_for(
            "every wait to be deferred with its trigger running",
            lambda: running_triggers(set()),
            describe=describe_waits,
        )
        killed = stack.components["triggerer"].kill()
        killed_at = time.monotonic()
        # The triggerer is down until Airflow reports it (no heartbeat for the health threshold);
        # the deferred tasks must not fail meanwhile.
        wait_for(
            "Airflow to report the killed triggerer unhealthy",
            lambda: api_client.health()["triggerer"]["status"] == "unhealthy",
            describe=lambda: f"health: {api_client.health()}",
        )
        down_for = time.monotonic() - killed_at
        down_states = {run: ti["state"] for run, ti in waits().items()}
        assert set(down_states.values()) == {"deferred"}, down_states
        stack.restart("triggerer")
        adopted = wait_for(
            "the restarted triggerer to run every deferred wait",
            lambda: running_triggers(set(before.values())),
            describe=describe_waits,
        )
        # Only now do the executions end: the new triggerer's polls find them COMPLETED.
        for run_id, executions in stack.executions_by_run().items():
            for execution in executions if run_id in targets else []:
                stack.server.set_execution_status(execution["id"], "COMPLETED")
        results = stack.wait_for_runs(HELD_DAG, run_ids)
        recovered_in = time.monotonic() - killed_at
        succeeded, executions, files = check_outcome(stack, results, targets)
        retried, race = unexplained_retries(stack, results)
        assert retried == [], f"the triggerer's death cost task retries: {retried}"
        stats = stack.server.stats()
        assert stats["executions_created"] == 10, stats
        assert stats["cancels"] == {}, f"killing the triggerer cancelled executions: {stats['cancels']}"
        # Trigger logs are per triggerer job (attempt=1.log.trigger.<job id>.log): each wait's trigger
        # was begun by the old triggerer and run to its end by the new one.
        trigger_jobs = {run: stack.trigger_log_jobs(HELD_DAG, run, "wait") for run in run_ids}
        assert all(jobs == {before[run], adopted[run]} for run, jobs in trigger_jobs.items()), trigger_jobs
        secrets = assert_nothing_left_or_leaked(stack, run_ids, HELD_DAG)
    RESULTS.append(
        DrillResult(
            "2 triggerer SIGKILL + restart",
            10,
            succeeded,
            executions,
            files,
            len(secrets),
            record["seconds"],
            f"10 waits deferred, their triggers polling, at the kill ({len(killed)} processes killed); "
            f"none failed while Airflow saw the triggerer down ({down_for:.0f} s); the new triggerer ran "
            f"all {len(adopted)}, then the executions were ended; all runs done {recovered_in:.0f} s after "
            f"the kill; no task retry, no cancel{race_note(race)}",
        )
    )


def task_succeeded(stack: AirflowStack, run_id: str, task_id: str) -> bool:
    return stack.task_states(EXAMPLE_DAG, [run_id], task_id).get(run_id) == "success"


def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_drill_3_worker_killed_after_submit(stack: AirflowStack) -> None:
    """SIGKILL the submit task once the server has created its execution: the retry re-attaches."""
    # Past the connection's 10 s read timeout: every HTTP retry of the create times out in turn, so the
    # try hangs until its retry deadline (60 s), far longer than it takes to see it hang and kill it.
    slow = 12.0
    with drill(stack, "drill 3") as record:
        targets = destinations(stack, "drill3", 3)
        run_ids = list(targets)
        kills = []
        for run_id, destination in targets.items():
            assert stack.api is not None
            posts_before = stack.server.stats()["requests"].get("POST /v1/executions", 0)
            # The first answer is lost after the execution exists; the client's HTTP retries then hang,
            # and the worker is killed while it waits: the try never learns its execution's id.
            stack.server.add_fault("POST /v1/executions", "drop", count=1)
            stack.server.add_fault("POST /v1/executions", "slow", count=None, seconds=slow)
            stack.trigger(EXAMPLE_DAG, run_id, {"prompt": f"drill3: {run_id}", "destination": destination})

            def submitted_and_hanging(
                run_id: str = run_id, before: int = posts_before
            ) -> dict[str, Any] | None:
                posts = stack.server.stats()["requests"].get("POST /v1/executions", 0)
                if posts < before + 2 or run_id not in stack.executions_by_run():
                    return None
                ti = stack.api.task_instance(EXAMPLE_DAG, run_id, "submit") if stack.api else {}
                return ti if ti.get("state") == "running" and ti.get("pid") else None

            ti = wait_for(f"{run_id}'s submit to hang after creating", submitted_and_hanging, interval=0.2)
            pid = int(ti["pid"])
            assert ti["id"] in _proc_cmdline(pid), f"pid {pid} is not {run_id}'s task: {_proc_cmdline(pid)!r}"
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)
            stack.server.clear_faults()  # before the retry can start (retry_delay 1 s): it must get through
            # Let the retry re-attach before arming the next run's faults (they are global).
            wait_for(f"{run_id}'s submit retry", partial(task_succeeded, stack, run_id, "submit"))
        results = stack.wait_for_runs(EXAMPLE_DAG, run_ids)
        # The killed tries' held creates end on the server after their clients are gone (as idempotent
        # replays): wait for them, or one would land after the next drill's reset as a new execution.
        wait_for(
            "the server to have processed every create (each dropped one or an idempotent replay)",
            lambda: (
                (stats := stack.server.stats())["requests"]["POST /v1/executions"]
                == stats["executions_created"] + stats["idempotent_replays"]
            ),
            describe=lambda: f"server stats: {stack.server.stats()}",
        )
        succeeded, executions, files = check_outcome(stack, results, targets)
        tries = {r.run_id: r.try_number("submit") for r in results.values()}
        assert set(tries.values()) == {2}, f"submit should have run exactly twice: {tries}"
        stats = stack.server.stats()
        assert stats["executions_created"] == 3, stats
        assert stats["idempotent_replays"] >= 3, stats
        by_run = stack.executions_by_run()
        for run_id in run_ids:
            execution_id = by_run[run_id][0]["id"]
            logs = stack.task_logs(EXAMPLE_DAG, run_id, "submit")
            assert execution_id not in logs.get(1, ""), (
                f"try 1 of {run_id} should never have seen its execution"
            )
            assert execution_id in logs[2], f"try 2 of {run_id} did not re-attach to {execution_id}"
        secrets = assert_nothing_left_or_leaked(stack, run_ids)
    RESULTS.append(
        DrillResult(
            "3 worker SIGKILL after submit",
            3,
            succeeded,
            executions,
            files,
            len(secrets),
            record["seconds"],
            f"submit killed mid-request after the execution existed ({len(kills)} kills); try 2 re-attached "
            f"({stats['idempotent_replays']} idempotent replays)",
        )
    )


#: (endpoint, kind, count, params): at most 5 faults per endpoint, below max_retries (6): every
#: request outlasts them with HTTP retries alone, whichever request meets them.
API_FAULTS: list[tuple[str, str, int, dict[str, Any]]] = [
    ("POST /v1/executions", "rate_limit", 2, {"retry_after": 1}),
    ("POST /v1/executions", "error", 1, {"code": "SERVICE_UNAVAILABLE"}),
    ("POST /v1/executions", "drop", 1, {}),
    ("POST /v1/executions", "slow", 1, {"seconds": 12}),  # beyond the 10 s read timeout
    ("GET /v1/executions/{id}", "error", 2, {"code": "MODEL_OVERLOADED"}),
    ("GET /v1/executions/{id}", "rate_limit", 1, {"retry_after": 1}),
    ("GET /v1/executions/{id}", "drop", 1, {}),
    ("GET /v1/executions/{id}", "slow", 1, {"seconds": 2}),
    ("GET /v1/files/{file_id}/download", "rate_limit", 2, {"retry_after": 1}),
    ("GET /v1/files/{file_id}/download", "error", 1, {"code": "SERVICE_UNAVAILABLE"}),
    ("GET /v1/files/{file_id}/download", "drop", 1, {}),
    ("GET /v1/files/{file_id}/download", "slow", 1, {"seconds": 2}),
]
RETRY_LINE = re.compile(
    r"ModelRoute request failed \((?P<error>.*?)\); retry \d+ of \d+ in (?P<wait>[\d.]+) s"
)


def test_drill_4_api_faults(stack: AirflowStack) -> None:
    """429 bursts with Retry-After, 503s, dropped connections, slow answers: absorbed by HTTP retries."""
    with drill(stack, "drill 4") as record:
        for endpoint, kind, count, params in API_FAULTS:
            stack.server.add_fault(endpoint, kind, count=count, **params)
        injected = sum(count for _, _, count, _ in API_FAULTS)
        targets = destinations(stack, "drill4", 8)
        run_ids = list(targets)
        trigger_all(stack, "drill4", targets)
        results = stack.wait_for_runs(EXAMPLE_DAG, run_ids)
        succeeded, executions, files = check_outcome(stack, results, targets)
        retried, race = unexplained_retries(stack, results)
        assert retried == [], f"faults within the retry budget cost Airflow task retries: {retried}"
        stats = stack.server.stats()
        assert stats["executions_created"] == 8, stats
        assert stats["faults_fired"] == injected, (
            f"{stats['faults_fired']} of {injected} faults fired: {stats}"
        )
        assert stats["rate_limited"] == 5, stats
        # Retry-After is honoured: every retry after a 429 waited at least the second it asked for.
        waits = [
            float(match["wait"])
            for run in run_ids
            for task in ("submit", "wait", "store")
            for text in stack.task_logs(EXAMPLE_DAG, run, task).values()
            for match in RETRY_LINE.finditer(text)
            if "RATE_LIMITED" in match["error"]
        ]
        assert waits and min(waits) >= 1.0, f"waits after 429: {waits}"
        secrets = assert_nothing_left_or_leaked(stack, run_ids)
    RESULTS.append(
        DrillResult(
            "4 API faults",
            8,
            succeeded,
            executions,
            files,
            len(secrets),
            record["seconds"],
            f"{injected} faults (429 x5 with Retry-After 1 s, 503 x4, drops x3, slow x4 incl. one past "
            f"the read timeout) all absorbed by HTTP retries: every task at try 1; {len(waits)} logged "
            f"429 waits, "
            f"min {min(waits):.1f} s{race_note(race)}",
        )
    )


def add_failing_try(stack: AirflowStack) -> None:
    """Faults for one failing copy: 4000 bytes arrive, then the URL stays expired max_retries + 1 times."""
    stack.server.add_fault("GET /files/{file_id}", "truncate", count=1, after_bytes=4000)
    stack.server.add_fault("GET /files/{file_id}", "expire_url", count=MAX_RETRIES + 1)


def test_drill_5_storage_faults(stack: AirflowStack) -> None:
    """Truncated downloads and expired URLs: files correct, or a clean failure and a successful retry."""
    with drill(stack, "drill 5") as record:
        # A: 6 faults, fewer than max_retries in a row: every copy resumes / refreshes in-task.
        stack.server.add_fault("GET /files/{file_id}", "truncate", count=3, after_bytes=4000)
        stack.server.add_fault("GET /files/{file_id}", "expire_url", count=3)
        targets_a = destinations(stack, "drill5a", 6)
        trigger_all(stack, "drill5a", targets_a)
        results_a = stack.wait_for_runs(EXAMPLE_DAG, list(targets_a))
        ok_a, executions_a, files_a = check_outcome(stack, results_a, targets_a)
        assert {r.try_number("store") for r in results_a.values()} == {1}, "in-task recovery needed a retry"
        assert stack.server.stats()["faults_fired"] == 6, stack.server.stats()

        phase_a = time.monotonic() - record["started"]

        # B: part of the file, then max_retries + 1 expired URLs in a row: try 1 gives up cleanly
        # (the partial upload is discarded), try 2 copies the file.
        add_failing_try(stack)
        run_b = "drill5b-00"
        targets_b = {run_b: stack.s3_destination(f"drill5b/{run_b}")}
        trigger_all(stack, "drill5b", targets_b)
        results_b = stack.wait_for_runs(EXAMPLE_DAG, [run_b])
        ok_b, executions_b, files_b = check_outcome(stack, results_b, targets_b)
        assert results_b[run_b].try_number("store") == 2, results_b[run_b].tasks["store"]
        store_logs = stack.task_logs(EXAMPLE_DAG, run_b, "store")
        assert f"after {MAX_RETRIES + 1} failures in a row" in store_logs[1], store_logs[1][-3000:]

        phase_b = time.monotonic() - record["started"] - phase_a

        # C: every try writes part of the file, then fails: the run fails and nothing is at the
        # destination (no partial file); with the storage healthy again, clearing the task copies it.
        for _ in range(3):
            add_failing_try(stack)
        run_c = "drill5c-00"
        destination_c, folder_c = stack.local_destination(f"drill5c/{run_c}")
        stack.trigger(EXAMPLE_DAG, run_c, {"prompt": "drill5c", "destination": destination_c})
        failed_c = stack.wait_for_runs(EXAMPLE_DAG, [run_c])[run_c]
        assert failed_c.state == "failed" and failed_c.task_state("store") == "failed", failed_c.tasks
        assert failed_c.try_number("store") == 3, failed_c.tasks["store"]
        assert stack.stored_objects(destination_c) == {}, f"a failed copy left {os.listdir(folder_c)}"
        assert_no_leftovers(stack)
        stack.server.clear_faults()
        assert stack.api is not None
        stack.api.clear(EXAMPLE_DAG, run_c, ["store"])
        results_c = stack.wait_for_runs(EXAMPLE_DAG, [run_c])
        ok_c, executions_c, files_c = check_outcome(stack, results_c, {run_c: destination_c})

        phase_c = time.monotonic() - record["started"] - phase_a - phase_b
        stats = stack.server.stats()
        assert stats["executions_created"] == 8, stats
        assert stats["storage_requests_with_authorization"] == 0, stats
        secrets = assert_nothing_left_or_leaked(stack, [*targets_a, run_b, run_c])
    RESULTS.append(
        DrillResult(
            "5 storage faults",
            8,
            ok_a + ok_b + ok_c,
            executions_a + executions_b + executions_c,
            files_a + files_b + files_c,
            len(secrets),
            record["seconds"],
            f"A ({phase_a:.0f} s): 3 truncations + 3 expired URLs absorbed in-task, 6 runs, store at try 1; "
            f"B ({phase_b:.0f} s): a truncation + {MAX_RETRIES + 1} expired URLs fail try 1 cleanly, try 2 "
            f"copies; C ({phase_c:.0f} s): the same on all 3 tries, run failed with nothing at the "
            "destination, cleared task then copies",
        )
    )


#: task (or example-DAG run) -> text its log must show: the error names the fix.
BAD_INPUT_HINTS = {
    "unknown_model": "unknown model 'no-such-model'",
    "missing_connection": "connection 'modelroute_missing' does not exist: create it",
    "wrong_api_key": "check the API key in the Airflow connection's password field",
    "malformed_api_key": "check the API key in the Airflow connection's password field",
    "invalid_input": "input.prompt: is required and must be a non-empty string",
    "bad_destination": "destination 'nosuch://bucket/images/' cannot be opened",
}


def test_drill_6_bad_inputs(stack: AirflowStack) -> None:
    """Bad inputs fail at once (try 1 despite retries), name the fix, and leak no secret."""
    with drill(stack, "drill 6") as record:
        run_bad = "drill6-bad-inputs"
        stack.trigger(BAD_INPUTS_DAG, run_bad, {})
        run_invalid = "drill6-invalid-input"
        run_destination = "drill6-bad-destination"
        stack.trigger(
            EXAMPLE_DAG, run_invalid, {"prompt": "", "destination": stack.local_destination("drill6")[0]}
        )
        stack.trigger(
            EXAMPLE_DAG, run_destination, {"prompt": "drill6", "destination": "nosuch://bucket/images/"}
        )
        bad = stack.wait_for_runs(BAD_INPUTS_DAG, [run_bad])[run_bad]
        examples = stack.wait_for_runs(EXAMPLE_DAG, [run_invalid, run_destination])

        cases: dict[str, tuple[str, str, str, RunResult]] = {
            task: (BAD_INPUTS_DAG, run_bad, task, bad)
            for task in ("unknown_model", "missing_connection", "wrong_api_key", "malformed_api_key")
        }
        cases["invalid_input"] = (EXAMPLE_DAG, run_invalid, "submit", examples[run_invalid])
        cases["bad_destination"] = (EXAMPLE_DAG, run_destination, "store", examples[run_destination])
        problems = {}
        outcome = {}
        for case, (dag_id, run_id, task, run) in cases.items():
            ti = run.tasks[task]
            log = "".join(stack.task_logs(dag_id, run_id, task).values())
            outcome[case] = f"{ti['state']} at try {ti['try_number']} of {ti['max_tries'] + 1}"
            if run.state != "failed" or ti["state"] != "failed" or ti["try_number"] != 1:
                problems[case] = f"expected to fail at try 1, got {outcome[case]} (run {run.state})"
            elif BAD_INPUT_HINTS[case] not in log:
                problems[case] = f"the log does not name the fix ({BAD_INPUT_HINTS[case]!r})"
        stats = stack.server.stats()
        secrets = sorted(
            {
                *secrets_in(stack, [run_bad], BAD_INPUTS_DAG),
                *secrets_in(stack, [run_invalid, run_destination]),
                *stack.find_secrets(),  # and every log of the whole session
            }
        )
        record["outcome"] = outcome
        RESULTS.append(
            DrillResult(
                "6 bad inputs",
                len(cases),
                0,
                stats["executions_created"],
                0,
                len(secrets),
                time.monotonic() - record["started"],
                "; ".join(
                    f"{case}: {text}" + (" **(FAILED)**" if case in problems else "")
                    for case, text in outcome.items()
                ),
            )
        )
        assert secrets == [], secrets
        # Only the bad-destination run reaches the API with a valid request (its store task fails).
        assert stats["executions_created"] == 1, stats
        assert problems == {}, json.dumps(problems, indent=1)
