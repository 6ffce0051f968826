"""Distributed drills: a batch of mapped executions on Airflow scaled out (PostgreSQL, CeleryExecutor
with two workers, two triggerers) against the local ModelRoute server with its rate limit on.

    make drills-distributed
    MODELROUTE_DRILLS_DISTRIBUTED=1 .venv/bin/python -m pytest tests/drills_distributed -q -x -s

One cluster serves the four scenarios in turn (the server is reset before each): the batch undisturbed,
a triggerer SIGKILLed while it holds about half of the waits, a Celery worker SIGKILLed during
submissions and again during transfers, and the ModelRoute API failing (5xx, dropped connections)
for 30 s mid-batch. Correctness is asserted (every run and task succeeds, exactly one execution per
item, every stored object complete and sha256-verified, nothing partial); 429 answers and the makespan
against its lower bound are measured. The table is printed and written to ``build/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modelroute import api
from airflow_provider_modelroute._compat import AIRFLOW_V_3_0_PLUS
from tests.drills.harness import REPO, TERMINAL_RUN_STATES, DrillError, wait_for
from tests.drills_distributed.stack import DistributedStack, describe_versions

ENABLE = "MODELROUTE_DRILLS_DISTRIBUTED"


def _setting(name: str, default: float) -> float:
    return float(os.environ.get(f"MODELROUTE_DISTRIBUTED_{name}", default))


#: The batch: this many mapped executions per scenario, all on one API key.
ITEMS = int(_setting("ITEMS", 25))
#: The documented limit: requests per minute per key (every /v1 answer carries X-RateLimit-*).
RATE_LIMIT = int(_setting("RATE_LIMIT", 60))
#: How long the server runs each execution: from MIN to MAX seconds, mixed over the batch's order.
MIN_SECONDS = _setting("MIN_SECONDS", 5)
MAX_SECONDS = _setting("MAX_SECONDS", 60)
#: How long one scenario's batch may take to end.
BATCH_TIMEOUT = _setting("BATCH_TIMEOUT", 900)

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

AWAITING_WEBHOOK_SECONDS = 3.0
WORKER_CONCURRENCY = 4
HEARTBEAT_TIMEOUT = 40
QUEUED_TIMEOUT = 90
OUTAGE_SECONDS = 30
#: The fewest API requests an execution costs: its create, one status read, one file URL.
REQUESTS_PER_EXECUTION = 3

DAG_ID = "drill_modelroute_batch"
GENERATE, STORE = "item.generate", "item.store"
RESULTS_FILE = REPO / "build" / "drill-distributed-results.md"
RETRY_LINE = re.compile(r"ModelRoute request failed \((?P<error>[^)]*)")


@dataclass
class ScenarioResult:
    name: str
    run_state: str
    tasks_ok: str
    retried: int
    executions: int
    partial: int
    verified: int
    rate_limited: int
    rate_limited_by: dict[str, int]
    requests: str
    makespan: float
    lower_bound: float
    load: str
    notes: str
    problems: list[str] = field(default_factory=list)


RESULTS: list[ScenarioResult] = []
SESSION: dict[str, Any] = {}


def durations() -> list[float]:
    """Each item's run time: evenly from MIN to MAX seconds, in a fixed shuffled order."""
    steps = max(ITEMS - 1, 1)
    order = random.Random(17).sample(range(ITEMS), ITEMS)
    return [MIN_SECONDS + (MAX_SECONDS - MIN_SECONDS) * rank / steps for rank in order]


def lower_bound() -> float:
    """Seconds the rate limit and the longest execution impose: 3 requests per execution at the limit."""
    return 60.0 * REQUESTS_PER_EXECUTION * ITEMS / RATE_LIMIT + MAX_SECONDS


def results_table() -> str:
    lines = [
        "| scenario | run | tasks succeeded | tasks retried | executions created | partial/corrupt "
        "objects | objects verified | 429 answers (tasks / triggers) | API requests (creates / status "
        "reads / file URLs) | makespan | lower bound | load | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS:
        by = r.rate_limited_by
        notes = r.notes + (f" **FAILED: {'; '.join(r.problems)}**" if r.problems else "")
        lines.append(
            f"| {r.name} | {r.run_state} | {r.tasks_ok} | {r.retried} | {r.executions} | {r.partial} | "
            f"{r.verified} | {r.rate_limited} ({by.get('tasks', 0)} / {by.get('triggers', 0)}) | "
            f"{r.requests} | {r.makespan / 60:.1f} min | {r.lower_bound / 60:.1f} min | {r.load} | "
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


class CpuMeter:
    """CPU use between two points: the machine's (everyone's) and the stack's own processes'."""

    def __init__(self, stack: DistributedStack) -> None:
        self.stack = stack
        self.start = self._read()
        self.stack_start = stack.cpu_seconds()

    @staticmethod
    def _read() -> tuple[float, float]:
        fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    def describe(self) -> str:
        """Machine busy %, 1-min load, and the CPU seconds the stack's surviving sessions used."""
        total, idle = self._read()
        busy = 1 - (idle - self.start[1]) / max(total - self.start[0], 1)
        used = sum(cpu - self.stack_start.get(sid, 0.0) for sid, cpu in self.stack.cpu_seconds().items())
        return f"machine {100 * busy:.0f}% busy, load {os.getloadavg()[0]:.1f}; stack {used:.0f} CPU-s"


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
        SESSION["versions"] = describe_versions()
        stack.start()
        SESSION["timings"] = {"start-up": stack.timings["startup"]}
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


class Batch:
    """One run of the batch DAG: trigger it, watch its task instances, check everything at the end."""

    def __init__(self, stack: DistributedStack, name: str) -> None:
        self.stack = stack
        self.name = name
        self.run_id = f"{name}-batch"
        self.destination = stack.s3_destination(name)
        self.prefix = self.destination.split("modelroute-drills/", 1)[1]
        self.started = 0.0
        self.cpu: CpuMeter | None = None
        self.last_progress = 0.0
        self.down: set[str] = set()  # components a scenario killed on purpose and left down

    @property
    def api(self) -> Any:
        assert self.stack.api is not None
        return self.stack.api

    def start(self) -> Batch:
        for name, component in self.stack.components.items():
            assert component.alive, f"{name} is not running before {self.name}"
        self.stack.server.reset()
        inputs = [
            {"prompt": f"{self.name} item {i}", "_simulate": {"seconds": seconds}}
            for i, seconds in enumerate(durations())
        ]
        conf = {"inputs": inputs, "destination": self.destination}
        self.cpu = CpuMeter(self.stack)
        self.started = time.monotonic()
        self.stack.trigger(DAG_ID, self.run_id, conf)
        return self

    # -- observing --------------------------------------------------------------------------------

    def task_instances(self, task_id: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while True:
            params: dict[str, Any] = {"limit": 1000, "offset": len(found)}
            if task_id:
                params["task_id"] = task_id
            page = self.api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{self.run_id}/taskInstances", **params)
            found += page["task_instances"]
            if not page["task_instances"] or len(found) >= page["total_entries"]:
                return found

    def progress(self) -> str:
        counts = Counter((ti["task_id"], ti["state"]) for ti in self.task_instances())
        shown = ", ".join(f"{task} {state}: {n}" for (task, state), n in sorted(counts.items(), key=str))
        stats = self.stack.server.stats()
        return (
            f"[{self.name} +{time.monotonic() - self.started:.0f} s] {shown}; executions "
            f"{stats['executions_created']}, 429s {stats['rate_limited']}"
        )

    def report_progress(self) -> None:
        if time.monotonic() - self.last_progress >= 30:
            self.last_progress = time.monotonic()
            print(self.progress(), flush=True)

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 600) -> Any:
        """Wait for ``check`` while printing progress every 30 s; fail if a component died."""

        def checked() -> Any:
            self.check_components()
            self.report_progress()
            return check()

        return wait_for(what, checked, timeout=timeout, interval=1, describe=self.describe)

    def check_components(self) -> None:
        for name, component in self.stack.components.items():
            if name not in self.down and not component.alive:
                raise DrillError(f"{name} exited:\n{component.tail()}")

    def describe(self) -> str:
        return f"{self.progress()}\n{self.stack.tails()}"

    def run_state(self) -> str:
        return str(self.api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{self.run_id}")["state"])

    def wait_done(self) -> str:
        state = self.wait(
            f"run {self.run_id} to end",
            lambda: (s := self.run_state()) in TERMINAL_RUN_STATES and s,
            timeout=BATCH_TIMEOUT,
        )
        return str(state)

    # -- the end-of-batch checks ------------------------------------------------------------------

    def finish(self, notes: str, allow_retries: bool = True) -> ScenarioResult:
        state = self.wait_done()
        makespan = time.monotonic() - self.started
        assert self.cpu is not None
        load = self.cpu.describe()
        problems: list[str] = []
        tis = self.task_instances()
        by_task: dict[str, Counter[str]] = {}
        for ti in tis:
            by_task.setdefault(ti["task_id"], Counter())[str(ti["state"])] += 1
        tasks_ok = ", ".join(f"{t} {c['success']}/{sum(c.values())}" for t, c in sorted(by_task.items()))
        for task_id in (GENERATE, STORE):
            if by_task.get(task_id, Counter())["success"] != ITEMS:
                problems.append(f"{task_id}: {dict(by_task.get(task_id, {}))}")
        if state != "success":
            problems.append(f"run {state}")
        retried = sum(1 for ti in tis if int(ti["try_number"]) > 1)
        if retried and not allow_retries:
            problems.append(f"{retried} tasks needed a retry")

        executions, execution_problems = self.check_executions()
        problems += execution_problems
        verified, partial, object_problems = self.check_objects()
        problems += object_problems
        stats = self.stack.server.stats()
        if stats["cancels"]:
            problems.append(f"executions cancelled: {stats['cancels']}")
        result = ScenarioResult(
            name=self.name,
            run_state=state,
            tasks_ok=tasks_ok,
            retried=retried,
            executions=executions,
            partial=partial,
            verified=verified,
            rate_limited=int(stats["rate_limited"]),
            rate_limited_by=self.rate_limited_by_side(),
            requests=describe_requests(stats["requests"]),
            makespan=makespan,
            lower_bound=lower_bound(),
            load=load,
            notes=notes,
            problems=problems,
        )
        RESULTS.append(result)
        print(f"{self.name}: {result}", flush=True)
        return result

    def executions_by_item(self) -> dict[int, list[dict[str, Any]]]:
        """The server's executions of this run, by the item (map index) in their metadata."""
        by_item: dict[int, list[dict[str, Any]]] = {}
        for execution_id in self.stack.server.execution_ids():
            execution = self.stack.server.execution(execution_id)
            metadata = execution.get("metadata") or {}
            if metadata.get("run_id") == self.run_id:
                by_item.setdefault(int(metadata["item"]), []).append(execution)
        return by_item

    def check_executions(self) -> tuple[int, list[str]]:
        """Exactly one execution per item: none lost, none paid twice."""
        by_item = self.executions_by_item()
        count = sum(len(found) for found in by_item.values())
        problems = []
        duplicated = {item: [e["id"] for e in found] for item, found in by_item.items() if len(found) > 1}
        if duplicated:
            problems.append(f"items with more than one execution: {duplicated}")
        missing = sorted(set(range(ITEMS)) - set(by_item))
        if missing:
            problems.append(f"items without an execution: {missing}")
        if count != ITEMS:
            problems.append(f"{count} executions created, expected {ITEMS}")
        self.executions = [found[0] for found in by_item.values()]
        return count, problems

    def check_objects(self) -> tuple[int, int, list[str]]:
        """(verified, partial or corrupt, problems): every object is one execution's file, whole."""
        expected = {f"{f['file_id']}.png": f["file_id"] for e in self.executions for f in api.result_files(e)}
        stored = self.stack.stored_objects(self.destination)
        bad = []
        for name, data in stored.items():
            file_id = expected.get(name)
            truth = self.stack.server.file_info(file_id) if file_id else None
            whole = truth is not None and len(data) == truth["size_bytes"]
            if not whole or hashlib.sha256(data).hexdigest() != truth["sha256"]:
                bad.append(name)
        pending = [key for key in self.stack.pending_multipart_uploads() if key.startswith(self.prefix)]
        problems = []
        if bad or pending:
            problems.append(f"partial or corrupt objects: {bad}, unfinished uploads: {pending}")
        missing = sorted(set(expected) - set(stored))
        if missing:
            problems.append(f"{len(missing)} outputs not stored: {missing[:5]}...")
        return len(stored) - len(bad), len(bad) + len(pending), problems

    def rate_limited_by_side(self) -> dict[str, int]:
        """429 answers that tasks (workers) and triggers logged a retry for (the server counts them all)."""
        counts: Counter[str] = Counter()
        folder = self.stack.logs_dir / f"dag_id={DAG_ID}" / f"run_id={self.run_id}"
        for path in folder.rglob("*.log"):
            side = "triggers" if ".log.trigger." in path.name else "tasks"
            text = path.read_text(errors="replace")
            counts[side] += sum(1 for m in RETRY_LINE.finditer(text) if "RATE_LIMITED" in m["error"])
        return dict(counts)


def describe_requests(requests: dict[str, int]) -> str:
    """``total (creates / status reads / file URLs)``: what the executions cost against the limit."""
    kinds = ("POST /v1/executions", "GET /v1/executions/{id}", "GET /v1/files/{file_id}/url")
    return f"{sum(requests.values())} ({' / '.join(str(requests.get(kind, 0)) for kind in kinds)})"


def assert_correct(result: ScenarioResult) -> None:
    assert result.problems == [], f"{result.name}: {result.problems}"


# -- the scenarios -----------------------------------------------------------------------------------


def test_1_undisturbed(stack: DistributedStack) -> None:
    """The batch alone: every run and task succeeds at the first try, one execution per item."""
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
    triggerer adopts them, and the batch ends as undisturbed (nothing failed, nothing paid twice)."""
    batch = Batch(stack, "triggerer-kill").start()

    def spread() -> Counter[str] | None:
        """The waits per triggerer, once both hold some and half the batch (or all that is left once
        every execution is submitted) is deferred."""
        held = waits_by_triggerer(batch)
        deferred = sum(held.values())
        if not all(held[name] for name in stack.TRIGGERERS):
            return None
        submitted = stack.server.stats()["executions_created"] == ITEMS
        return held if deferred >= ITEMS // 2 or (submitted and deferred >= 4) else None

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
        f"({held[survivor]} on {survivor}); {survivor} held them all {moved_after:.0f} s later"
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
