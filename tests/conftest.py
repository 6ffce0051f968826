"""Shared fixtures: an isolated Airflow home (one per process, so per xdist worker), the local ModelRoute
server, and connections to it."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Airflow reads its configuration at import time: isolate it before anything imports airflow.
_HOME = Path(tempfile.mkdtemp(prefix="modelroute-airflow-home-"))
REPO = Path(__file__).resolve().parent.parent
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "example_dags")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")

import pytest  # noqa: E402

from airflow_provider_modelroute.testing import ModelRouteServer  # noqa: E402
from airflow_provider_modelroute.testing.dialects import PRESETS, Dialect  # noqa: E402
from tests.airflow_versions import AIRFLOW_V_3_0_PLUS, AIRFLOW_V_3_1_PLUS  # noqa: E402

if AIRFLOW_V_3_0_PLUS and not AIRFLOW_V_3_1_PLUS:
    # Two gaps of Airflow 3.0's in-process dag.test() (a worker does not have them):
    # 1. It logs through structlog's default renderer: rich tracebacks, wrapped and coloured,
    #    which split messages. Render them plainly, as 3.3 does.
    import structlog

    structlog.configure(
        processors=[
            *structlog.get_config()["processors"][:-1],
            structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback),
        ]
    )

    # 2. Its client builds TaskRescheduleStartDate with model_construct (no validation), and a
    #    worker's comms validate it on the way to the task; in-process, the start date stays a str
    #    and every reschedule-mode sensor fails at its second poke. Validate it, as a worker does.
    from airflow.sdk.api.client import TaskInstanceOperations
    from airflow.sdk.execution_time.comms import TaskRescheduleStartDate

    def _get_reschedule_start_date(self: Any, id: Any, try_number: int = 1) -> Any:
        resp = self.client.get(f"task-reschedules/{id}/start_date", params={"try_number": try_number})
        return TaskRescheduleStartDate.model_validate({"start_date": resp.json()})

    TaskInstanceOperations.get_reschedule_start_date = _get_reschedule_start_date  # type: ignore[method-assign]

if AIRFLOW_V_3_0_PLUS:
    # Airflow 3.0-3.2's in-process dag.test() builds the whole Execution API app (Cadwyn's versioned
    # routes, ~5 s of CPU) for every task it runs; 3.3 builds it once per process. Do as 3.3 does.
    import functools

    from airflow.sdk.execution_time import supervisor

    if not hasattr(supervisor.in_process_api_server, "cache_info"):
        supervisor.in_process_api_server = functools.lru_cache(maxsize=1)(supervisor.in_process_api_server)

#: Test modules whose outcome depends on neither the Airflow version nor the Python or dependency
#: versions a matrix cell installs: the local server's own tests, the pure webhook core, the
#: benchmarks' smoke runs. `make test` runs them; `make test-matrix` cells skip them.
VERSION_INDEPENDENT = frozenset(
    {"test_server.py", "test_server_cli.py", "test_webhooks_core.py", "test_benchmarks.py"}
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "version_independent: run once (`make test`), not in every matrix cell"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in VERSION_INDEPENDENT:
            item.add_marker(pytest.mark.version_independent)


#: Retry quickly in tests; the policy is the same, only the waits are shorter. The read timeout stays
#: long: on a loaded machine a slow answer must not turn into a retry that a test's counts do not expect
#: (tests of timeouts set their own).
FAST_RETRY_EXTRAS = {"retry_base_wait": 0.01, "retry_max_wait": 0.2, "max_retries": 4, "timeout": 60}


def connection_json(server: ModelRouteServer, **extra: object) -> str:
    """The ``AIRFLOW_CONN_*`` JSON for a connection to the local server."""
    conn = server.airflow_connection()
    conn["extra"] = {**conn.get("extra", {}), **FAST_RETRY_EXTRAS, **extra}
    return json.dumps(conn)


#: The rate limit of the shared test server: its headers are on every answer, the limit never bites.
TEST_RATE_LIMIT = 1_000_000


@pytest.fixture(scope="session")
def modelroute_server() -> Iterator[ModelRouteServer]:
    with ModelRouteServer(
        pending_seconds=0.05,
        processing_seconds=0.1,
        awaiting_webhook_seconds=0.05,
        rate_limit=TEST_RATE_LIMIT,
        dialect="literal",
    ) as server:
        yield server


@pytest.fixture
def server(
    modelroute_server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModelRouteServer]:
    """The local server (literal dialect), reset, with ``modelroute_default`` pointing at it."""
    modelroute_server.reset()
    modelroute_server.dialect = "literal"
    monkeypatch.setenv("AIRFLOW_CONN_MODELROUTE_DEFAULT", connection_json(modelroute_server))
    yield modelroute_server
    modelroute_server.dialect = "literal"


@pytest.fixture(params=list(PRESETS))
def dialect(request: pytest.FixtureRequest, server: ModelRouteServer) -> Dialect:
    """Each dialect preset in turn, played by ``server`` (see ``testing/dialects.py``)."""
    server.dialect = request.param
    return server.dialect


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Create Airflow's metadata DB once per session (only tests that run DAGs need it)."""
    from airflow.utils import db

    db.resetdb()
    if AIRFLOW_V_3_0_PLUS:
        from airflow.dag_processing.bundles.manager import DagBundlesManager

        DagBundlesManager().sync_bundles_to_db()


def _dagbag_module() -> Any:
    """``airflow.dag_processing.dagbag`` from Airflow 3.2, ``airflow.models.dagbag`` before."""
    try:
        from airflow.dag_processing import dagbag
    except ImportError:  # 2.11 to 3.1
        from airflow.models import dagbag
    return dagbag


def dag_bag(folder: str | Path) -> Any:
    """A DagBag of one folder (LOAD_EXAMPLES is off for the session)."""
    return _dagbag_module().DagBag(dag_folder=str(folder))


def run_dag(dag: Any, **kwargs: Any) -> Any:
    """Run a DAG in-process with ``dag.test()`` and return its DagRun (whatever the outcome)."""
    if AIRFLOW_V_3_1_PLUS:  # from 3.1, a DAG built in a test must be serialized before dag.test()
        bag = dag_bag(os.devnull)
        bag.bag_dag(dag)
        _dagbag_module().sync_bag_to_db(bag, "dags-folder", None)
        return dag.test(**kwargs)
    # 2.11's and 3.0's dag.test() add a StreamHandler to "airflow.task" once per process, bound to
    # the sys.stdout of that moment (the first test's capture): drop it so that it is added again
    # for this run and the task log reaches this test's capsys, as it does on 3.3.
    task_logger = logging.getLogger("airflow.task")
    for handler in [h for h in task_logger.handlers if type(h) is logging.StreamHandler]:
        task_logger.removeHandler(handler)
    if AIRFLOW_V_3_0_PLUS:  # 3.0 needs it too, for its outlets (assets must be active)
        if dag.relative_fileloc is None:  # what a DagBag sets for a DAG it parsed from a file
            dag.relative_fileloc = dag.fileloc
        bag = dag_bag(os.devnull)
        bag.bag_dag(dag)
        bag.sync_to_db("dags-folder", None)
        return dag.test(**kwargs)
    return _run_dag_airflow_2(dag, **kwargs)


def _run_dag_airflow_2(dag: Any, **kwargs: Any) -> Any:
    """``dag.test()`` on Airflow 2.11, which lets a task timeout escape."""
    from airflow.exceptions import AirflowTaskTimeout

    try:
        return dag.test(**kwargs)
    except AirflowTaskTimeout:
        # A BaseException on 2.x: it escapes dag.test() (which catches Exception) after the task
        # was marked failed. Settle the run as the scheduler would; 3.x's dag.test() does this.
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            dag_run = session.scalars(
                select(DagRun).where(DagRun.dag_id == dag.dag_id).order_by(DagRun.id.desc()).limit(1)
            ).one()
            dag_run.dag = dag
            dag_run.update_state(session=session)
            session.commit()
            session.refresh(dag_run)
            session.expunge(dag_run)
            return dag_run


def needs_airflow_sdk(reason: str) -> pytest.MarkDecorator:
    """Skip on Airflow 2.11, which has no ``airflow.sdk`` (the example DAGs and README use it)."""
    return pytest.mark.skipif(not AIRFLOW_V_3_0_PLUS, reason=f"{reason} imports airflow.sdk (Airflow 3+)")


def memory_uri(path: str) -> str:
    """How ``memory://`` + ``path`` reads back from an ``ObjectStoragePath`` with its credentials dropped.

    universal-pathlib 0.3+ (Airflow 3.3 requires it) gives ``memory://path``; 0.2 (2.11 requires it,
    3.0 allows it) gives ``memory:///path``, which ``urlunsplit`` shortens to ``memory:/path``.
    """
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("universal-pathlib")) >= Version("0.3"):
        return f"memory://{path.lstrip('/')}"
    return f"memory:/{path.lstrip('/')}"


def attach_filesystem(protocol: str, fs: Any) -> None:
    """Register an fsspec filesystem for ``ObjectStoragePath`` URLs of ``protocol`` (2.11 and 3.x)."""
    if AIRFLOW_V_3_0_PLUS:
        from airflow.sdk.io import attach

        attach(protocol, fs=fs)
    else:
        from airflow.io.store import attach as attach_on_airflow_2

        attach_on_airflow_2(protocol, fs=fs)  # noqa: AIR311 (its 2.11 home: this branch runs only there)


def task_states(dag_run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def xcom(dag_run: Any, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    """Read one XCom value of a finished DagRun from the metadata DB."""
    from airflow.utils.session import create_session

    if AIRFLOW_V_3_0_PLUS:
        from airflow.models.xcom import XComModel

        with create_session() as session:
            query = XComModel.get_many(
                run_id=dag_run.run_id,
                dag_ids=dag_run.dag_id,
                task_ids=task_id,
                key=key,
                map_indexes=map_index,
            )
            row = session.scalars(query).first()
            return XComModel.deserialize_value(row) if row is not None else None
    from airflow.models.xcom import XCom

    with create_session() as session:
        return XCom.get_one(
            run_id=dag_run.run_id,
            dag_id=dag_run.dag_id,
            task_id=task_id,
            key=key,
            map_index=map_index,
            session=session,
        )


def make_dag(dag_id: str, **kwargs: Any) -> Any:
    """A manually triggered DAG for one test (dag ids must be unique per test: runs are kept)."""
    from datetime import datetime, timezone

    from airflow.providers.common.compat.sdk import DAG

    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in dag_id)
    return DAG(safe_id, schedule=None, start_date=datetime(2026, 1, 1, tzinfo=timezone.utc), **kwargs)


def task_instance(dag_run: Any, task_id: str) -> Any:
    return next(ti for ti in dag_run.get_task_instances() if ti.task_id == task_id)


# --- S3 on loopback (moto), for the transfer tests ---------------------------------------------


@pytest.fixture(scope="session")
def moto_s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback for the whole session (~2 s to start)."""
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    yield f"http://{host}:{port}"
    moto.stop()


class S3Bucket:
    """A fresh bucket on the moto server, its boto3 client, and the Airflow ``aws`` connection to it."""

    def __init__(self, name: str, client: Any, conn_id: str) -> None:
        self.name, self.client, self.conn_id = name, client, conn_id

    def keys(self, prefix: str = "") -> list[str]:
        listing = self.client.list_objects_v2(Bucket=self.name, Prefix=prefix)
        return sorted(item["Key"] for item in listing.get("Contents", []))

    def read(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def pending_uploads(self) -> list[str]:
        listing = self.client.list_multipart_uploads(Bucket=self.name)
        return [upload["Key"] for upload in listing.get("Uploads", [])]


@pytest.fixture
def s3_bucket(moto_s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A new bucket per test, reachable from Airflow through the ``aws_moto`` connection."""
    import uuid

    import boto3

    credentials = {"aws_access_key_id": "testing-key", "aws_secret_access_key": "testing-secret"}
    conn = {
        "conn_type": "aws",
        "login": credentials["aws_access_key_id"],
        "password": credentials["aws_secret_access_key"],
        "extra": {"endpoint_url": moto_s3_endpoint, "region_name": "us-east-1"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_AWS_MOTO", json.dumps(conn))
    client = boto3.client("s3", endpoint_url=moto_s3_endpoint, region_name="us-east-1", **credentials)
    name = f"modelroute-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return S3Bucket(name, client, "aws_moto")
