"""A distributed Airflow on loopback: PostgreSQL, Redis, CeleryExecutor, two workers, two triggerers.

``DistributedStack`` extends the drills' ``AirflowStack`` (same home layout, ModelRoute server, moto,
api-server, REST client, log checks) with what a scaled-out deployment has instead of SQLite and the
LocalExecutor:

* PostgreSQL (Debian ``postgresql``) as the metadata DB: its own server binaries, run as the
  ``postgres`` OS user (they refuse root) in a throwaway data directory on a free port;
* Redis (Debian ``redis-server``) as the Celery broker, on a free port, without persistence;
* ``airflow celery worker`` twice (``worker-1``, ``worker-2``) and ``airflow triggerer`` twice
  (``triggerer-1``, ``triggerer-2``), plus the scheduler, the dag-processor and the api-server;
* the ModelRoute server with the documented rate limit on (``--rate-limit``; every answer carries
  ``X-RateLimit-*``).

The Debian packages whose binaries are missing are installed first, with one ``apt-get update`` and
one ``apt-get install`` (root only).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.drills.harness import (
    CONNECTION_EXTRAS,
    PYTHON,
    AirflowStack,
    Component,
    DrillError,
    free_port,
    wait_for,
)

HERE = Path(__file__).resolve().parent
DAGS = HERE / "dags"
PG_USER = "postgres"  # the OS user Debian's package creates
DB_NAME = "airflow"
HOSTNAME_MODULE = '''"""[core] hostname_callable of the distributed drills: each component's name."""
import os
import socket


def hostname() -> str:
    return os.environ.get("DRILL_HOSTNAME") or socket.getfqdn()
'''


#: The Debian package of each service the stack runs, and where its binary lands.
SERVICE_PACKAGES = {
    "postgresql": "/usr/lib/postgresql/*/bin/postgres",
    "redis-server": "/usr/bin/redis-server",
}


def service_binaries() -> dict[str, str]:
    """The binary of each of SERVICE_PACKAGES, installing the missing packages first.

    One ``apt-get update`` and one ``apt-get install`` for all that is missing (root only).
    """
    missing = [package for package, pattern in SERVICE_PACKAGES.items() if not glob.glob(pattern)]
    if missing:
        install_debian_packages(missing)
    binaries = {}
    for package, pattern in SERVICE_PACKAGES.items():
        found = sorted(glob.glob(pattern))
        if not found:
            raise DrillError(f"apt-get installed {package!r} but {pattern} is still missing")
        binaries[package] = found[-1]
    return binaries


def install_debian_packages(packages: list[str]) -> None:
    if os.geteuid() != 0:
        raise DrillError(f"missing Debian packages {packages}: install them (as root) or run as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-3000:]
            raise DrillError(f"`{' '.join(argv)}` failed ({result.returncode}):\n{output}")


class PostgresServer:
    """A throwaway PostgreSQL cluster: ``initdb`` in a temporary directory, ``postgres`` on a free port."""

    def __init__(self, postgres: str, log_path: Path) -> None:
        self.bin = Path(postgres).parent
        self.user = PG_USER if os.geteuid() == 0 else None
        self.data_root = Path(tempfile.mkdtemp(prefix="modelroute-drills-pg-"))
        self.port = free_port()
        self.component = Component("postgres", [], log_path, user=self.user)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def start(self) -> None:
        data = self.data_root / "data"
        if self.user:
            shutil.chown(self.data_root, self.user, self.user)
        initdb = [str(self.bin / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8"]
        result = subprocess.run(
            [*initdb, "--no-sync"],
            user=self.user,
            cwd=self.data_root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise DrillError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        # A throwaway metadata DB: durability settings off (nothing here survives the drill anyway).
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.data_root),
            "max_connections": "300",
            "shared_buffers": "128MB",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        options = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
        self.component.argv = [str(self.bin / "postgres"), "-D", str(data), *options]
        self.component.start({"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}, self.data_root)
        wait_for(
            f"PostgreSQL on port {self.port}",
            self._create_database,
            timeout=60,
            describe=lambda: self.component.tail(),
        )

    def _create_database(self) -> bool:
        import psycopg2

        if not self.component.alive:
            raise DrillError(f"PostgreSQL exited:\n{self.component.tail()}")
        try:
            db = psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres")
        except psycopg2.OperationalError:
            return False
        db.autocommit = True
        with contextlib.closing(db), db.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {DB_NAME}")
        return True

    def stop(self) -> None:
        # SIGTERM is PostgreSQL's "smart" shutdown (waits for clients); SIGINT is "fast".
        process = self.component.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        self.component.stop(grace=5)
        shutil.rmtree(self.data_root, ignore_errors=True)


class RedisServer:
    """Redis on a free loopback port, in memory only (no RDB snapshots, no append-only file)."""

    def __init__(self, binary: str, log_path: Path, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        argv = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self.component = Component("redis", [*argv, "--dir", str(workdir)], log_path)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.component.start({"PATH": os.environ.get("PATH", "")}, self.workdir)
        wait_for(f"Redis on port {self.port}", self._pong, timeout=30, describe=lambda: self.component.tail())

    def _pong(self) -> bool:
        if not self.component.alive:
            raise DrillError(f"Redis exited:\n{self.component.tail()}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def stop(self) -> None:
        self.component.stop(grace=10)


class DistributedStack(AirflowStack):
    """Airflow 3 on PostgreSQL with the CeleryExecutor: 2 workers, 2 triggerers; ModelRoute rate-limited.

    :param rate_limit: requests per minute per API key (the documented 60); all components share
        the one key of ``modelroute_default``.
    :param awaiting_webhook_seconds: how long each execution stays ``AWAITING_WEBHOOK``.
    :param worker_concurrency: task slots per Celery worker.
    :param heartbeat_timeout: seconds without a task heartbeat before the scheduler fails the try.
    :param queued_timeout: seconds a task may stay queued (taken by a dead worker) before it is requeued.
    """

    WORKERS = ("worker-1", "worker-2")
    TRIGGERERS = ("triggerer-1", "triggerer-2")

    def __init__(
        self,
        *,
        rate_limit: int,
        awaiting_webhook_seconds: float,
        worker_concurrency: int,
        heartbeat_timeout: int,
        queued_timeout: int,
    ) -> None:
        super().__init__()
        self.rate_limit = rate_limit
        self.awaiting_webhook_seconds = awaiting_webhook_seconds
        self.worker_concurrency = worker_concurrency
        self.heartbeat_timeout = heartbeat_timeout
        self.queued_timeout = queued_timeout
        self.postgres: PostgresServer | None = None
        self.redis: RedisServer | None = None

    # -- what this stack runs -------------------------------------------------------------------

    def modelroute_args(self) -> list[str]:
        return [
            "--pending-seconds",
            "1",
            "--awaiting-webhook-seconds",
            str(self.awaiting_webhook_seconds),
            "--rate-limit",
            str(self.rate_limit),
            "--rate-window",
            "60",
            "--execution-ttl",
            "3600",
        ]

    def dag_files(self) -> list[Path]:
        return sorted(DAGS.glob("*.py"))

    def airflow_commands(self) -> dict[str, list[str]]:
        airflow = [PYTHON, "-m", "airflow"]
        commands = {name: [*airflow, name] for name in ("dag-processor", "scheduler")}
        for name in self.TRIGGERERS:
            commands[name] = [*airflow, "triggerer", "--skip-serve-logs"]
        for name in self.WORKERS:
            commands[name] = [
                *airflow,
                "celery",
                "worker",
                "--celery-hostname",
                f"{name}@%h",
                "--concurrency",
                str(self.worker_concurrency),
                "--pid",
                str(self.home / f"{name}.pid"),
                "--skip-serve-logs",
                "--without-gossip",
                "--without-mingle",
            ]
        return commands

    def _component(self, name: str, argv: list[str]) -> Component:
        component = super()._component(name, argv)
        component.extra_env = {"DRILL_HOSTNAME": name}
        return component

    @property
    def parallelism(self) -> int:
        """Tasks the scheduler hands the executor at once: the workers' slots, so none waits long queued."""
        return self.worker_concurrency * len(self.WORKERS)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> DistributedStack:
        started = time.monotonic()
        self.components_dir.mkdir(parents=True, exist_ok=True)
        binaries = service_binaries()
        self.postgres = PostgresServer(binaries["postgresql"], self.components_dir / "postgres.log")
        self.postgres.start()
        self.redis = RedisServer(
            binaries["redis-server"], self.components_dir / "redis.log", self.home / "redis"
        )
        self.redis.start()
        self.timings["services"] = time.monotonic() - started
        super().start()
        self.timings["startup"] = time.monotonic() - started
        return self

    def _prepare_home(self) -> None:
        super()._prepare_home()
        assert self.postgres is not None and self.redis is not None
        self.env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS")
        self.env.update(
            {
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.postgres.url,
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
                "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(self.parallelism),
                "AIRFLOW__CELERY__BROKER_URL": self.redis.url,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
                # A task whose worker died stops heartbeating: the scheduler fails that try (it is
                # then retried); one the dead worker had taken but not started stays queued.
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(self.heartbeat_timeout),
                "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(self.queued_timeout),
            }
        )
        # The provider's default retry policy, not the other drills' fast one: these drills measure
        # what a deployment would see.
        conn = json.loads(self.env["AIRFLOW_CONN_MODELROUTE_DEFAULT"])
        conn["extra"] = {k: v for k, v in conn["extra"].items() if k not in CONNECTION_EXTRAS}
        self.env["AIRFLOW_CONN_MODELROUTE_DEFAULT"] = json.dumps(conn)
        # Each component names itself (triggerer jobs and task instances record the hostname), so
        # the drills can tell which triggerer holds a trigger and which worker runs a task.
        (self.home / "config" / "drill_hostname.py").write_text(HOSTNAME_MODULE)
        self.env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] = "drill_hostname.hostname"

    def stop(self) -> None:
        super().stop()
        for service in (self.redis, self.postgres):
            if service is not None:
                service.stop()

    def tails(self, lines: int = 30) -> str:
        services = [s.component for s in (self.postgres, self.redis) if s is not None]
        parts = [f"--- {c.name} ({c.log_path}) ---\n{c.tail(lines)}" for c in services]
        return "\n".join([super().tails(lines), *parts])

    def healthy(self) -> bool:
        """The base checks, and both Celery workers answering a ping."""
        return super().healthy() and self.workers_online() == len(self.WORKERS)

    def workers_online(self) -> int:
        """Celery workers that answer ``celery inspect ping`` through the broker."""
        from celery import Celery

        assert self.redis is not None
        app = Celery(broker=self.redis.url)
        try:
            replies = app.control.ping(timeout=2) or []
        finally:
            app.close()
        return sum(1 for reply in replies for name in reply if name.split("@")[0] in self.WORKERS)

    def cpu_seconds(self) -> dict[int, float]:
        """CPU seconds used so far per live process session of the stack (reaped children included)."""
        sessions = [c.session_id for c in self.components.values() if c.alive]
        sessions += [s.component.session_id for s in (self.postgres, self.redis) if s and s.component.alive]
        return {sid: session_cpu_seconds(sid) for sid in sessions if sid is not None}


def session_cpu_seconds(session_id: int) -> float:
    """User + system time of a session's live processes and of the children they have reaped."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:
            ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def describe_versions() -> dict[str, Any]:
    """Versions of what the stack runs, for the results table (installs the services if missing)."""
    from importlib.metadata import version

    binaries = service_binaries()
    return {
        "airflow": version("apache-airflow"),
        "celery provider": version("apache-airflow-providers-celery"),
        "celery": version("celery"),
        "psycopg2": version("psycopg2-binary").split()[0],
        "postgresql": command_version([binaries["postgresql"], "--version"]),
        "redis": command_version([binaries["redis-server"], "--version"]),
    }


def command_version(argv: list[str]) -> str:
    """The first version number a ``--version`` prints ("?" when there is none)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        output = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
        found = re.search(r"\d+\.\d+(\.\d+)?", output)
        if found:
            return found[0]
    return "?"
