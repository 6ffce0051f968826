"""Distributed drills: a batch of mapped executions on Airflow scaled out (PostgreSQL, CeleryExecutor
with two workers, two triggerers) against the local ModelRoute server with its rate limit on.

    make drills-distributed
    MODELROUTE_DRILLS_DISTRIBUTED=1 .venv/bin/python -m pytest tests/drills_distributed -q -x -s

One cluster serves the four scenarios in turn (the server is reset before each): the batch undisturbed,
a triggerer SIGKILLed while it holds about half of the waits, a Celery worker SIGKILLed during
submissions and again during transfers, and the ModelRoute API failing (5xx, dropped connections)
for 30 s mid-batch. Correctness is asserted (every run and task succeeds, exactly one execution per
item, every stored object complete and sha256-verified, nothing partial). The 429 answers the shared key
gets are counted, and each must be absorbed: beyond the above, the scenarios that inject no API or
worker fault (undisturbed, triggerer-kill) must end with no task retried. The makespan against the
rate limit's estimate is measured. The table is printed and written to ``build/``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.airflow_versions import AIRFLOW_V_3_0_PLUS
from tests.drills.harness import REPO, wait_for
from tests.drills_distributed.batch import (
    AWAITING_WEBHOOK_SECONDS,
    BATCH_TIMEOUT,
    DAG_ID,
    GENERATE,
    HEARTBEAT_TIMEOUT,
    ITEMS,
    MAX_SECONDS,
    MIN_SECONDS,
    QUEUED_TIMEOUT,
    RATE_LIMIT,
    RESULTS,
    STORE,
    WORKER_CONCURRENCY,
    Batch,
    ScenarioResult,
)
from tests.drills_distributed.stack import DistributedStack, describe_versions

ENABLE = "MODELROUTE_DRILLS_DISTRIBUTED"


pytestmark = [
    pytest.mark.drill,
    pytest.mark.timeout(BATCH_TIMEOUT + 900),  # the batch, what precedes it, and the stack's start
    pytest.mark.skipif(
        not AIRFLOW_V_3_0_PLUS,
        reason="the drills run Airflow 3's own components (api-server, dag-processor, execution API)",
    ),
    pytest.mark.skipif(
        not os.environ.get(ENABLE),
        reason=f"~15 min, starts PostgreSQL and Redis: run with `make drills-distributed` ({ENABLE}=1)",
    ),
]

OUTAGE_SECONDS = 30
#: The triggerer is killed once this many waits are deferred (or half a smaller batch): eight worker
#: slots submitting executions of 5-60 s keep a few dozen deferred at once, whatever the batch size.
KILL_AT_DEFERRED = 12
RESULTS_FILE = REPO / "build" / "drill-distributed-results.md"


SESSION: dict[str, Any] = {}


def results_table() -> str:
    lines = [
        "| scenario | run | tasks succeeded | tasks retried | executions created | partial/corrupt "
        "objects | objects verified | 429 answers (tasks / triggers) | API requests (creates / status "
        "reads / file reads) | makespan | rate-limit estimate | load | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS:
        by = r.rate_limited_by
        notes = r.notes + (f" **FAILED: {'; '.join(r.problems)}**" if r.problems else "")
        lines.append(
            f"| {r.name} | {r.run_state} | {r.tasks_ok} | {r.retried} | {r.executions} | {r.partial} | "
            f"{r.verified} | {r.rate_limited} ({by.get('tasks', 0)} / {by.get('triggers', 0)}) | "
            f"{r.requests} | {r.makespan / 60:.1f} min | {r.rate_estimate / 60:.1f} min | {r.load} | "
            f"{notes} |"
        )
    return "\n".join(lines)


def write_results() -> None:
    from tests.drills_distributed.dags.drill_modelroute_batch import POLL_INTERVAL  # defines the DAG

    versions = ", ".join(f"{k} {v}" for k, v in SESSION.get("versions", {}).items())
    setup = ", ".join(f"{k} {v:.0f} s" for k, v in SESSION.get("timings", {}).items())
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(
        f"# Distributed drill results ({time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs)\n\n"
        f"Versions: {versions}.\n"
        f"Batch: {ITEMS} mapped executions, one API key at {RATE_LIMIT} requests/min, "
        f"executions {MIN_SECONDS:.0f}-{MAX_SECONDS:.0f} s (+{AWAITING_WEBHOOK_SECONDS:.0f} s "
        f"AWAITING_WEBHOOK), poll interval {POLL_INTERVAL} s; 2 Celery workers x {WORKER_CONCURRENCY} slots, "
        f"2 triggerers.\nSetup: {setup}. Total: {SESSION.get('total', 0) / 60:.1f} min.\n\n"
        f"{results_table()}\n"
    )


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[DistributedStack]:
    failed_before = request.session.testsfailed
    stack = DistributedStack(
        rate_limit=RATE_LIMIT,
        awaiting_webhook_seconds=AWAITING_WEBHOOK_SECONDS,
        worker_concurrency=WORKER_CONCURRENCY,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        queued_timeout=QUEUED_TIMEOUT,
    )
    print(f"\nDistributed drill stack: AIRFLOW_HOME {stack.home}")
    started = time.monotonic()
    try:
        SESSION["versions"] = describe_versions()  # installs PostgreSQL and Redis if missing
        SESSION["timings"] = {"install": time.monotonic() - started}
        stack.start()
        SESSION["timings"]["start-up"] = stack.timings["startup"]
        assert stack.api is not None
        stack.api.unpause(DAG_ID)
    except BaseException:
        print(f"\nThe stack did not start; its home is kept at {stack.home}\n{stack.tails(60)}")
        stack.stop()
        raise
    yield stack
    stack.stop()
    SESSION["total"] = time.monotonic() - started
    write_results()
    kept = request.session.testsfailed != failed_before or os.environ.get("MODELROUTE_DRILLS_KEEP")
    if not kept:
        stack.cleanup()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n\n{results_table()}\n(written to {RESULTS_FILE})")
        if kept:
            print(f"Drill logs kept in {stack.home}")


def assert_correct(result: ScenarioResult) -> None:
    assert result.problems == [], f"{result.name}: {result.problems}"


# -- the scenarios -----------------------------------------------------------------------------------


def test_1_undisturbed(stack: DistributedStack) -> None:
    """The batch alone: every run and task succeeds at the first try, one execution per item (so
    every 429 the shared key met was absorbed by the clients' own waits)."""
    batch = Batch(stack, "undisturbed").start()
    result = batch.finish("nothing injected", allow_retries=False)
    assert_correct(result)


def triggerer_names(stack: DistributedStack) -> dict[int, str]:
    """Triggerer job id -> the component that runs it (each names itself, see ``DistributedStack``)."""
    assert stack.api is not None
    jobs = stack.api.get("/api/v2/jobs", job_type="TriggererJob", limit=1000)["jobs"]
    return {int(job["id"]): str(job["hostname"]) for job in jobs}


def waits_by_triggerer(batch: Batch) -> Counter[str]:
    """Deferred ``generate`` tasks per triggerer component holding their trigger."""
    names = triggerer_names(batch.stack)
    held: Counter[str] = Counter()
    for ti in batch.task_instances(GENERATE):
        triggerer_id = (ti.get("trigger") or {}).get("triggerer_id")
        if ti["state"] == "deferred" and triggerer_id is not None:
            held[names.get(int(triggerer_id), f"job {triggerer_id}")] += 1
    return held


def test_2_triggerer_killed(stack: DistributedStack) -> None:
    """SIGKILL the triggerer holding the most waits once half the batch is deferred: the other
    triggerer adopts them, and the batch ends as undisturbed (no task retried, nothing paid twice,
    every 429 absorbed though the survivor starts its waits without knowing the key's window)."""
    batch = Batch(stack, "triggerer-kill").start()

    def spread() -> Counter[str] | None:
        """The waits per triggerer, once both hold some and half the batch (at most KILL_AT_DEFERRED,
        or all that is left once every execution is submitted) is deferred."""
        held = waits_by_triggerer(batch)
        deferred = sum(held.values())
        if not all(held[name] for name in stack.TRIGGERERS):
            return None
        submitted = stack.server.stats()["executions_created"] == ITEMS
        enough = deferred >= min(ITEMS // 2, KILL_AT_DEFERRED) or (submitted and deferred >= 4)
        return held if enough else None

    held = batch.wait("waits deferred on both triggerers", spread)
    victim, _ = held.most_common(1)[0]
    survivor = next(name for name in stack.TRIGGERERS if name != victim)
    stack.components[victim].kill()
    killed_at = time.monotonic()
    print(f"SIGKILLed {victim} holding {held[victim]} of {sum(held.values())} deferred waits", flush=True)

    def adopted() -> bool:
        now_held = waits_by_triggerer(batch)
        return now_held[victim] == 0 and (now_held[survivor] > 0 or batch.run_state() != "running")

    # The dead triggerer's job stops heartbeating; after the health threshold its triggers are free.
    batch.down.add(victim)
    batch.wait(f"{survivor} to take over {victim}'s waits", adopted, timeout=300)
    moved_after = time.monotonic() - killed_at
    result = batch.finish(
        f"{victim} SIGKILLed holding {held[victim]} of {sum(held.values())} deferred waits "
        f"({held[survivor]} on {survivor}); {survivor} held them all {moved_after:.0f} s later",
        allow_retries=False,
    )
    stack.restart(victim)
    wait_for(f"{victim} back", stack.healthy, timeout=180, interval=2, describe=stack.tails)
    assert_correct(result)


def worker_tasks(batch: Batch, task_id: str) -> Counter[str]:
    """Running task instances of ``task_id`` per Celery worker (the hostname the task recorded)."""
    return Counter(str(ti["hostname"]) for ti in batch.task_instances(task_id) if ti["state"] == "running")


def kill_worker(batch: Batch, worker: str, what: str) -> None:
    """SIGKILL a Celery worker with everything it started, then restart it (as a supervisor would)."""
    pids = batch.stack.components[worker].kill()
    print(f"SIGKILLed {worker} ({len(pids)} processes) {what}", flush=True)
    batch.stack.restart(worker)


def kill_worker_mid_submission(batch: Batch) -> tuple[str, list[int]]:
    """Lose every create's answer (the execution exists; the client retries) until a worker runs a
    submission whose execution exists, then SIGKILL that worker: that try never learns its id.

    Returns the worker and the items whose tries were killed after their execution was created.
    """
    stack = batch.stack
    submitted = {"deferred", "success"}
    batch.wait(
        "a quarter of the batch submitted", lambda: count_states(batch, GENERATE, submitted) >= ITEMS // 4
    )
    created_before = set(batch.executions_by_item())
    stack.server.add_fault("POST /v1/executions", "drop", count=None)

    def caught() -> tuple[str, list[int]] | None:
        lost_answers = set(batch.executions_by_item()) - created_before  # created while answers drop
        hanging: dict[str, list[int]] = {}
        for ti in batch.task_instances(GENERATE):
            if ti["state"] == "running" and ti["map_index"] in lost_answers:
                hanging.setdefault(str(ti["hostname"]), []).append(int(ti["map_index"]))
        return max(hanging.items(), key=lambda found: len(found[1])) if hanging else None

    worker, items = batch.wait("a worker running a submission whose answer was lost", caught)
    kill_worker(batch, worker, f"while {len(items)} submissions waited for a lost answer (items {items})")
    stack.server.clear_faults()
    return worker, items


def kill_worker_mid_transfer(batch: Batch) -> tuple[str, int]:
    """Once a quarter of the outputs are stored, SIGKILL the worker running the most copies."""
    done = {"success"}

    def copying() -> tuple[str, int] | None:
        if count_states(batch, STORE, done) < ITEMS // 4:
            return None
        running = [(w, n) for w, n in worker_tasks(batch, STORE).most_common() if w in batch.stack.WORKERS]
        return running[0] if running else None

    worker, running = batch.wait("a worker copying outputs", copying)
    kill_worker(batch, worker, f"while it ran {running} copies")
    return worker, running


def count_states(batch: Batch, task_id: str, states: set[str]) -> int:
    return sum(1 for ti in batch.task_instances(task_id) if ti["state"] in states)


def test_3_worker_killed(stack: DistributedStack) -> None:
    """SIGKILL a Celery worker during submissions, and one during transfers (each restarted at once):
    the killed tries are failed by the scheduler and retried; every retry re-attaches or re-copies."""
    batch = Batch(stack, "worker-kill").start()
    first, orphaned = kill_worker_mid_submission(batch)
    second, copies = kill_worker_mid_transfer(batch)
    result = batch.finish(
        f"SIGKILLed {first} while {len(orphaned)} of its submissions had created their execution but "
        f"lost the answer, then {second} while it ran {copies} copies (both restarted at once); "
        f"{stack.server.stats()['idempotent_replays']} idempotent replays"
    )
    tries = {ti["map_index"]: ti["try_number"] for ti in batch.task_instances(GENERATE)}
    if any(tries[item] < 2 for item in orphaned):
        result.problems.append(f"killed submissions were not retried: {tries}")
    if stack.server.stats()["idempotent_replays"] < 1:
        result.problems.append("no retry re-attached to its execution")
    wait_for("both workers back", stack.healthy, timeout=180, interval=2, describe=stack.tails)
    assert_correct(result)


#: What the ModelRoute server does to every request during the outage.
OUTAGE_FAULTS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST /v1/executions", "drop", {}),  # the execution is created, the answer is lost
    ("GET /v1/executions/{id}", "error", {"code": "SERVICE_UNAVAILABLE"}),
    ("GET /v1/files/{file_id}/url", "error", {"code": "MODEL_OVERLOADED"}),
    ("GET /v1/files/{file_id}/download", "drop", {}),
    ("GET /files/{file_id}", "drop", {}),  # the storage host
]


def test_4_api_outage(stack: DistributedStack) -> None:
    """For 30 s mid-batch every API answer is a 5xx or a dropped connection: absorbed by HTTP
    retries, poll tolerance and task retries; no execution lost or duplicated."""
    batch = Batch(stack, "api-outage").start()
    batch.wait(
        "a quarter of the batch submitted and a copy done",
        lambda: (
            count_states(batch, GENERATE, {"deferred", "success"}) >= ITEMS // 4
            and count_states(batch, STORE, {"success"}) >= 1
        ),
    )
    for endpoint, kind, params in OUTAGE_FAULTS:
        stack.server.add_fault(endpoint, kind, count=None, **params)
    outage_end = time.monotonic() + OUTAGE_SECONDS
    print(f"API outage for {OUTAGE_SECONDS} s", flush=True)
    # The outage lasts a fixed time by definition; meanwhile the components must stay up.
    batch.wait(f"the {OUTAGE_SECONDS} s outage to pass", lambda: time.monotonic() >= outage_end)
    stack.server.clear_faults()
    fired = stack.server.stats()["faults_fired"]
    result = batch.finish(f"{fired} requests failed during the {OUTAGE_SECONDS} s outage")
    assert_correct(result)
