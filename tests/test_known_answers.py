"""Known answers from the API documentation, checked against the client and the local server alike.

Each answer is a literal, computed once from the docs (not from either side's code), so a wrong
reading on one side cannot hide behind the same reading on the other.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import requests

from airflow_provider_modelroute import api
from airflow_provider_modelroute.exceptions import ModelRouteError
from airflow_provider_modelroute.hooks.modelroute import ModelRouteAsyncHook, ModelRouteHook
from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.testing import ModelRouteServer, spec
from airflow_provider_modelroute.webhooks import mode

#: The docs' error table: code -> (HTTP status, None where the docs give none; retryable).
DOCUMENTED_ERRORS = {
    "INPUT_VALIDATION_ERROR": (400, False),
    "CONTENT_MODERATION_REJECTED": (400, False),
    "FILE_NOT_FOUND": (None, False),
    "FILE_FORMAT_UNSUPPORTED": (400, False),
    "INSUFFICIENT_BALANCE": (402, False),
    "RATE_LIMITED": (429, True),
    "MODEL_OVERLOADED": (503, True),
    "MODEL_UNAVAILABLE": (503, True),
    "GENERATION_TIMEOUT": (504, True),
    "GENERATION_FAILED": (500, True),
    "SERVICE_UNAVAILABLE": (503, True),
    "INTERNAL_ERROR": (500, False),
    "UNAUTHORIZED": (None, False),
}

#: hex(HMAC-SHA256(SECRET, "{TIMESTAMP}.{BODY}")), computed once from the documented formula.
SECRET = "whsec_known_answer_secret"
TIMESTAMP = "1767225600"
BODY = b'{"id":"evt_0001","event_type":"execution.completed","data":{"id":"exec_0001","status":"COMPLETED"}}'
SIGNATURE = "a4a0ed62c925a9c2eeb7459816779060c691329b69f5f066092e80c835e708de"

POLL = "GET /v1/executions/{id}"


# --- webhook signatures -------------------------------------------------------------------------


def test_the_server_signs_the_known_vector() -> None:
    assert spec.sign(SECRET, TIMESTAMP, BODY) == SIGNATURE
    assert spec.sign(SECRET, int(TIMESTAMP), BODY) == SIGNATURE


def test_the_client_verifies_the_known_vector() -> None:
    assert mode.verify(SECRET, SIGNATURE, TIMESTAMP, BODY, now=float(TIMESTAMP)) == int(TIMESTAMP)
    assert mode.sign(SECRET, TIMESTAMP, BODY) == SIGNATURE


@pytest.mark.parametrize(
    "signature, timestamp, body",
    [
        (SIGNATURE, TIMESTAMP, BODY + b" "),  # another body
        (SIGNATURE, str(int(TIMESTAMP) + 1), BODY),  # another timestamp
        (SIGNATURE[:-1] + "0", TIMESTAMP, BODY),  # another signature
    ],
    ids=["body", "timestamp", "signature"],
)
def test_the_client_refuses_a_changed_vector(signature: str, timestamp: str, body: bytes) -> None:
    with pytest.raises(mode.SignatureRejected):
        mode.verify(SECRET, signature, timestamp, body, now=float(TIMESTAMP))


def test_the_header_names_agree_with_the_docs() -> None:
    assert (spec.SIGNATURE_HEADER, spec.SIGNATURE_TIMESTAMP_HEADER) == (
        "X-Signature",
        "X-Signature-Timestamp",
    )
    assert (mode.SIGNATURE_HEADER, mode.TIMESTAMP_HEADER) == ("X-Signature", "X-Signature-Timestamp")
    assert spec.WEBHOOK_USER_AGENT == "ModelRoute-Webhooks/1.0"


# --- the idempotency key ------------------------------------------------------------------------


def test_the_idempotency_key_of_a_fixed_request() -> None:
    operator = ModelRouteExecuteOperator(
        task_id="generate",
        model="flux-1.1-pro",
        input={"prompt": "a red fox", "width": 512},
        metadata={"team": "data"},
    )
    ti = SimpleNamespace(
        dag_id="known_answers", run_id="manual__2026-01-01T00:00:00+00:00", task_id="generate", map_index=-1
    )
    request = {
        "model": operator.model,
        "input": operator.input,
        "metadata": operator.metadata,
        "webhook": None,
    }
    assert api.idempotency_key_base(ti, request) == "airflow-f1236b14f7b3fb8d0348cc0e7e4f57a616df57ca"
    ti.map_index = 0
    assert api.idempotency_key_base(ti, request) != "airflow-f1236b14f7b3fb8d0348cc0e7e4f57a616df57ca"


# --- the error table ----------------------------------------------------------------------------


def test_the_client_table_is_the_documented_table() -> None:
    client = {code: (row.http_status, row.retryable) for code, row in api.ERROR_CODES.items()}
    assert client == DOCUMENTED_ERRORS


def test_the_server_table_is_the_documented_table() -> None:
    server = {code: (row.status, row.retryable) for code, row in spec.DOCUMENTED_ERRORS.items()}
    assert server == DOCUMENTED_ERRORS


@pytest.mark.parametrize("code", list(DOCUMENTED_ERRORS))
def test_the_server_answers_each_code_as_documented(server: ModelRouteServer, code: str) -> None:
    status, retryable = DOCUMENTED_ERRORS[code]
    server.add_fault(POLL, "error", count=1, code=code)
    answer = requests.get(
        f"{server.base_url}/v1/executions/exec_1",
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=30,
    )
    error = answer.json()["error"]
    assert (error["code"], error["retryable"]) == (code, retryable)
    if status is not None:
        assert answer.status_code == status


@pytest.mark.parametrize("code", list(DOCUMENTED_ERRORS))
def test_the_client_retries_exactly_the_retryable_codes(server: ModelRouteServer, code: str) -> None:
    hook = ModelRouteHook()
    created = hook.create_execution("test-image", {"prompt": "p", "_simulate": {"seconds": 30}})
    server.add_fault(POLL, "error", count=1, code=code)
    if DOCUMENTED_ERRORS[code][1]:
        assert hook.get_execution(created["id"])["id"] == created["id"]
        assert server.stats()["requests"][POLL] == 2  # retried once, then answered
    else:
        with pytest.raises(ModelRouteError) as err:
            hook.get_execution(created["id"])
        assert err.value.code == code
        assert server.stats()["requests"][POLL] == 1  # not retried


@pytest.mark.parametrize("code", ["GENERATION_TIMEOUT", "MODEL_UNAVAILABLE", "INSUFFICIENT_BALANCE"])
def test_the_async_client_retries_exactly_the_retryable_codes(server: ModelRouteServer, code: str) -> None:
    hook = ModelRouteHook()
    created = hook.create_execution("test-image", {"prompt": "p", "_simulate": {"seconds": 30}})
    server.add_fault(POLL, "error", count=1, code=code)

    async def poll() -> dict:
        async with ModelRouteAsyncHook(hook.modelroute_conn_id) as client:
            return await client.get_execution(created["id"])

    if DOCUMENTED_ERRORS[code][1]:
        assert asyncio.run(poll())["id"] == created["id"]
        assert server.stats()["requests"][POLL] == 2
    else:
        with pytest.raises(ModelRouteError) as err:
            asyncio.run(poll())
        assert err.value.code == code
        assert server.stats()["requests"][POLL] == 1
