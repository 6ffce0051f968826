"""The webhook receiver: a FastAPI app that Airflow 3.1+'s api-server mounts at ``/modelroute``.

Airflow authenticates no plugin app, so the route is public and the signature is the only gate:
the body is capped, then ``X-Signature`` is checked over the raw bytes (constant time, 5-minute
window), then a per-execution route's token. A verified terminal event resumes its deferred task
directly, as Airflow 3.3's human-in-the-loop endpoint does: the task instance row is locked and, only
if it is still DEFERRED, the trigger's "done" event is submitted. A task that has not deferred yet
gets the event as an XCom in the same transaction; its trigger reads it before waiting. Repeats and
several api-server replicas resolve in the database. Deliveries that concern no waiting task get a
quick 2xx (ModelRoute deactivates an endpoint after 10 failed deliveries in a row). The secret and
signature are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from airflow_provider_modelroute._compat import (
    TriggerEvent,
    event_submitter,
    server_connection,
    server_db,
    store_xcom,
)
from airflow_provider_modelroute.provider_info import CONN_TYPE
from airflow_provider_modelroute.webhooks.config import SECRET_EXTRA, extra_value
from airflow_provider_modelroute.webhooks.events import (
    MAX_BODY_BYTES,
    MalformedEvent,
    SeenEvents,
    WebhookEvent,
    parse_event,
)
from airflow_provider_modelroute.webhooks.routing import (
    EVENT_XCOM_KEY,
    URL_PREFIX,
    WEBHOOK_PATH,
    MalformedRoute,
    TaskRoute,
    token_matches,
    waiting_xcom_key,
)
from airflow_provider_modelroute.webhooks.signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureRejected,
    verify,
)

log = logging.getLogger(__name__)

#: How long a connection's webhook secret is cached (a rotated secret is picked up after this).
SECRET_CACHE_SECONDS = 30.0
_SECRET_CACHE_SIZE = 256
#: Only triggers of this provider are resumed.
_TRIGGER_MODULE = "airflow_provider_modelroute."
_DB_ATTEMPTS = 4
RESUMED = "resumed"
RECORDED = "recorded for the task's trigger"
#: A task deferred less than this long ago is resumed only once this much time has passed since its
#: deferral. Airflow 3.3.2's scheduler can fail a task resumed before it has processed the executor's
#: report on the deferring process (apache/airflow#72716, "task-state-changed-externally").
RESUME_GRACE = 5.0

app = FastAPI(title="ModelRoute webhook receiver", docs_url=None, redoc_url=None, openapi_url=None)
seen_events = SeenEvents()
_secrets: dict[str, tuple[str | None, float]] = {}
_secrets_lock = threading.Lock()


def mounted_app() -> FastAPI:
    """The receiver mounted at ``/modelroute`` as the api-server mounts it, to serve it on its own
    (``uvicorn --factory airflow_provider_modelroute.webhooks.receiver:mounted_app``; benchmarks)."""
    root = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    root.mount(URL_PREFIX, app)
    return root


def _answer(status: int, outcome: str) -> JSONResponse:
    return JSONResponse({"outcome": outcome}, status_code=status)


def webhook_secret(conn_id: str) -> str | None:
    """The connection's webhook secret (cached briefly), or None if it names none."""
    now = time.monotonic()
    with _secrets_lock:
        cached = _secrets.get(conn_id)
    if cached is not None and cached[1] > now:
        return cached[0]
    try:
        conn = server_connection(conn_id)
    except Exception:  # AirflowNotFoundException, or a secrets backend that is down
        secret = None
    else:
        found = extra_value(conn.extra_dejson, SECRET_EXTRA) if conn.conn_type == CONN_TYPE else None
        secret = str(found) if found else None
    with _secrets_lock:
        if len(_secrets) >= _SECRET_CACHE_SIZE:  # made-up connection ids must not grow it without end
            _secrets.clear()
        _secrets[conn_id] = (secret, now + SECRET_CACHE_SECONDS)
    return secret


async def _read_capped(request: Request) -> bytes | None:
    """The raw body, or None once it is larger than ``MAX_BODY_BYTES`` (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@app.post(WEBHOOK_PATH)
async def receive(conn_id: str, request: Request) -> JSONResponse:
    body = await _read_capped(request)
    if body is None:
        return _answer(413, f"refused: the body is larger than {MAX_BODY_BYTES} bytes")
    secret = await run_in_threadpool(webhook_secret, conn_id)
    if secret is None:
        log.warning("ModelRoute webhook for connection %r refused: it has no %s", conn_id, SECRET_EXTRA)
        return _answer(404, f"refused: no ModelRoute connection {conn_id!r} with a webhook secret")
    try:
        verify(secret, request.headers.get(SIGNATURE_HEADER), request.headers.get(TIMESTAMP_HEADER), body)
    except SignatureRejected as exc:
        log.warning("ModelRoute webhook for connection %r refused: %s", conn_id, exc)
        return _answer(401, f"refused: {exc}")
    route_text = request.query_params.get("route")
    route = None
    if route_text is not None:
        try:
            route = TaskRoute.decode(route_text)
        except MalformedRoute:
            route = None
        if route is None or not token_matches(secret, route_text, request.query_params.get("token")):
            log.warning("ModelRoute webhook for connection %r refused: a route without its token", conn_id)
            return _answer(403, "refused: the route's token does not match")
    try:
        event = parse_event(body)
    except MalformedEvent as exc:  # signed by ModelRoute, but in no shape we know: do not make it retry
        log.warning("Ignored a signed ModelRoute webhook we cannot read: %s", exc)
        return _answer(200, "ignored: not an execution event")
    if event.event_id in seen_events:
        return _answer(200, "duplicate")
    if not event.is_terminal:
        return _answer(200, f"ignored: {event.event_type} is not a final state")
    try:
        outcome = await run_in_threadpool(apply_event, event, route)
        if not isinstance(outcome, str):  # deferred just now: resume a little later (see RESUME_GRACE)
            await asyncio.sleep(min(outcome, RESUME_GRACE))
            outcome = str(await run_in_threadpool(apply_event, event, route, 0.0))
    except Exception:
        log.exception(
            "Could not apply ModelRoute webhook %s; ModelRoute will deliver it again", event.event_id
        )
        return _answer(503, "the database is busy; deliver again later")
    if outcome in (RESUMED, RECORDED):  # not "ignored": the same event may come by a routable URL
        seen_events.add(event.event_id)
    log.info(
        "ModelRoute webhook %s (%s, execution %s): %s",
        event.event_id,
        event.event_type,
        event.execution_id,
        outcome,
    )
    return _answer(200, outcome)


def apply_event(event: WebhookEvent, route: TaskRoute | None, grace: float = RESUME_GRACE) -> str | float:
    """Resume the waiting task, or record the event for its trigger, in one transaction (retried).

    Returns what was done, or the seconds to wait before resuming a task that deferred less than
    ``grace`` seconds ago.
    """
    from sqlalchemy.exc import OperationalError

    db = server_db()
    for attempt in range(_DB_ATTEMPTS):
        try:
            with db.create_session() as session:
                return _apply(session, db, event, route, grace)
        except OperationalError:  # e.g. SQLite's "database is locked"
            if attempt == _DB_ATTEMPTS - 1:
                raise
            time.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")


def _apply(session: Any, db: Any, event: WebhookEvent, route: TaskRoute | None, grace: float) -> str | float:
    from sqlalchemy import select

    route = route or _find_waiting(session, db, event.execution_id)
    if route is None:
        return "ignored: no task waits for this execution"
    ti_model = db.TaskInstance
    ti = session.scalars(
        select(ti_model)
        .where(
            ti_model.dag_id == route.dag_id,
            ti_model.run_id == route.run_id,
            ti_model.task_id == route.task_id,
            ti_model.map_index == route.map_index,
        )
        .with_for_update(of=ti_model)
    ).one_or_none()
    if ti is None:
        return "ignored: no such task instance"
    states = db.TaskInstanceState
    if ti.state == states.DEFERRED:
        trigger = _our_trigger(session, db, ti, event.execution_id)
        if trigger is None:
            return "ignored: the task waits for something else"
        deferred_for = (_utcnow() - trigger.created_date).total_seconds()
        if grace > 0 and deferred_for < grace:
            return grace - deferred_for
        payload = {**event.done_event(), "try_number": ti.try_number}
        _record(session, db, ti, payload)
        submit = event_submitter()
        if submit is None:
            raise RuntimeError("this Airflow cannot resume deferred tasks from outside the triggerer")
        submit(TriggerEvent(payload), task_instance=ti, session=session)
        return RESUMED
    if ti.state == states.RUNNING and not ti.next_method:
        _record(session, db, ti, event.done_event())  # the early-event race: its trigger reads this
        return RECORDED
    return "ignored: the task is not waiting"


def _our_trigger(session: Any, db: Any, ti: Any, execution_id: str) -> Any | None:
    """The trigger the task instance is deferred on, if it is this provider's, for this execution."""
    trigger = session.get(db.Trigger, ti.trigger_id) if ti.trigger_id is not None else None
    if trigger is None or not str(trigger.classpath).startswith(_TRIGGER_MODULE):
        return None
    return trigger if trigger.kwargs.get("execution_id") == execution_id else None


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _find_waiting(session: Any, db: Any, execution_id: str) -> TaskRoute | None:
    """The task that waits for an execution, by the marker XCom it pushed (one indexed lookup)."""
    from sqlalchemy import select

    xcom = db.XComModel
    row = session.execute(
        select(xcom.dag_id, xcom.run_id, xcom.task_id, xcom.map_index)
        .where(xcom.key == waiting_xcom_key(execution_id))
        .limit(1)
    ).first()
    return TaskRoute(row.dag_id, row.run_id, row.task_id, row.map_index) if row is not None else None


def _record(session: Any, db: Any, ti: Any, payload: dict[str, Any]) -> None:
    ids = {"dag_id": ti.dag_id, "task_id": ti.task_id, "run_id": ti.run_id, "map_index": ti.map_index}
    store_xcom(session, payload, key=EVENT_XCOM_KEY, **ids)
