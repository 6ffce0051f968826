"""The one-time setup CLI: registers the receiver, stores the secret in the connection, never echoes it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.webhooks.__main__ import main
from tests.conftest import connection_json
from tests.webhook_capture import endpoints_cleared

CONN_ID = "modelroute_setup"


@pytest.fixture
def no_endpoints(server: ModelRouteServer) -> Iterator[ModelRouteServer]:
    with endpoints_cleared(server):
        yield server


@pytest.fixture
def stored_connection(airflow_db: None, no_endpoints: ModelRouteServer) -> Iterator[str]:
    """A ModelRoute connection in the metadata DB (where setup can write the secret)."""
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    spec = json.loads(connection_json(no_endpoints))
    with create_session() as session:
        session.add(
            Connection(
                conn_id=CONN_ID,
                conn_type="modelroute",
                host=spec["host"],
                password=spec["password"],
                extra=json.dumps(spec["extra"]),
            )
        )
    yield CONN_ID
    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == CONN_ID).delete()


def stored_extras() -> dict[str, Any]:
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        conn = session.query(Connection).filter(Connection.conn_id == CONN_ID).one()
        return dict(conn.extra_dejson)


def test_setup_registers_the_receiver_and_stores_the_secret(
    stored_connection: str, server: ModelRouteServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--conn-id", CONN_ID, "setup", "--public-url", "https://airflow.example.com/", "--no-test"]
    assert main(argv) == 0
    [endpoint] = server.webhooks.endpoints.values()
    assert endpoint.url == f"https://airflow.example.com/modelroute/webhooks/{CONN_ID}"
    assert endpoint.events == ["execution.completed", "execution.failed", "execution.cancelled"]
    extras = stored_extras()
    assert extras["webhook_secret"] == endpoint.secret
    assert extras["webhook_receiver_url"] == endpoint.url
    assert extras["allow_insecure_storage_urls"] is True  # the other extras are kept
    out = capsys.readouterr()
    assert endpoint.id in out.out and endpoint.secret not in out.out + out.err

    assert main(argv) == 1  # already registered: its secret cannot be shown again
    assert "--replace" in capsys.readouterr().err
    assert main([*argv, "--replace"]) == 0
    [replacement] = server.webhooks.endpoints.values()
    assert replacement.id != endpoint.id and stored_extras()["webhook_secret"] == replacement.secret


def test_setup_prints_the_extras_for_a_connection_it_cannot_write(
    airflow_db: None, no_endpoints: ModelRouteServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["setup", "--public-url", "https://airflow.example.com", "--no-test"]) == 0  # env connection
    [endpoint] = no_endpoints.webhooks.endpoints.values()
    printed = capsys.readouterr().out
    extras = json.loads(printed.strip().splitlines()[-1])
    assert extras == {"webhook_secret": endpoint.secret, "webhook_receiver_url": endpoint.url}


def test_setup_reports_whether_the_test_delivery_got_through(
    stored_connection: str, server: ModelRouteServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.webhook_capture import CaptureServer

    with CaptureServer() as receiver:
        assert main(["--conn-id", CONN_ID, "setup", "--public-url", receiver.url]) == 0
        [test] = receiver.wait_for("the test delivery", lambda r: len(r) == 1)
    assert test.path == f"/modelroute/webhooks/{CONN_ID}"
    assert "answered ModelRoute's test delivery" in capsys.readouterr().out


def test_list_test_and_delete_commands(
    no_endpoints: ModelRouteServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

    created = ModelRouteHook().create_webhook_endpoint("https://airflow.example.com/x")
    assert main(["list"]) == 0
    out = capsys.readouterr().out  # Airflow 3.0 also logs to stdout: the JSON is the last thing
    assert json.loads(out[out.index("[\n") :])[0]["id"] == created["id"]
    assert main(["test", created["id"]]) == 0
    assert main(["delete", created["id"]]) == 0
    assert no_endpoints.webhooks.endpoints == {}
    assert main(["delete", "not-an-id"]) == 1
    assert "wh_" in capsys.readouterr().err
