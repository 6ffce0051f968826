"""The distributed drills' batch: its settings, one run of it, and what is checked at its end.

``Batch`` triggers the batch DAG with one model input per item, watches its task instances through
the REST API, and at the end records a ``ScenarioResult``: run and task states, executions per item
on the server, every object at the destination against the server's sha256, 429 answers, requests,
makespan against the rate limit's estimate, and the CPU used.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_modelroute import api
from tests.drills.harness import TERMINAL_RUN_STATES, DrillError, wait_for
from tests.drills_distributed.stack import DistributedStack


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

AWAITING_WEBHOOK_SECONDS = 3.0
WORKER_CONCURRENCY = 4
HEARTBEAT_TIMEOUT = 40
QUEUED_TIMEOUT = 90
#: The fewest API requests an execution costs: its create, one status read, one file read.
REQUESTS_PER_EXECUTION = 3

DAG_ID = "drill_modelroute_batch"
GENERATE, STORE = "item.generate", "item.store"
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
    rate_estimate: float
    load: str
    notes: str
    problems: list[str] = field(default_factory=list)


RESULTS: list[ScenarioResult] = []


def durations() -> list[float]:
    """Each item's run time: evenly from MIN to MAX seconds, in a fixed shuffled order."""
    steps = max(ITEMS - 1, 1)
    order = random.Random(17).sample(range(ITEMS), ITEMS)
    return [MIN_SECONDS + (MAX_SECONDS - MIN_SECONDS) * rank / steps for rank in order]


def rate_estimate() -> float:
    """The issue's estimate of the best makespan: 3 requests per execution at the limit, plus the
    longest execution. Not a strict bound: the server's windows are fixed, so a batch that starts
    late in one window gets two windows' worth of requests in little over a minute."""
    return 60.0 * REQUESTS_PER_EXECUTION * ITEMS / RATE_LIMIT + MAX_SECONDS


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
        self.executions: list[dict[str, Any]] = []  # one per item, once checked

    @property
    def api(self) -> Any:
        assert self.stack.api is not None
        return self.stack.api

    def start(self) -> Batch:
        for name, component in self.stack.components.items():
            assert component.alive, f"{name} is not running before {self.name}"
        for run_id, run in self.api.runs(DAG_ID).items():
            if run["state"] not in TERMINAL_RUN_STATES:  # a failed scenario's: its tasks would hold the slots
                self.api.set_run_state(DAG_ID, run_id, "failed")
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

    def wait(self, what: str, check: Callable[[], Any], timeout: float = BATCH_TIMEOUT) -> Any:
        """Wait for ``check`` while printing progress every 30 s; fail if a component died. The batch's
        own time budget bounds every wait: a point "a quarter of the batch" in takes longer at 200."""

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
            rate_estimate=rate_estimate(),
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
            if truth is None or (len(data), hashlib.sha256(data).hexdigest()) != (
                truth["size_bytes"],
                truth["sha256"],
            ):
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
    """``total (creates / status reads / file reads)``: what the executions cost against the limit.

    A file read is the request that gets an output's bytes or its storage URL (either endpoint).
    """
    files = requests.get("GET /v1/files/{file_id}/download", 0) + requests.get(
        "GET /v1/files/{file_id}/url", 0
    )
    kinds = (requests.get("POST /v1/executions", 0), requests.get("GET /v1/executions/{id}", 0), files)
    return f"{sum(requests.values())} ({' / '.join(str(n) for n in kinds)})"
