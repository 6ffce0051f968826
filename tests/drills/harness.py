"""A real Airflow on loopback for the production drills: separate processes, real kills, real faults.

``AirflowStack`` builds a throwaway ``AIRFLOW_HOME`` and starts, each as its own process (its own
session, so it can be killed as a whole):

* the local ModelRoute server (``python -m airflow_provider_modelroute.testing``), controlled through
  ``RemoteModelRouteServer`` (faults, counters, the true sha256 of each file);
* moto's S3 server (``ThreadedMotoServer``, in the test process), behind the ``aws_default`` connection;
* Airflow 3: ``airflow db migrate`` once, then ``airflow dag-processor``, ``airflow scheduler`` (with
  the LocalExecutor: tasks run as child processes of the scheduler), ``airflow triggerer`` and
  ``airflow api-server`` (the REST API the drills drive, and the execution API the tasks talk to).

The metadata DB is SQLite. Airflow 3.3.2 accepts the LocalExecutor on SQLite (nothing refuses it),
and tasks reach the DB only through the api-server's execution API, so four processes share it:
scheduler, triggerer, dag-processor and api-server. Three settings make that hold under 20 concurrent
runs: write-ahead logging (readers never wait for the writer), a 60 s busy timeout for the
scheduler, triggerer and dag-processor, and a 2 s one for the api-server (see ``start``). What was
measured without them, and why not PostgreSQL: RELIABILITY.md.

Everything is configured through the environment of those processes (``AIRFLOW__*`` settings,
``AIRFLOW_CONN_*`` connections, ``AIRFLOW_VAR_*`` variables) plus ``airflow_local_settings.py`` in
``$AIRFLOW_HOME/config``: the SQLite connect args, and a cluster policy that shortens ``retry_delay``
to 1 s (the example DAG waits 30 s between tries, which would only make the drills slow).

All output stays in the home: ``components/*.log`` (each process), ``logs/`` (Airflow's task and
trigger logs). ``stop()`` always ends every process the stack started (by session id), and
``tails()`` returns the last lines of each component log for failure reports.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from airflow_provider_modelroute import api
from airflow_provider_modelroute.testing import RemoteModelRouteServer, spec
from tests import waiting

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DAG_FILE = REPO / "example_dags" / "example_modelroute_generate_and_store.py"
EXAMPLE_DAG = "example_modelroute_generate_and_store"
#: The example DAG's shape with executions that run until a drill ends them (drill 2).
HELD_DAG = "drill_modelroute_held"
DRILL_DAGS = Path(__file__).resolve().parent / "dags"
PYTHON = sys.executable

#: Fast HTTP retries in the ModelRoute connection: the same policy, shorter waits. ``max_retries`` 6
#: means up to 7 attempts per request; a drill never injects more faults than that into one endpoint
#: unless it wants the request (and the try) to fail.
CONNECTION_EXTRAS: dict[str, Any] = {
    "retry_base_wait": 0.05,
    "retry_max_wait": 1,
    "max_retries": 6,
    "retry_deadline": 60,
    "timeout": 10,
    "connect_timeout": 5,
}
#: Executions stay PROCESSING this long, so the example DAG's sensor really defers (it would find a
#: 0.3 s execution already COMPLETED on its first poke and never reach the triggerer).
PROCESSING_SECONDS = 8.0
PENDING_SECONDS = 0.5
#: An execution not ended by then becomes EXPIRED: longer than any drill, so only a drill ends one.
EXECUTION_TTL_SECONDS = 3600
#: How long a drill waits for the stack to get somewhere (start, parse, finish runs): minutes, for a
#: loaded 2-core machine; a wait that is met returns at once.
WAIT_SECONDS = 600
#: What the cluster policy sets ``retry_delay`` to (the example DAG says 30 s).
RETRY_DELAY_SECONDS = 1
PARALLELISM = 8
S3_BUCKET = "modelroute-drills"
TERMINAL_RUN_STATES = frozenset({"success", "failed"})
#: A presigned signature that was not redacted (redacted URLs show ``?<redacted>``).
SIGNATURE_RE = re.compile(r"X-Amz-Signature=[0-9A-Za-z%]{8,}")

#: The scheduler's "task-state-changed-externally" line (see ``stale_defer_exit_failures``).
_STALE_EVENT_RE = re.compile(
    r"reported that the task instance <TaskInstance: [\w-]+\.(?P<task>\w+) (?P<run>\S+) \[\w+\]"
    r"[^>]*> finished with state (?P<event>success|failed), but the task instance's state attribute is "
    r"(?P<state>\w+)"
)

#: An api-server access line of a request answered below 500 (one per REST call: noise in a report).
_ROUTINE_ACCESS_RE = re.compile(r"\[http\.access\].*\bstatus_code=[1-4]\d\d\b")

T = TypeVar("T")


def stale_defer_exit_failures(scheduler_log: str) -> Counter[tuple[str, str]]:
    """Tries lost to the Airflow race (see ``AirflowStack.stale_defer_exit_failures``) in a scheduler log.

    Its aftermath counts too: after the race the next try can run under the failed try's id, and
    its worker is refused at once ("finished with state failed, but ... is running"); such a report
    counts only for a task that lost a try to the race itself.
    """
    race: Counter[tuple[str, str]] = Counter()
    for match in _STALE_EVENT_RE.finditer(scheduler_log):
        key = (match["run"], match["task"])
        stale = match["event"] == "success" and match["state"] in ("queued", "scheduled", "running")
        aftermath = match["event"] == "failed" and match["state"] == "running" and race[key] > 0
        if stale or aftermath:
            race[key] += 1
    return race


#: SQLite busy timeouts (Python's default is 5 s): long for the scheduler, triggerer and
#: dag-processor (waiting beats crashing), short for the api-server (see ``AirflowStack.start``).
SQLITE_BUSY_TIMEOUT = 60
SQLITE_BUSY_TIMEOUT_API_SERVER = 2

LOCAL_SETTINGS = f'''"""Drill-only Airflow local settings (AIRFLOW_HOME/config is on sys.path)."""
from datetime import timedelta

# [database] sql_alchemy_connect_args points here: how long a connection waits for SQLite's write
# lock before "database is locked" (Python's default: 5 s).
SQLITE_CONNECT_ARGS = {{"timeout": {SQLITE_BUSY_TIMEOUT}}}
SQLITE_CONNECT_ARGS_API_SERVER = {{"timeout": {SQLITE_BUSY_TIMEOUT_API_SERVER}}}


def task_policy(task):
    # Cluster policy: the example DAG waits 30 s between tries; the drills only need a few seconds.
    task.retry_delay = timedelta(seconds={RETRY_DELAY_SECONDS})
'''


class DrillError(AssertionError):
    """A drill condition was not met (with what was observed)."""


def wait_for(
    what: str,
    check: Callable[[], T | None],
    timeout: float = WAIT_SECONDS,
    interval: float = 0.5,
    describe: Callable[[], str] | None = None,
) -> T:
    """``tests.waiting.wait_for`` for drills: an HTTP or OS error (a component restarting) is "not yet"."""
    return waiting.wait_for(
        what, check, timeout=timeout, interval=interval, describe=describe, ignore=(httpx.HTTPError, OSError)
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _session_members(session_id: int) -> list[int]:
    """Pids of every live process in a session (a component and all it forked, whatever its group)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may contain spaces and parentheses
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(entry.name))
    return members


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a child running as another user may not import


def _die_with_parent() -> None:
    """Runs in each component's child before exec: SIGTERM it if the test process dies first.

    ``stop()`` is the normal way out; this covers a test process that is killed outright.
    """
    PR_SET_PDEATHSIG = 1
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@dataclass
class Component:
    """One long-running process of the stack, started in its own session."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    user: str | None = None  # run as this OS user (PostgreSQL refuses to run as root)

    def start(self, env: dict[str, str], cwd: Path) -> None:
        env = {**env, **self.extra_env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts + 1} at {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                user=self.user,
            )
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def session_id(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def members(self) -> list[int]:
        return _session_members(self.session_id) if self.session_id else []

    def kill(self) -> list[int]:
        """SIGKILL the component and everything it started (a machine-level crash of this service)."""
        pids = self.members()
        _signal_pids(pids, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)
        wait_for(f"{self.name} to be gone", lambda: not self.members() or None, timeout=120, interval=0.1)
        return pids

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the whole session, then SIGKILL whatever is left."""
        if self.process is None:
            return
        _signal_pids(self.members(), signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)
        leftover = self.members()
        if leftover:
            _signal_pids(leftover, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def tail(self, lines: int = 40) -> str:
        """The log's last lines, less the api-server's access lines of requests that did not fail."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join([line for line in text if not _ROUTINE_ACCESS_RE.search(line)][-lines:])


class AirflowApi:
    """The slice of Airflow's REST API (``/api/v2``) the drills use."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.client = httpx.Client(base_url=base_url, timeout=120)

    def login(self) -> None:
        # SimpleAuthManager with simple_auth_manager_all_admins: a token without credentials.
        response = self.client.get("/auth/token")
        response.raise_for_status()
        self.client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def _json(self, method: str, path: str, ok: frozenset[int] = frozenset(), **kwargs: Any) -> Any:
        """One API call; a 5xx or a timeout (the SQLite write lock, see ``AirflowStack.start``) is retried."""
        for attempt in range(6):
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TimeoutException:
                if attempt == 5:
                    raise
                continue
            if response.status_code < 500 or attempt == 5:
                break
            time.sleep(0.5 * 2**attempt)
        if response.status_code in ok:
            return None
        if response.status_code >= 400:
            raise DrillError(
                f"Airflow API {method} {path}: HTTP {response.status_code}: {response.text[:2000]}"
            )
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        """Any GET of the REST API (5xx answers and time-outs retried)."""
        return self._json("GET", path, params=params)

    def health(self) -> dict[str, Any]:
        return dict(self._json("GET", "/api/v2/monitor/health"))

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        response = self.client.get(f"/api/v2/dags/{dag_id}")
        return response.json() if response.status_code == 200 else None

    def import_errors(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/api/v2/importErrors")["import_errors"])

    def unpause(self, dag_id: str) -> None:
        self._json("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any]) -> None:
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf}
        # 409: a retried POST whose first attempt created the run after all.
        self._json("POST", f"/api/v2/dags/{dag_id}/dagRuns", ok=frozenset({409}), json=body)

    def set_run_state(self, dag_id: str, run_id: str, state: str) -> None:
        self._json("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", json={"state": state})

    def runs(self, dag_id: str) -> dict[str, dict[str, Any]]:
        document = self._json("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"limit": 1000})
        return {run["dag_run_id"]: run for run in document["dag_runs"]}

    def task_instances(
        self, dag_id: str, run_ids: Iterable[str] | None = None, task_id: str | None = None
    ) -> list[dict[str, Any]]:
        # GET, not the POST batch endpoint: POSTs write an audit-log row, and the drills poll a lot.
        params: dict[str, Any] = {"limit": 1000}
        if task_id is not None:
            params["task_id"] = task_id
        document = self._json("GET", f"/api/v2/dags/{dag_id}/dagRuns/~/taskInstances", params=params)
        wanted = set(run_ids) if run_ids is not None else None
        return [ti for ti in document["task_instances"] if wanted is None or ti["dag_run_id"] in wanted]

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"))

    def clear(self, dag_id: str, run_id: str, task_ids: list[str]) -> None:
        body = {
            "dry_run": False,
            "dag_run_id": run_id,
            "task_ids": task_ids,
            "include_downstream": True,
            "only_failed": False,
            "reset_dag_runs": True,
        }
        self._json("POST", f"/api/v2/dags/{dag_id}/clearTaskInstances", json=body)


@dataclass
class RunResult:
    """A DAG run at its end: its state and, per task, the last state and try number."""

    run_id: str
    state: str
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def try_number(self, task_id: str) -> int:
        return int(self.tasks[task_id]["try_number"])

    def task_state(self, task_id: str) -> str | None:
        return self.tasks[task_id]["state"]


#: The metadata DB one `airflow db migrate` made in this test process: each SQLite stack starts from a
#: copy (the migration is the same for every stack, and the slowest step of a stack's start).
_MIGRATED_SQLITE: list[Path] = []


def enable_wal(db_path: Path) -> None:
    """Write-ahead logging: readers never wait for the writer (the mode is kept in the DB file).

    Measured without it (and with the 5 s default busy timeout), 20 concurrent runs made API
    requests wait up to 5 s for the lock and one failed with HTTP 500 (``database is locked``).
    """
    import sqlite3

    with contextlib.closing(sqlite3.connect(db_path)) as db:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise DrillError(f"SQLite refused WAL mode for {db_path}: {mode}")


class AirflowStack:
    """Airflow 3 (scheduler, triggerer, dag-processor, api-server; LocalExecutor), ModelRoute and S3."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = home or Path(tempfile.mkdtemp(prefix="modelroute-drills-"))
        self.components: dict[str, Component] = {}
        self.env: dict[str, str] = {}
        self.api_port = 0
        self.api: AirflowApi | None = None
        self.modelroute: RemoteModelRouteServer | None = None
        self.modelroute_info: dict[str, Any] = {}
        self.wrong_api_key = spec.make_api_key()
        self.s3_endpoint = ""
        self.s3: Any = None
        self._moto: Any = None
        self.timings: dict[str, float] = {}

    # -- paths ----------------------------------------------------------------------------------

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def components_dir(self) -> Path:
        return self.home / "components"

    @property
    def db_path(self) -> Path:
        return self.home / "airflow.db"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def local_destination(self, name: str) -> tuple[str, Path]:
        folder = self.data_dir / name
        return f"{folder.as_uri()}/", folder

    def s3_destination(self, prefix: str) -> str:
        # The conn id rides in the URL's user info (ObjectStoragePath): the example DAG's store task
        # has no destination_conn_id parameter of its own.
        return f"s3://aws_default@{S3_BUCKET}/{prefix.strip('/')}/"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> AirflowStack:
        started = time.monotonic()
        self._start_modelroute()
        self._start_moto()
        self._prepare_home()
        self._migrate()
        self.timings["db_migrate"] = time.monotonic() - started
        for name, argv in self.airflow_commands().items():
            self._component(name, argv).start(self.env, self.home)
        api_server = self._component(
            "api-server",
            [PYTHON, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(self.api_port)],
        )
        # The api-server writes its audit log from an async dependency with a sync session, i.e. on
        # its event loop. Waiting there for SQLite's write lock stalls every request, including the
        # one whose commit would release that lock: a long busy timeout turned that into a 30 s+
        # stall of the whole stack (measured). A short one turns it into a retried HTTP 500.
        if self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite"):
            connect_args = "airflow_local_settings.SQLITE_CONNECT_ARGS_API_SERVER"
            api_server.extra_env = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": connect_args}
        api_server.start(self.env, self.home)
        self.api = AirflowApi(f"http://127.0.0.1:{self.api_port}")
        self._wait_ready()
        self.timings["startup"] = time.monotonic() - started
        return self

    def stop(self) -> None:
        """End every process of the stack: SIGTERM all at once, then SIGKILL what is left."""
        running = [c for c in self.components.values() if c.process is not None]
        for component in running:
            _signal_pids(component.members(), signal.SIGTERM)
        deadline = time.monotonic() + 15
        for component in running:
            assert component.process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                component.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for component in running:
            component.stop(grace=0)
        if self._moto is not None:
            with contextlib.suppress(Exception):
                self._moto.stop()
            self._moto = None
        if self.api is not None:
            self.api.client.close()

    def cleanup(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    # -- what a stack runs (a subclass may change these) -----------------------------------------

    def airflow_commands(self) -> dict[str, list[str]]:
        """The long-running Airflow components besides the api-server, by name."""
        return {name: [PYTHON, "-m", "airflow", name] for name in ("dag-processor", "scheduler", "triggerer")}

    def modelroute_args(self) -> list[str]:
        """Options of the local ModelRoute server (``python -m airflow_provider_modelroute.testing``)."""
        return [
            "--pending-seconds",
            str(PENDING_SECONDS),
            "--processing-seconds",
            str(PROCESSING_SECONDS),
            "--execution-ttl",
            str(EXECUTION_TTL_SECONDS),
            "--rate-limit",  # X-RateLimit-* on every answer, as documented; a limit no drill reaches
            "1000000",
            "--dialect",  # /download answers presigned URLs: drill 5's storage faults reach them
            "presigned",
        ]

    def dag_files(self) -> list[Path]:
        """The DAG files copied into the stack's DAGs folder."""
        return [EXAMPLE_DAG_FILE, *sorted(DRILL_DAGS.glob("*.py"))]

    def expected_dag_ids(self) -> list[str]:
        """The DAGs that must be parsed before the stack is ready."""
        found = []
        for path in self.dag_files():
            found += re.findall(r"dag_id=\"([a-z0-9_]+)\"", path.read_text())
        return found

    def _component(self, name: str, argv: list[str]) -> Component:
        component = Component(name, argv, self.components_dir / f"{name}.log")
        self.components[name] = component
        return component

    def _start_modelroute(self) -> None:
        self.components_dir.mkdir(parents=True, exist_ok=True)
        info_path = self.home / "modelroute-server.json"  # holds the API key: not in components/ or logs/
        argv = [PYTHON, "-m", "airflow_provider_modelroute.testing", *self.modelroute_args()]
        component = Component("modelroute-server", argv, self.components_dir / "modelroute-server.log")
        self.components["modelroute-server"] = component
        with open(info_path, "wb") as out, open(component.log_path, "ab") as err:
            component.process = subprocess.Popen(
                argv,
                env={**self._base_env(), "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            component.starts = 1

        def ready() -> dict[str, Any] | None:
            if not component.alive:
                raise DrillError(f"The ModelRoute server exited:\n{component.tail()}")
            line = info_path.read_text().strip()
            return json.loads(line) if line else None

        self.modelroute_info = wait_for("the ModelRoute server", ready, timeout=300, interval=0.1)
        self.modelroute = RemoteModelRouteServer(self.modelroute_info["admin_url"])

    def _start_moto(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log lines in the test output

        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.s3_endpoint = f"http://{host}:{port}"
        self.s3 = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="drill-access-key",
            aws_secret_access_key="drill-secret-key",
        )
        self.s3.create_bucket(Bucket=S3_BUCKET)

    @staticmethod
    def _base_env() -> dict[str, str]:
        """The test process's environment without its Airflow/AWS settings (tests/conftest.py sets some)."""
        return {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "_AIRFLOW"))}

    def _prepare_home(self) -> None:
        from cryptography.fernet import Fernet

        dags = self.home / "dags"
        dags.mkdir(parents=True, exist_ok=True)
        # A snapshot of the DAG files: the example DAG as shipped, plus the drill-only DAGs.
        for path in self.dag_files():
            shutil.copy2(path, dags / path.name)
        (self.home / "config").mkdir(exist_ok=True)
        (self.home / "config" / "airflow_local_settings.py").write_text(LOCAL_SETTINGS)
        self.data_dir.mkdir(exist_ok=True)
        self.api_port = free_port()
        conn = json.loads(self.modelroute_info["airflow_conn"])
        conn["extra"] = {**conn.get("extra", {}), **CONNECTION_EXTRAS}
        wrong_key = {**conn, "password": self.wrong_api_key}
        key = self.modelroute_info["api_key"]
        malformed_key = {**conn, "password": key[:-1] + ("0" if key[-1] != "0" else "1")}  # bad checksum
        aws = {
            "conn_type": "aws",
            "login": "drill-access-key",
            "password": "drill-secret-key",
            "extra": {"endpoint_url": self.s3_endpoint, "region_name": "us-east-1"},
        }
        api_url = f"http://127.0.0.1:{self.api_port}"
        self.env = {
            **self._base_env(),
            "PYTHONUNBUFFERED": "1",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(PARALLELISM),
            "AIRFLOW__CORE__MAX_ACTIVE_RUNS_PER_DAG": "64",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "64",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.db_path}",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "airflow_local_settings.SQLITE_CONNECT_ARGS",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": api_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__MAXIMUM_PAGE_LIMIT": "1000",
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.logs_dir),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            # No scheduled runs (the example DAG is @daily): only the runs the drills trigger.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
            # Airflow's default: a loaded machine's late heartbeats must not fail a healthy task.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "300",
            "AIRFLOW_CONN_MODELROUTE_DEFAULT": json.dumps(conn),
            "AIRFLOW_CONN_MODELROUTE_WRONG_KEY": json.dumps(wrong_key),
            "AIRFLOW_CONN_MODELROUTE_MALFORMED_KEY": json.dumps(malformed_key),
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(aws),
            "AIRFLOW_VAR_MODELROUTE_DESTINATION": f"{(self.data_dir / 'scheduled').as_uri()}/",
        }

    def _migrate(self) -> None:
        """``airflow db migrate``; on SQLite, once per test process: later stacks start from a copy."""
        if not self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite"):
            self._run_migrate(self.env)
            return
        if not _MIGRATED_SQLITE:
            folder = Path(tempfile.mkdtemp(prefix="modelroute-drills-db-"))
            atexit.register(shutil.rmtree, folder, True)
            template = folder / "airflow.db"
            self._run_migrate({**self.env, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{template}"})
            enable_wal(template)
            _MIGRATED_SQLITE.append(template)
        shutil.copy2(_MIGRATED_SQLITE[0], self.db_path)

    def _run_migrate(self, env: dict[str, str]) -> None:
        log_path = self.components_dir / "db-migrate.log"
        with open(log_path, "wb") as log:
            result = subprocess.run(
                [PYTHON, "-m", "airflow", "db", "migrate"],
                env=env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=300,
                check=False,
            )
        if result.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
            raise DrillError(f"`airflow db migrate` failed ({result.returncode}):\n{tail}")

    def _check_components(self) -> None:
        for component in self.components.values():
            if not component.alive:
                raise DrillError(
                    f"{component.name} exited ({component.process and component.process.returncode}):\n"
                    f"{component.tail()}"
                )

    def healthy(self) -> bool:
        """Metadatabase, scheduler, triggerer and dag-processor all report healthy."""
        assert self.api is not None
        health = self.api.health()
        return all(
            (health.get(part) or {}).get("status") == "healthy"
            for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
        )

    def _wait_ready(self) -> None:
        assert self.api is not None
        api_client = self.api

        def up() -> bool:
            self._check_components()
            return self.healthy()

        wait_for("Airflow to report healthy", up, interval=1, describe=self.tails)
        api_client.login()
        expected = self.expected_dag_ids()

        def parsed() -> bool:
            self._check_components()
            errors = api_client.import_errors()
            if errors:
                raise DrillError(f"DAG import errors: {json.dumps(errors, indent=1)[:4000]}")
            return all(api_client.dag(dag_id) for dag_id in expected)

        wait_for(f"the DAGs {expected} to be parsed", parsed, interval=1, describe=self.tails)

    def restart(self, name: str) -> None:
        self.components[name].start(self.env, self.home)

    # -- observing runs -------------------------------------------------------------------------

    def tails(self, lines: int = 30) -> str:
        """The last lines of each component's log, for failure reports (the full logs stay on disk)."""
        parts = [f"--- {name} ({c.log_path}) ---\n{c.tail(lines)}" for name, c in self.components.items()]
        return "\n".join(parts)

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any]) -> str:
        assert self.api is not None
        self.api.trigger(dag_id, run_id, conf)
        return run_id

    def wait_for_runs(
        self, dag_id: str, run_ids: list[str], timeout: float = WAIT_SECONDS
    ) -> dict[str, RunResult]:
        """Wait until every run is success or failed; return each with its task instances."""
        assert self.api is not None
        api_client = self.api
        pending = set(run_ids)
        states: dict[str, str] = {}

        def done() -> bool:
            self._check_components()
            runs = api_client.runs(dag_id)
            for run_id in list(pending):
                state = runs.get(run_id, {}).get("state")
                states[run_id] = str(state)
                if state in TERMINAL_RUN_STATES:
                    pending.discard(run_id)
            return not pending

        def describe() -> str:
            tis = api_client.task_instances(dag_id, sorted(pending))
            shown = sorted((t["dag_run_id"], t["task_id"], t["state"], t["try_number"]) for t in tis)
            return f"Unfinished runs: {sorted(pending)}; their tasks: {shown}\n{self.tails()}"

        wait_for(
            f"{len(run_ids)} runs of {dag_id} to end", done, timeout=timeout, interval=1, describe=describe
        )
        results = {run_id: RunResult(run_id, states[run_id]) for run_id in run_ids}
        for ti in api_client.task_instances(dag_id, run_ids):
            results[ti["dag_run_id"]].tasks[ti["task_id"]] = ti
        return results

    def task_states(self, dag_id: str, run_ids: list[str], task_id: str) -> dict[str, str | None]:
        assert self.api is not None
        return {
            ti["dag_run_id"]: ti["state"]
            for ti in self.api.task_instances(dag_id, run_ids, task_id)
            if ti["task_id"] == task_id
        }

    def db_contention(self) -> dict[str, int]:
        """How often the shared DB pushed back: api-server 5xx answers and "database is locked" lines."""
        api_log = self.components["api-server"].log_path.read_text(errors="replace")
        locked = sum(
            c.log_path.read_text(errors="replace").count("database is locked")
            for c in self.components.values()
            if c.log_path.exists()
        )
        return {
            "api_server_5xx": len(re.findall(r"status_code=5\d\d", api_log)),
            "database_is_locked": locked,
        }

    def stale_defer_exit_failures(self) -> Counter[tuple[str, str]]:
        """Tries the scheduler failed on a stale executor event after a deferral, per (run_id, task_id).

        Airflow 3.3.2 race (apache/airflow#72716, #71580; #66374 fixed only the ``scheduled`` case):
        a deferred task's trigger fires before the scheduler has processed the executor's "success"
        for the try that deferred; the scheduler then sees that stale event while the resumed try is
        ``queued``/``running`` and fails it ("task-state-changed-externally"), costing one retry.
        The provider cannot prevent it; the drills tolerate it where it is logged, and report it.
        """
        return stale_defer_exit_failures(self.components["scheduler"].log_path.read_text(errors="replace"))

    def trigger_log_jobs(self, dag_id: str, run_id: str, task_id: str, attempt: int = 1) -> set[int]:
        """Ids of the triggerer jobs that ran this try's trigger (one log file per triggerer job)."""
        folder = self.logs_dir / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        return {
            int(match[1])
            for path in folder.glob(f"attempt={attempt}.log.trigger.*.log")
            if (match := re.search(r"\.trigger\.(\d+)\.log$", path.name))
        }

    def task_logs(self, dag_id: str, run_id: str, task_id: str) -> dict[int, str]:
        """The task's log text per try (Airflow 3 layout), trigger logs included in their try."""
        folder = self.logs_dir / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        texts: dict[int, str] = {}
        for path in sorted(folder.glob("attempt=*")):
            match = re.match(r"attempt=(\d+)", path.name)
            if match and path.is_file():
                number = int(match[1])
                texts[number] = texts.get(number, "") + path.read_text(errors="replace")
        return texts

    # -- the ModelRoute side --------------------------------------------------------------------

    @property
    def server(self) -> RemoteModelRouteServer:
        assert self.modelroute is not None
        return self.modelroute

    @property
    def api_key(self) -> str:
        return str(self.modelroute_info["api_key"])

    def executions_by_run(self) -> dict[str, list[dict[str, Any]]]:
        """Every execution the server holds, grouped by the ``run_id`` in its metadata."""
        grouped: dict[str, list[dict[str, Any]]] = {}
        for execution_id in self.server.execution_ids():
            execution = self.server.execution(execution_id)
            run_id = str((execution.get("metadata") or {}).get("run_id"))
            grouped.setdefault(run_id, []).append(execution)
        return grouped

    # -- stored files ---------------------------------------------------------------------------

    def stored_objects(self, destination: str) -> dict[str, bytes]:
        """Name -> bytes of everything at a destination folder (hidden and partial files included)."""
        if destination.startswith("file://"):
            folder = Path(destination.removeprefix("file://"))
            if not folder.exists():
                return {}
            return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        prefix = destination.split(f"{S3_BUCKET}/", 1)[1]
        listing = self.s3.list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix)
        return {
            item["Key"][len(prefix) :]: self.s3.get_object(Bucket=S3_BUCKET, Key=item["Key"])["Body"].read()
            for item in listing.get("Contents", [])
        }

    def pending_multipart_uploads(self) -> list[str]:
        listing = self.s3.list_multipart_uploads(Bucket=S3_BUCKET)
        return [upload["Key"] for upload in listing.get("Uploads", [])]

    def verify_files(self, execution: dict[str, Any], destination: str) -> int:
        """The destination holds exactly the execution's files, each with the server's sha256."""
        files = api.result_files(execution)
        if not files:
            raise DrillError(f"Execution {execution['id']} has no files: {execution}")
        stored = self.stored_objects(destination)
        expected = {f"{f['file_id']}.png": f["file_id"] for f in files}
        if set(stored) != set(expected):
            raise DrillError(f"{destination} holds {sorted(stored)}, expected exactly {sorted(expected)}")
        for name, file_id in expected.items():
            truth = self.server.file_info(file_id)
            got = hashlib.sha256(stored[name]).hexdigest()
            if got != truth["sha256"] or len(stored[name]) != truth["size_bytes"]:
                raise DrillError(
                    f"{destination}{name}: {len(stored[name])} bytes, sha256 {got}; the server has "
                    f"{truth['size_bytes']} bytes, sha256 {truth['sha256']}"
                )
        return len(expected)

    # -- secrets ---------------------------------------------------------------------------------

    def log_files(self) -> Iterator[Path]:
        """Every task/trigger log and every Airflow component log of the stack."""
        for folder in (self.logs_dir, self.components_dir):
            if folder.exists():
                yield from (p for p in folder.rglob("*") if p.is_file())

    def find_secrets(self, paths: Iterable[Path] | None = None) -> list[str]:
        """Lines that show an API key or an unredacted presigned signature: ``path:line: what``."""
        keys = {"API key": self.api_key, "wrong API key": self.wrong_api_key}
        hits = []
        for path in paths if paths is not None else self.log_files():
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            for number, line in enumerate(text.splitlines(), 1):
                for what, key in keys.items():
                    if key in line:
                        hits.append(f"{path}:{number}: {what}")
                if SIGNATURE_RE.search(line):
                    hits.append(f"{path}:{number}: presigned X-Amz-Signature")
        return hits


S = TypeVar("S", bound=AirflowStack)


def start_stack(stack: AirflowStack, unpause: Iterable[str]) -> None:
    """Start the stack and unpause the DAGs (triggered runs of a paused DAG never start); if it does not
    start, stop what did and keep its home."""
    print(f"\nDrill stack: AIRFLOW_HOME {stack.home}")
    try:
        stack.start()
        assert stack.api is not None
        for dag_id in unpause:
            stack.api.unpause(dag_id)
    except BaseException:
        print(f"\nThe drill stack did not start; its home is kept at {stack.home}\n{stack.tails(60)}")
        stack.stop()
        raise


def serve(stack: S, failed: Callable[[], int], unpause: Iterable[str]) -> Iterator[S]:
    """A module fixture's body: start the stack, yield it, stop it; its home is removed unless a test
    failed meanwhile (``failed()``: how many tests have failed so far)."""
    failed_before = failed()
    start_stack(stack, unpause)
    yield stack
    stack.stop()
    if failed() == failed_before:
        stack.cleanup()
    else:
        print(f"\nDrill logs kept in {stack.home}")
