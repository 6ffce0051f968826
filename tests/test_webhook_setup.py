"""The setup CLI: registers the receiver, stores the secret (or says where to add it and what to restart),
never echoes it; ``test`` reports the receiver's answer to a signed delivery and to ModelRoute's own."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.version_compat import AIRFLOW_V_3_1_PLUS
from airflow_provider_modelroute.webhooks import mode, receiver
from airflow_provider_modelroute.webhooks.__main__ import main
from tests.conftest import connection_json
from tests.webhook_capture import endpoints_cleared, served_receiver

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


def printed_extras(out: str) -> dict[str, Any]:
    """The extras setup printed for a connection it cannot write (a JSON object on a line of its own)."""
    [line] = [line for line in out.splitlines() if line.startswith("{")]
    return dict(json.loads(line))


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
    assert "Nothing to restart" in out.out

    assert main(argv) == 1  # already registered: its secret cannot be shown again
    assert "--replace" in capsys.readouterr().err
    assert main([*argv, "--replace"]) == 0
    [replacement] = server.webhooks.endpoints.values()
    assert replacement.id != endpoint.id and stored_extras()["webhook_secret"] == replacement.secret


def test_setup_says_what_to_add_and_restart_for_an_environment_connection(
    airflow_db: None, no_endpoints: ModelRouteServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["setup", "--public-url", "https://airflow.example.com"]) == 0  # AIRFLOW_CONN_... connection
    [endpoint] = no_endpoints.webhooks.endpoints.values()
    out = capsys.readouterr().out
    assert printed_extras(out) == {"webhook_secret": endpoint.secret, "webhook_receiver_url": endpoint.url}
    assert "AIRFLOW_CONN_MODELROUTE_DEFAULT" in out and "restart" in out and "api-server" in out
    assert "--conn-id modelroute_default test" in out
    assert out.count(endpoint.secret) == 1  # the extras line only
    assert no_endpoints.webhooks.deliveries() == []  # nothing can answer before the restart: no test yet


def test_setup_tests_the_receiver_it_stored_the_secret_for(
    stored_connection: str, server: ModelRouteServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.webhook_capture import CaptureServer

    with CaptureServer() as capture:
        assert main(["--conn-id", CONN_ID, "setup", "--public-url", capture.url]) == 0
        ours, modelroutes = capture.wait_for("both test deliveries", lambda r: len(r) == 2)
    assert ours.path == modelroutes.path == f"/modelroute/webhooks/{CONN_ID}"
    secret = stored_extras()["webhook_secret"]
    for delivery in (ours, modelroutes):
        mode.verify(
            secret, delivery.headers["X-Signature"], delivery.headers["X-Signature-Timestamp"], delivery.body
        )
    out = capsys.readouterr().out
    assert "answered 200: it verified" in out and "got a 2xx from the receiver" in out


@pytest.mark.skipif(not AIRFLOW_V_3_1_PLUS, reason="the receiver is an api-server plugin app (Airflow 3.1+)")
def test_the_test_command_reports_the_receivers_answer_and_what_to_do(
    no_endpoints: ModelRouteServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The receiver runs as the api-server mounts it; ``secret_cache`` holds what the api-server process sees
    (an environment variable changed after it started is not among it)."""
    from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

    monkeypatch.setattr(receiver, "secret_cache", {})
    monkeypatch.setattr(receiver, "SECRET_CACHE_SECONDS", 3600.0)
    with served_receiver() as base:
        url = f"{base}/modelroute/webhooks/modelroute_check"
        secret = str(ModelRouteHook().create_webhook_endpoint(url)["secret"])
        receivers = {
            "modelroute_check": url,
            "modelroute_stale": f"{base}/modelroute/webhooks/modelroute_stale",
            "modelroute_unset": f"{base}/modelroute/webhooks/modelroute_unset",
            "modelroute_elsewhere": f"{base}/airflow/webhooks/modelroute_elsewhere",
            "modelroute_closed": "http://127.0.0.1:9/modelroute/webhooks/modelroute_closed",
        }
        for conn_id, receiver_url in receivers.items():
            extras = {"webhook_secret": secret, "webhook_receiver_url": receiver_url}
            monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", connection_json(no_endpoints, **extras))
        receiver.secret_cache["modelroute_stale"] = (time.monotonic(), "whsec_before_the_change_0123456789")
        receiver.secret_cache["modelroute_unset"] = (time.monotonic(), "")

        answers = {}
        for conn_id in receivers:
            code = main(["--conn-id", conn_id, "test"])
            answers[conn_id] = (code, capsys.readouterr())

    ok_code, ok = answers["modelroute_check"]
    assert ok_code == 0, ok.out + ok.err
    assert "answered 200 (ignored: not an execution event): it verified" in ok.out
    assert "got a 2xx from the receiver" in ok.out
    expected = {
        "modelroute_stale": "holds another webhook_secret",
        "modelroute_unset": "does not see a webhook_secret",
        "modelroute_elsewhere": "answered 404: not as the receiver",
        "modelroute_closed": "Could not reach the receiver",
    }
    for conn_id, text in expected.items():
        code, printed = answers[conn_id]
        assert code == 1 and text in printed.out, (conn_id, printed)
    assert "restart the api-server" in answers["modelroute_stale"][1].out
    assert all(secret not in out.out + out.err for _, out in answers.values())


def test_the_test_command_without_a_secret_says_to_run_setup(
    no_endpoints: ModelRouteServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["test"]) == 1  # modelroute_default has no webhook secret: setup first
    assert "setup" in capsys.readouterr().err
