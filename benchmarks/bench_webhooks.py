"""Webhooks vs polling: N deferred waits whose executions finish at random times, under a rate limit.

N executions are submitted up front, each finishing at a uniformly random time within the horizon
(5 minutes). The local server limits ``GET /v1/executions/{id}`` (the status reads that waits make)
to 60 per minute per API key; submitting is not limited (a second key creates the executions).

* polling: N ``ModelRouteExecutionTrigger`` (poll interval 5 s, the docs' advice for small apps)
  in one event loop, as a triggerer runs them, sharing one rate budget. A wait ends at its event.
* webhooks: the same N waits in webhook mode (10-minute safety net). The receiver runs in its own
  process (uvicorn, as in the api-server) on a real Airflow metadata DB (SQLite) holding N deferred
  task instances; the server delivers signed webhooks to it (each execution's ``webhook_url`` and the
  registered endpoint). A wait ends when the receiver resumes its task instance (``scheduled_dttm``).
  Outside a triggerer the trigger cannot read the early-event XCom: it goes straight to its net.

The lower bound is the last execution's finish. Makespan: from the last submit to the end of the
last wait. Each case runs in a fresh child interpreter.

    python benchmarks/bench_webhooks.py            # N = 1,000 within 5 minutes, 60 reads/min
    python benchmarks/bench_webhooks.py --quick    # N = 40 within 10 s, 60 reads per 5 s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

STATUS_READS = "GET /v1/executions/{id}"
CONN_ID = "modelroute_bench"
DAG_ID = "bench_webhooks"
RUN_ID = "bench"


def _create(base_url: str, api_key: str, webhook_urls: list[str | None]) -> list[str]:
    """Submit one execution per entry; each stays PROCESSING until the run ends it (admin API)."""
    import requests

    ids = []
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {api_key}"
        for url in webhook_urls:
            body: dict[str, Any] = {
                "model": "test-file",
                "input": {"size_bytes": 1, "_simulate": {"seconds": 86400}},
            }
            if url:
                body["webhook_url"] = url
            response = session.post(f"{base_url}/v1/executions", json=body, timeout=30)
            response.raise_for_status()
            ids.append(response.json()["id"])
    return ids


# -- the webhook case's Airflow side: a metadata DB with N deferred task instances ----------------------


def _deferred_task_instances(n: int) -> list[Any]:
    """A fresh metadata DB holding one run of a DAG with N tasks, each deferred on a webhook-mode trigger."""
    import sqlite3

    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.dagbag import DBDagBag
    from airflow.providers.common.compat.sdk import DAG
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.utils import db
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType

    db.resetdb()
    with contextlib.closing(sqlite3.connect(os.path.join(os.environ["AIRFLOW_HOME"], "airflow.db"))) as conn:
        conn.execute("PRAGMA journal_mode=WAL")  # the receiver writes while this process reads
    DagBundlesManager().sync_bundles_to_db()
    dag = DAG(DAG_ID, schedule=None, start_date=datetime(2026, 1, 1, tzinfo=timezone.utc))
    with dag:
        for index in range(n):
            EmptyOperator(task_id=f"wait_{index}")
    bag = DagBag(dag_folder=os.devnull)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    with create_session() as session:
        serialized = DBDagBag().get_latest_version_of_dag(DAG_ID, session=session)
        run = serialized.create_dagrun(
            run_id=RUN_ID,
            run_type=DagRunType.MANUAL,
            triggered_by=DagRunTriggeredByType.TEST,
            state=DagRunState.RUNNING,
            run_after=datetime.now(timezone.utc),
            session=session,
        )
        tis = sorted(run.get_task_instances(session=session), key=lambda ti: int(ti.task_id.split("_")[1]))
        for ti in tis:
            session.expunge(ti)
    return tis


def _defer(tis: list[Any], triggers: list[Any]) -> None:
    """Defer each task instance on its trigger, as Airflow does (a Trigger row, ``next_method``)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session

    with create_session() as session:
        for ti, trigger in zip(tis, triggers, strict=True):
            row = Trigger.from_object(trigger)
            session.add(row)
            session.flush()
            stored = session.get(TaskInstance, ti.id)
            stored.state, stored.trigger_id = "deferred", row.id
            stored.next_method, stored.next_kwargs = "execute_complete", {}


def _resumed_at(ids: list[Any]) -> dict[str, float]:
    """Task instance id -> when the receiver resumed it (``scheduled_dttm``), for those it resumed."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(TaskInstance.id, TaskInstance.scheduled_dttm).where(
                TaskInstance.dag_id == DAG_ID, TaskInstance.state == "scheduled"
            )
        ).all()
    wanted = {str(i) for i in ids}
    return {str(ti_id): at.timestamp() for ti_id, at in rows if str(ti_id) in wanted and at is not None}


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


def mounted_receiver() -> Any:
    """The plugin's apps mounted on a bare root app, as the api-server mounts them (uvicorn's factory)."""
    from fastapi import FastAPI

    from airflow_provider_modelroute.webhooks.receiver import ModelRouteWebhooksPlugin

    root = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    for spec in ModelRouteWebhooksPlugin.fastapi_apps:
        root.mount(spec["url_prefix"], spec["app"])
    return root


@contextlib.contextmanager
def _receiver(sock: socket.socket, env: dict[str, str]) -> Iterator[None]:
    """The receiver app in its own process, serving ``sock``, as the api-server serves it."""
    import httpx

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "bench_webhooks:mounted_receiver",
            "--app-dir",
            os.path.dirname(os.path.abspath(__file__)),
            "--fd",
            str(sock.fileno()),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=[sock.fileno()],
    )
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/nothing", timeout=5).status_code == 404:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the receiver did not start")
            time.sleep(0.2)
        yield
    finally:
        common.stop(process)


def _register(cfg: dict[str, Any], receiver_url: str) -> str:
    """Register the receiver as a webhook endpoint (final events only, as setup does); return its secret."""
    import httpx

    answer = httpx.post(
        f"{cfg['base_url']}/v1/webhooks/endpoints",
        json={
            "url": receiver_url,
            "events": ["execution.completed", "execution.failed", "execution.cancelled"],
        },
        headers={"Authorization": f"Bearer {cfg['creator_key']}"},
        timeout=30,
    )
    answer.raise_for_status()
    return str(answer.json()["secret"])


# -- child: one case ----------------------------------------------------------------------------------


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    mode, n, horizon = cfg["mode"], int(cfg["n"]), float(cfg["horizon"])
    conn = json.loads(cfg["airflow_conn"])
    from airflow_provider_modelroute.testing import RemoteModelRouteServer
    from airflow_provider_modelroute.triggers.modelroute import ModelRouteExecutionTrigger
    from airflow_provider_modelroute.webhooks.mode import TaskRoute, receiver_url

    remote = RemoteModelRouteServer(cfg["admin_url"])
    remote.reset()
    rng = random.Random(cfg["seed"])
    finish_in = [rng.uniform(0, horizon) for _ in range(n)]
    with contextlib.ExitStack() as stack:
        tis: list[Any] = []
        urls: list[str | None] = [None] * n
        if mode == "webhooks":
            tis = _deferred_task_instances(n)
            sock = stack.enter_context(_listening_socket())
            receiver = receiver_url(f"http://127.0.0.1:{sock.getsockname()[1]}", CONN_ID)
            secret = _register(cfg, receiver)  # as the setup CLI does; the secret signs deliveries
            extras = {
                "webhook_secret": secret,
                "webhook_receiver_url": receiver,
                "webhook_poll_interval": 600,
            }
            conn["extra"].update(extras)
            os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps(conn)
            stack.enter_context(_receiver(sock, dict(os.environ)))
            routes = [dataclasses.asdict(TaskRoute.of(ti)) for ti in tis]
            urls = [TaskRoute(**r).webhook_url(receiver, secret) for r in routes]
        else:
            os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps(conn)
        logging.disable(logging.CRITICAL)
        ids = _create(cfg["base_url"], cfg["creator_key"], urls)
        if mode == "webhooks":
            triggers = [
                ModelRouteExecutionTrigger(
                    i, CONN_ID, poll_interval=600, webhook_route=r, cancel_on_kill=True
                )
                for i, r in zip(ids, routes, strict=True)
            ]
            _defer(tis, triggers)
        else:
            triggers = [ModelRouteExecutionTrigger(i, CONN_ID, poll_interval=float(cfg["poll"])) for i in ids]
        stats_before = remote.stats()
        run = _Run(mode, remote, ids, finish_in, tis, float(cfg["poll"]))
        started = time.time()
        asyncio.run(run.wait_all(triggers, float(cfg["patience"])))
        stats_after = remote.stats()
    reads = stats_after["requests"].get(STATUS_READS, 0) - stats_before["requests"].get(STATUS_READS, 0)
    delays = [run.ended[i] - run.finished[i] for i in run.ended if i in run.finished]
    deliveries = remote.webhook_deliveries() if mode == "webhooks" else []
    return {
        "mode": mode,
        "n": n,
        "ended": len(run.ended),
        "lower_bound": max(run.finished.values()) - started,
        "makespan": max(run.ended.values(), default=float("nan")) - started,
        "reads": reads,
        "rate_limited": stats_after["rate_limited"] - stats_before["rate_limited"],
        "delay_p50": common.percentile(delays, 0.5),
        "delay_p99": common.percentile(delays, 0.99),
        "delay_max": max(delays, default=float("nan")),
        "deliveries": len(deliveries),
        "deliveries_failed": sum(1 for d in deliveries if d["status"] is None or d["status"] >= 300),
    }


class _Run:
    """One case's waits: the executions end at their times (through the server's admin API) while
    the triggers wait; records when each execution finished and when its wait ended."""

    def __init__(
        self, mode: str, remote: Any, ids: list[str], finish_in: list[float], tis: list[Any], poll: float
    ) -> None:
        self.mode, self.remote, self.ids, self.tis, self.poll = mode, remote, ids, tis, poll
        self.finish_in = finish_in
        self.finished: dict[int, float] = {}
        self.ended: dict[int, float] = {}

    async def finish(self, index: int, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))
        await asyncio.to_thread(self.remote.set_execution_status, self.ids[index], "COMPLETED")
        self.finished[index] = time.time()

    async def wait(self, index: int, trigger: Any) -> None:
        await asyncio.sleep(random.uniform(0, self.poll))  # starts spread over a poll interval
        await common.first_event(trigger)
        if self.mode == "polling":
            self.ended[index] = time.time()

    async def watch_receiver(self, deadline: float) -> None:
        """Webhook waits end when the receiver resumes their task instances: read that from the DB."""
        by_id = {str(ti.id): index for index, ti in enumerate(self.tis)}
        while len(self.ended) < len(self.tis) and time.time() < deadline:
            await asyncio.sleep(1.0)
            resumed = await asyncio.to_thread(_resumed_at, list(by_id))
            self.ended.update({by_id[ti_id]: at for ti_id, at in resumed.items()})

    async def wait_all(self, triggers: list[Any], patience: float) -> None:
        now = time.time()
        finishing = [asyncio.create_task(self.finish(i, now + s)) for i, s in enumerate(self.finish_in)]
        waits = [asyncio.create_task(self.wait(i, t)) for i, t in enumerate(triggers)]
        if self.mode == "polling":
            await asyncio.wait(waits, timeout=patience)
        else:
            await self.watch_receiver(now + patience)
        for task in waits:  # what a triggerer does with the triggers of resumed tasks
            task.cancel()
        await asyncio.gather(*finishing, *waits, return_exceptions=True)


# -- parent: orchestrate and print ----------------------------------------------------------------------


@contextlib.contextmanager
def _server(limit: int, window: float) -> Iterator[dict[str, Any]]:
    """The local server: status reads limited per key; a second key submits (not limited)."""
    from airflow_provider_modelroute.testing.spec import make_api_key

    keys = [make_api_key(), make_api_key()]
    args = ["--pending-seconds", "0", "--api-key", keys[0], "--api-key", keys[1]]
    args += ["--rate-limit", str(limit), "--rate-window", str(window), "--rate-limit-route", STATUS_READS]
    with common.local_server(*args) as info:
        yield {**info, "creator_key": keys[1]}


def _row(r: dict[str, Any]) -> list[str]:
    ended = f"{r['ended']:,}" + ("" if r["ended"] == r["n"] else f" of {r['n']:,}")
    return [
        "polling (5 s)" if r["mode"] == "polling" else "webhooks (10-min safety net)",
        ended,
        f"{r['lower_bound']:.1f}",
        f"{r['makespan']:.1f}",
        f"{r['makespan'] - r['lower_bound']:+.1f}",
        f"{r['reads']:,} ({r['reads'] / r['n']:.2f})",
        str(r["rate_limited"]),
        f"{r['delay_p50']:.1f} / {r['delay_p99']:.1f} / {r['delay_max']:.1f}",
        f"{r['deliveries']:,} ({r['deliveries_failed']} failed)" if r["mode"] == "webhooks" else "-",
    ]


HEADERS = [
    "waits",
    "ended",
    "lower bound s",
    "makespan s",
    "over the bound s",
    "status reads (per execution)",
    "429s",
    "end after finish p50 / p99 / max s",
    "webhook deliveries",
]


def parent(quick: bool) -> int:
    script = os.path.abspath(__file__)
    n, horizon, limit, window = (40, 10.0, 60, 5.0) if quick else (1000, 300.0, 60, 60.0)
    print(common.header("Webhooks vs polling: deferred waits under a rate limit", quick))
    print(
        f"{n:,} executions submitted up front, each finishing at a uniformly random time within "
        f"{horizon:g} s; "
        f"the server limits status reads (GET /v1/executions/{{id}}, the only request a wait makes) to "
        f"{limit} per {window:g} s per API key (submits use another key and are not limited). Makespan: last "
        "submit to the end of the last wait; lower bound: the last finish. Polling: the shared rate budget "
        "paces the triggers. Webhooks: the receiver resumes each task instance from its delivery.\n"
    )
    results = []
    with _server(limit, window) as server:
        for mode in ("polling", "webhooks"):
            patience = horizon + 3 * n * window / limit + 120  # far beyond what polling needs
            cfg = {"mode": mode, "n": n, "horizon": horizon, "poll": 5.0, "seed": 16, "patience": patience}
            cfg.update(server)
            results.append(common.run_child(script, cfg, timeout=7200))
    print(common.table(HEADERS, [_row(r) for r in results]))
    print()
    polling, hooks = results
    reads_floor = n / (limit / window)
    over = hooks["makespan"] - hooks["lower_bound"]
    common.print_goals(
        [
            f"- polling cannot beat {reads_floor:.0f} s here ({n:,} reads at {limit} per {window:g} s); "
            f"it took {polling['makespan']:.0f} s",
            common.goal(
                "webhook mode ends within 5 s of the last finish",
                hooks["ended"] == n and over <= 5,
                f"{over:+.1f} s",
            ),
            common.goal(
                "no status read beyond the safety net's, zero 429s",
                hooks["reads"] == 0 and hooks["rate_limited"] == 0,
                f"{hooks['reads']} reads, {hooks['rate_limited']} 429s",
            ),
        ],
        quick,
    )
    return 0 if all(r["ended"] == r["n"] for r in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: N=40 within 10 s")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        common.report(child(json.loads(args.child)))
        return 0
    return parent(args.quick)


if __name__ == "__main__":
    sys.exit(main())
