"""Metrics: a DAG run in its own Airflow process sends the provider's metrics to a loopback StatsD.

Airflow is configured only through the environment (``[metrics] statsd_on``, host, port), as a
deployment would be; the test's UDP socket is the StatsD server.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_provider_modelroute.testing import ModelRouteServer
from tests.airflow_cli import describe, run_dag_file
from tests.conftest import connection_json

pytest.importorskip("statsd", reason="Airflow's StatsD client (apache-airflow[statsd])")

DAG_SOURCE = """
from datetime import datetime

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.transfers.modelroute import ModelRouteToStorageOperator

with DAG("{dag_id}", schedule=None, start_date=datetime(2026, 1, 1)):
    generate = ModelRouteExecuteOperator(
        task_id="generate",
        model="test-image",
        input={{"prompt": "a red fox", "_simulate": {{"seconds": 1.5}}}},
        poll_interval=0.2,
    )
    store = ModelRouteToStorageOperator(
        task_id="store",
        execution_id="{{{{ ti.xcom_pull(task_ids='generate', key='execution_id') }}}}",
        destination="file://{destination}/",
    )
    generate >> store
"""


@pytest.fixture
def statsd() -> Iterator[socket.socket]:
    """A StatsD server: a UDP socket on loopback whose buffer keeps every datagram until read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[tuple[str, float, str]]:
    """Every StatsD line received so far, as (name, value, type)."""
    sock.setblocking(False)
    lines = []
    while True:
        try:
            datagram = sock.recv(65536)
        except BlockingIOError:
            return lines
        for line in datagram.decode().splitlines():
            match = re.fullmatch(r"(?P<name>[^:]+):(?P<value>[-\d.]+)\|(?P<type>\w+)(\|.*)?", line)
            assert match, f"not a StatsD line: {line!r}"
            lines.append((match["name"], float(match["value"]), match["type"]))


def total(lines: list[tuple[str, float, str]], name: str) -> float:
    return sum(value for metric, value, _ in lines if metric == name)


def test_a_dag_run_sends_the_provider_metrics(statsd: socket.socket, tmp_path: Path) -> None:
    # Two requests per second: the polls must wait for the window to reopen (the rate budget).
    with ModelRouteServer(rate_limit=2, rate_window=1.0, pending_seconds=0.1) as server:
        server.add_fault("GET /v1/executions/{id}", "rate_limit", count=1, retry_after=0)  # one 429
        destination = tmp_path / "out"
        result = run_dag_file(
            tmp_path / "dags",
            "metrics_generate_then_store",
            DAG_SOURCE.format(dag_id="metrics_generate_then_store", destination=destination),
            {
                "AIRFLOW_CONN_MODELROUTE_DEFAULT": connection_json(server),
                "AIRFLOW__METRICS__STATSD_ON": "True",
                "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
                "AIRFLOW__METRICS__STATSD_PORT": str(statsd.getsockname()[1]),
                "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
            },
        )
        assert result.returncode == 0, describe(result)
        polls = server.stats()["requests"]["GET /v1/executions/{id}"]
    lines = received(statsd)
    names = sorted({name for name, _, _ in lines if ".modelroute." in name})
    shown = json.dumps(names, indent=1)

    assert total(lines, "airflow.modelroute.request.post_executions.ok") == 1, shown
    assert total(lines, "airflow.modelroute.request.get_executions.rate_limited") == 1, shown
    assert total(lines, "airflow.modelroute.request.get_executions.ok") == polls - 1, shown
    assert total(lines, "airflow.modelroute.rate_limited") == 1, shown
    assert total(lines, "airflow.modelroute.retry") >= 1, shown  # the 429 was retried
    [(_, seconds_to_end, kind)] = [line for line in lines if line[0].endswith("execution.poll_to_terminal")]
    assert kind == "ms" and seconds_to_end > 1000  # the execution ran 1.5 s after the first poll
    waits = [value for name, value, kind in lines if name == "airflow.modelroute.rate_budget.wait"]
    assert waits and all(value > 0 for value in waits), shown
    [copied] = destination.iterdir()
    assert total(lines, "airflow.modelroute.bytes.download") == copied.stat().st_size, shown
