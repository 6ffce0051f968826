"""The transport on real TLS (a local CA from trustme), through a real CONNECT proxy, against servers
that close kept-alive connections: the sync hook and the async client (triggers) behave the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from airflow_provider_modelroute import api
from airflow_provider_modelroute.exceptions import (
    ModelRouteConfigError,
    ModelRouteTransferError,
)
from airflow_provider_modelroute.hooks.modelroute import ModelRouteAsyncHook, ModelRouteHook
from airflow_provider_modelroute.hooks.storage import check_storage_url
from airflow_provider_modelroute.hooks.transport import ConnectionSettings, Transport
from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.triggers.modelroute import ModelRouteExecutionTrigger
from tests.conftest import FAST_RETRY_EXTRAS
from tests.nettools import CannedServer, ConnectProxy, TlsFront

CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CA or proxy variable of the machine running the tests leaks into them."""
    for name in (*CA_VARIABLES, *PROXY_VARIABLES, "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A local CA, a server certificate for 127.0.0.1, and a client certificate, as PEM files."""
    ca = trustme.CA()
    folder = tmp_path_factory.mktemp("pki")
    files = {"ca": folder / "ca.pem", "server": folder / "server.pem", "client": folder / "client.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(files["server"]))
    ca.issue_cert("airflow-worker").private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    return {"ca_object": ca, **{name: str(path) for name, path in files.items()}}


@pytest.fixture(scope="module")
def tls_server(pki: dict[str, Any]) -> Iterator[ModelRouteServer]:
    """The local ModelRoute API and storage host, both on https with the local CA's certificate."""
    # the presigned reading of /download, so that downloads reach the storage host too
    with ModelRouteServer(
        pending_seconds=0.05,
        processing_seconds=0.1,
        awaiting_webhook_seconds=0,
        rate_limit=None,
        dialect="presigned",
        ssl_certfile=pki["server"],
    ) as server:
        yield server


def server_tls(pki: dict[str, Any], client_ca: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server"])
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki["ca"])
    return context


def use(monkeypatch: pytest.MonkeyPatch, conn_id: str, host: str, api_key: str, **extra: Any) -> None:
    conn = {
        "conn_type": "modelroute",
        "host": host,
        "password": api_key,
        "extra": {"allow_insecure_storage_urls": True, **FAST_RETRY_EXTRAS, **extra},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.01)


def start(conn_id: str, seconds: float = 0.2) -> str:
    created = ModelRouteHook(conn_id).create_execution(
        "test-image", {"prompt": "p", "_simulate": {"seconds": seconds}}
    )
    return str(created["id"])


def trigger_events(execution_id: str, conn_id: str, poll_interval: float = 0.05) -> list[dict[str, Any]]:
    trigger = ModelRouteExecutionTrigger(
        execution_id, modelroute_conn_id=conn_id, poll_interval=poll_interval
    )

    async def collect() -> list[dict[str, Any]]:
        return [dict(event.payload) async for event in trigger.run()]

    return asyncio.run(collect())


def download(conn_id: str, execution_id: str) -> bytes:
    hook = ModelRouteHook(conn_id)
    file_id = api.result_files(hook.get_execution(execution_id))[0]["file_id"]
    return b"".join(hook.download_file(file_id))


# -- TLS: trusted through the connection extra or the environment, clear failure otherwise ---------


def test_tls_trusted_through_the_extra(
    tls_server: ModelRouteServer, pki: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, "mr_tls", tls_server.base_url, tls_server.api_key, ca_bundle=pki["ca"])
    execution_id = start("mr_tls")
    events = trigger_events(execution_id, "mr_tls")
    assert [e["status"] for e in events] == ["done"] and events[0]["execution"]["status"] == "COMPLETED"
    body = download("mr_tls", execution_id)  # the storage host is https too, trusted the same way
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        len(body)
        == tls_server.file_info(api.result_files(events[0]["execution"])[0]["file_id"])["size_bytes"]
    )


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"])
def test_tls_trusted_through_the_environment(
    tls_server: ModelRouteServer, pki: dict[str, Any], monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, pki["ca"])
    use(monkeypatch, "mr_tls", tls_server.base_url, tls_server.api_key)
    execution_id = start("mr_tls")  # sync
    events = trigger_events(execution_id, "mr_tls")  # async: the same variable means the same
    assert [e["status"] for e in events] == ["done"]
    assert download("mr_tls", execution_id)[:4] == b"\x89PNG"


def test_untrusted_certificate_fails_at_once_naming_the_fix(
    tls_server: ModelRouteServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    use(monkeypatch, "mr_tls", tls_server.base_url, tls_server.api_key)
    requests_before = sum(tls_server.stats()["requests"].values())
    caplog.set_level(logging.INFO)
    with pytest.raises(ModelRouteConfigError, match=r"ca_bundle.*SSL_CERT_FILE") as sync_error:
        ModelRouteHook("mr_tls").get_execution("exec_1")
    assert "CERTIFICATE_VERIFY_FAILED" in str(sync_error.value)
    events = trigger_events("exec_1", "mr_tls")
    assert len(events) == 1 and events[0]["status"] == "error"
    assert events[0]["error"]["code"] == "ModelRouteConfigError"
    assert "ca_bundle" in events[0]["error"]["message"]
    logs = caplog.text + capsys.readouterr().out  # Airflow 3 logs hooks through structlog (stdout)
    assert "retry" not in logs
    assert sum(tls_server.stats()["requests"].values()) == requests_before


def test_client_certificate_from_the_extras(
    server: ModelRouteServer, pki: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    api_port = int(server.base_url.rsplit(":", 1)[1])
    with TlsFront(api_port, server_tls(pki, client_ca=True), idle=60) as front:
        use(
            monkeypatch,
            "mr_mtls",
            front.base_url,
            server.api_key,
            ca_bundle=pki["ca"],
            client_cert=pki["client"],
        )
        execution_id = start("mr_mtls")  # sync
        assert [e["status"] for e in trigger_events(execution_id, "mr_mtls")] == ["done"]  # async
    assert len(front.client_certs) >= 2  # a connection of each path, each showing the certificate
    assert all("airflow-worker" in str(cert) for cert in front.client_certs)


# -- kept-alive TLS connections that the server closes -----------------------------------------------


@pytest.mark.parametrize("when", ["idle", "on_reuse"])
@pytest.mark.parametrize("close", ["close_notify", "reset"])
def test_server_closing_kept_alive_tls_connections_is_no_error(
    server: ModelRouteServer,
    pki: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    close: str,
    when: str,
) -> None:
    api_port = int(server.base_url.rsplit(":", 1)[1])
    with TlsFront(api_port, server_tls(pki), close=close, when=when) as front:
        use(monkeypatch, "mr_front", front.base_url, server.api_key, ca_bundle=pki["ca"])
        execution_id = start("mr_front", seconds=3600)
        hook = ModelRouteHook("mr_front")
        for _ in range(3):  # sync: each call finds the previous one's connection closed
            closed = front.closed_by_us
            hook.get_execution(execution_id)
            if when == "idle":
                wait_for(
                    lambda closed=closed: front.closed_by_us > closed, "the front to close the connection"
                )
        caplog.set_level(logging.INFO)
        caplog.clear()
        capsys.readouterr()
        closed = front.closed_by_us

        def complete_after_three_closes() -> None:  # the polls meet closes, however slow the machine
            try:
                wait_for(lambda: front.closed_by_us >= closed + 3, "3 closes during the trigger's polls")
            finally:
                server.set_execution_status(execution_id, "COMPLETED")

        completer = threading.Thread(target=complete_after_three_closes)
        completer.start()
        events = trigger_events(execution_id, "mr_front", poll_interval=0.15)
        completer.join()
        trigger_logs = caplog.text + capsys.readouterr().out
    assert [e["status"] for e in events] == ["done"]
    assert events[0]["execution"]["status"] == "COMPLETED"
    assert front.closed_by_us >= 5, "the server closed too few connections for the test to mean anything"
    assert server.execution_ids() == [execution_id]  # no extra execution
    assert "is COMPLETED" in trigger_logs  # (the logs are captured)
    assert "failed" not in trigger_logs  # not one failed request or poll


# -- proxies ----------------------------------------------------------------------------------------------


def test_https_proxy_is_used_and_no_proxy_bypasses_it(
    tls_server: ModelRouteServer, pki: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, "mr_tls", tls_server.base_url, tls_server.api_key, ca_bundle=pki["ca"])
    api_host = tls_server.base_url.removeprefix("https://")
    storage_host = tls_server.storage_url.removeprefix("https://")
    with ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        execution_id = start("mr_tls")  # sync
        assert proxy.tunnels == [api_host]
        assert [e["status"] for e in trigger_events(execution_id, "mr_tls")] == ["done"]  # async
        assert len(proxy.tunnels) >= 2 and set(proxy.tunnels) == {api_host}
        assert download("mr_tls", execution_id)[:4] == b"\x89PNG"  # storage goes through it too
        assert storage_host in proxy.tunnels

        proxy.tunnels.clear()
        monkeypatch.setenv("NO_PROXY", "example.com,127.0.0.0/8")  # an IP range: on both paths
        execution_id = start("mr_tls")
        assert [e["status"] for e in trigger_events(execution_id, "mr_tls")] == ["done"]
        assert download("mr_tls", execution_id)[:4] == b"\x89PNG"
        assert proxy.tunnels == []


def test_a_proxy_refusing_the_tunnel_fails_at_once(
    tls_server: ModelRouteServer, pki: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, "mr_tls", tls_server.base_url, tls_server.api_key, ca_bundle=pki["ca"])
    with ConnectProxy(refuse="407 Proxy Authentication Required") as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        with pytest.raises(ModelRouteConfigError, match=r"proxy refused the request \(HTTP 407\)"):
            ModelRouteHook("mr_tls").get_execution("exec_1")
        assert len(proxy.tunnels) == 1  # not retried
        events = trigger_events("exec_1", "mr_tls")
        assert events[0]["status"] == "error" and "HTTPS_PROXY" in events[0]["error"]["message"]
        assert len(proxy.tunnels) == 2


# -- what is never retried, and what is -----------------------------------------------------------------

_EXECUTION = b'{"id": "exec_1", "status": "PROCESSING"}'
_TRAILING_BYTES = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_EXECUTION), _EXECUTION)
    + b"HTTP/1.1 500 Stray\r\n\r\n"  # bytes after the response: must never be read as the next one
)


def test_bytes_after_a_response_do_not_desynchronise_the_next(
    monkeypatch: pytest.MonkeyPatch, server: ModelRouteServer
) -> None:
    with CannedServer(_TRAILING_BYTES) as canned:
        use(monkeypatch, "mr_canned", canned.base_url, server.api_key)
        hook = ModelRouteHook("mr_canned")
        assert [hook.get_execution("exec_1")["status"] for _ in range(3)] == ["PROCESSING"] * 3

        async def poll() -> list[str]:
            async with ModelRouteAsyncHook("mr_canned") as client:
                return [(await client.get_execution("exec_1"))["status"] for _ in range(3)]

        assert asyncio.run(poll()) == ["PROCESSING"] * 3
        assert canned.requests == 6  # none failed, none retried


def test_storage_5xx_during_a_download_is_retried(server: ModelRouteServer) -> None:
    server.dialect = "presigned"  # /download answers a presigned URL: the bytes come from storage
    execution_id = start("modelroute_default", seconds=0.05)
    assert [e["status"] for e in trigger_events(execution_id, "modelroute_default")] == ["done"]
    server.add_fault("GET /files/{file_id}", "error", count=2)
    body = download("modelroute_default", execution_id)
    assert body[:4] == b"\x89PNG"
    assert server.stats()["requests"]["GET /files/{file_id}"] == 3


# -- storage URL checks never resolve names ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://storage.example.invalid/f?X-Amz-Signature=s", True),  # unresolvable: not looked up
        ("https://s3.amazonaws.com/bucket/f", True),
        ("http://s3.amazonaws.com/bucket/f", False),
        ("https://169.254.169.254/latest/meta-data", False),
        ("https://10.0.0.7/f", False),
        ("https://[::1]/f", False),
        ("https://localhost/f", False),
        ("ftp://example.com/f", False),
    ],
)
def test_storage_url_check_without_dns(url: str, allowed: bool) -> None:
    core = Transport(
        ConnectionSettings(base_url="https://api.modelroute.ai", api_key="sk_test_key"), logging.getLogger()
    )
    if allowed:
        assert check_storage_url(core, url) == url
    else:
        with pytest.raises(ModelRouteTransferError, match="Refusing storage URL"):
            check_storage_url(core, url)


def test_tls_files_named_in_extras_must_exist(
    tls_server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use(
        monkeypatch,
        "mr_tls",
        tls_server.base_url,
        tls_server.api_key,
        ca_bundle=str(tmp_path / "missing.pem"),
    )
    with pytest.raises(ModelRouteConfigError, match=r"'ca_bundle'.*does not exist"):
        ModelRouteHook("mr_tls").get_execution("exec_1")


def test_every_extra_the_hook_reads_is_in_the_connection_form() -> None:
    import inspect
    import re

    from airflow_provider_modelroute.get_provider_info import get_provider_info
    from airflow_provider_modelroute.hooks import transport

    fields = get_provider_info()["connection-types"][0]["conn-fields"]
    source = inspect.getsource(transport.ConnectionSettings.from_connection)
    read = set(re.findall(r"(?:number|path|extra_value)\((?:values, )?\"(\w+)\"", source))
    assert {"timeout", "retry_base_wait", "retry_max_wait", "ca_bundle", "client_key"} <= read
    assert read <= set(fields)
    assert "SSL_CERT_FILE" in fields["ca_bundle"]["description"]
