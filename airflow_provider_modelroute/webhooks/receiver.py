"""The webhook receiver: an Airflow 3.1+ api-server plugin app at ``/modelroute`` that resumes waits.

Airflow authenticates no plugin app, so the signature is the only gate: the body is capped, then
``X-Signature`` is checked over the raw bytes, then a per-execution route's token. A verified final
event resumes its deferred task as Airflow 3.3's human-in-the-loop endpoint does (the task instance
row locked, the trigger's "done" event submitted only if it is still DEFERRED on our trigger); a task
that has not deferred yet gets the event as an XCom that its trigger reads first. Repeats and several
api-server replicas resolve in the database. Deliveries that concern no waiting task get a quick 2xx
(ModelRoute deactivates an endpoint after 10 failures in a row). Secrets and signatures are never
logged. Plugins load in every Airflow process: Starlette and the DB models are imported on use.

READINGS of the body (both must work): ``{"id", "event_type", "timestamp", "version",
"organization_id", "execution_id", "data": {execution}}`` and ``{"id", "type", "timestamp", "data"}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowPlugin

from airflow_provider_modelroute import api
from airflow_provider_modelroute.get_provider_info import CONN_TYPE
from airflow_provider_modelroute.utils import assets
from airflow_provider_modelroute.version_compat import (
    AIRFLOW_V_3_1_PLUS,
    AirflowNotFoundException,
    TriggerEvent,
)
from airflow_provider_modelroute.webhooks import mode

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

#: Deliveries larger than this are refused unread (an execution document is a few KiB).
MAX_BODY_BYTES = 256 * 1024
#: How long a connection's webhook secret is cached (a rotated secret is picked up after this).
SECRET_CACHE_SECONDS = 30.0
#: A task deferred less than this long ago is resumed only once this much time has passed since its
#: deferral: Airflow 3.3.2's scheduler can fail a task resumed before it has processed the executor's
#: report on the deferring process (apache/airflow#72716, "task-state-changed-externally").
RESUME_GRACE = 5.0
RESUMED = "resumed"
RECORDED = "recorded for the task's trigger"
NO_TASK = "ignored: no task waits for this execution"
#: Final events; one implies its status when the execution document leaves it out.
_FINAL_EVENTS = ("execution.completed", "execution.failed", "execution.cancelled")
_TRIGGER_MODULE = "airflow_provider_modelroute."  # only this provider's triggers are resumed
_DB_ATTEMPTS = 4


# -- events --------------------------------------------------------------------------------------------


class MalformedEvent(ValueError):
    """The body is not a webhook event in either documented shape."""


@dataclass(frozen=True)
class WebhookEvent:
    """One delivery: its event id (the deduplication key), type, execution id and execution document."""

    event_id: str
    event_type: str
    execution_id: str
    execution: dict[str, Any]

    @property
    def is_terminal(self) -> bool:
        return api.is_terminal(str(self.execution.get("status")))

    def done_event(self) -> dict[str, Any]:
        """The trigger's "done" event for this execution, so ``execute_complete`` needs no API call."""
        return {
            "status": "done",
            "execution_id": self.execution_id,
            "execution": api.execution_summary(self.execution),
            "webhook_event_id": self.event_id,
        }


def parse_event(body: bytes) -> WebhookEvent:
    """Parse a delivery body (either documented shape) into a :class:`WebhookEvent`."""
    try:
        document = json.loads(body)
    except ValueError:
        raise MalformedEvent("the body is not JSON") from None
    if not isinstance(document, dict):
        raise MalformedEvent("the body is not a JSON object")
    event_id = document.get("id")
    event_type = document.get("event_type", document.get("type"))
    if not isinstance(event_id, str) or not event_id:
        raise MalformedEvent("the event has no 'id'")
    if not isinstance(event_type, str) or not event_type:
        raise MalformedEvent("the event has no 'event_type' (or 'type')")
    data = document.get("data")
    execution = data.get("execution", data) if isinstance(data, dict) else None
    if not isinstance(execution, dict):
        raise MalformedEvent("the event's 'data' is not an execution object")
    execution_id = document.get("execution_id") or execution.get("id") or execution.get("execution_id")
    if not isinstance(execution_id, str) or not execution_id.startswith("exec_"):
        raise MalformedEvent("the event names no execution ('execution_id' or 'data.id')")
    if execution.get("id") not in (None, execution_id):
        raise MalformedEvent("the event's 'execution_id' and 'data.id' disagree")
    execution = {**execution, "id": execution_id}
    if "status" not in execution and event_type in _FINAL_EVENTS:
        execution["status"] = event_type.removeprefix("execution.").upper()
    return WebhookEvent(event_id, event_type, execution_id, execution)


class ExpiringCache:
    """A bounded map whose entries expire ``ttl`` seconds after they were put (thread-safe)."""

    def __init__(self, max_entries: int, ttl: float) -> None:
        self.max_entries, self.ttl = max_entries, ttl
        self._items: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            found = self._items.get(key)
        return default if found is None or time.monotonic() - found[0] >= self.ttl else found[1]

    def put(self, key: str, value: Any = True) -> None:
        now = time.monotonic()
        with self._lock:
            self._items[key] = (now, value)
            self._items.move_to_end(key)
            while self._items and (
                len(self._items) > self.max_entries or now - next(iter(self._items.values()))[0] >= self.ttl
            ):
                self._items.popitem(last=False)


#: Event ids resumed or recorded lately: the cheap first line of deduplication. The database is the
#: real one (a second delivery finds the task no longer deferred). Deliveries expire after 24 h.
seen_events = ExpiringCache(100_000, 24 * 3600.0)
#: Webhook secrets by connection id (None: the connection names none); made-up ids cannot grow it.
secret_cache = ExpiringCache(256, SECRET_CACHE_SECONDS)
_UNKNOWN = object()


# -- the app -------------------------------------------------------------------------------------------


def create_app() -> Starlette:
    """The receiver's ASGI app: ``POST /webhooks/{conn_id}``, mounted at ``/modelroute``."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    return Starlette(routes=[Route(mode.WEBHOOK_PATH, receive, methods=["POST"])])


def _answer(status: int, outcome: str) -> JSONResponse:
    from starlette.responses import JSONResponse

    return JSONResponse({"outcome": outcome}, status_code=status)


def _refuse(status: int, conn_id: str, reason: str) -> JSONResponse:
    log.warning("ModelRoute webhook for connection %r refused: %s", conn_id, reason)
    return _answer(status, f"refused: {reason}")


def webhook_secret(conn_id: str) -> str | None:
    """The connection's webhook secret (cached briefly), or None if it names none."""
    cached = secret_cache.get(conn_id, _UNKNOWN)
    if cached is not _UNKNOWN:
        return cached
    try:
        conn = _server_connection(conn_id)
    except Exception:  # AirflowNotFoundException, or a secrets backend that is down
        secret = None
    else:
        found = (
            mode.extra_value(conn.extra_dejson, mode.SECRET_EXTRA) if conn.conn_type == CONN_TYPE else None
        )
        secret = str(found) if found else None
    secret_cache.put(conn_id, secret)
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


async def receive(request: Request) -> JSONResponse:
    """Verify one delivery, then resume (or record the event for) the task that waits for it."""
    from starlette.concurrency import run_in_threadpool

    conn_id, headers, query = str(request.path_params["conn_id"]), request.headers, request.query_params
    body = await _read_capped(request)
    if body is None:
        return _refuse(413, conn_id, f"the body is larger than {MAX_BODY_BYTES} bytes")
    secret = await run_in_threadpool(webhook_secret, conn_id)
    if secret is None:
        return _refuse(404, conn_id, f"no ModelRoute connection {conn_id!r} with a {mode.SECRET_EXTRA}")
    try:
        mode.verify(secret, headers.get(mode.SIGNATURE_HEADER), headers.get(mode.TIMESTAMP_HEADER), body)
    except mode.SignatureRejected as exc:
        return _refuse(401, conn_id, str(exc))
    route = None
    if "route" in query:
        try:
            route = mode.TaskRoute.decode(query["route"])
        except mode.MalformedRoute:
            route = None
        if route is None or not mode.token_matches(secret, query["route"], query.get("token")):
            return _refuse(403, conn_id, "the route's token does not match")
    try:
        event = parse_event(body)
    except MalformedEvent as exc:  # signed by ModelRoute, but in no shape we know: do not make it retry
        log.info("ModelRoute webhook for connection %r verified; not an execution event: %s", conn_id, exc)
        return _answer(200, "ignored: not an execution event")
    if seen_events.get(event.event_id):
        return _answer(200, "duplicate")
    if not event.is_terminal:
        return _answer(200, f"ignored: {event.event_type} is not a final state")
    try:
        outcome = await run_in_threadpool(apply_event, event, route)
        if not isinstance(outcome, str):  # deferred just now: resume a little later (see RESUME_GRACE)
            await asyncio.sleep(min(outcome, RESUME_GRACE))
            outcome = str(await run_in_threadpool(apply_event, event, route, 0.0))
        if outcome == NO_TASK:  # an execution started outside Airflow, maybe: its model's asset
            recorded = await run_in_threadpool(
                assets.record_outside_execution, conn_id, event.execution, event.event_id
            )
            outcome = recorded or outcome
    except Exception:
        log.exception("Could not apply ModelRoute webhook %s; ModelRoute delivers it again", event.event_id)
        return _answer(503, "the database is busy; deliver again later")
    if outcome in (RESUMED, RECORDED, assets.RECORDED):  # not "ignored": a routable copy may follow
        seen_events.put(event.event_id)
    log.info(
        "ModelRoute webhook %s (%s, %s): %s", event.event_id, event.event_type, event.execution_id, outcome
    )
    return _answer(200, outcome)


# -- the metadata DB (the api-server's own session) -----------------------------------------------------


def apply_event(
    event: WebhookEvent, route: mode.TaskRoute | None, grace: float = RESUME_GRACE
) -> str | float:
    """Resume the waiting task, or record the event for its trigger, in one transaction (retried).

    Returns what was done, or the seconds to wait before resuming a task that deferred less than
    ``grace`` seconds ago.
    """
    from airflow.utils.session import create_session
    from sqlalchemy.exc import OperationalError

    for attempt in range(_DB_ATTEMPTS):
        try:
            with create_session() as session:
                return _apply(session, event, route, grace)
        except OperationalError:  # e.g. SQLite's "database is locked"
            if attempt == _DB_ATTEMPTS - 1:
                raise
            time.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")


def _apply(session: Any, event: WebhookEvent, route: mode.TaskRoute | None, grace: float) -> str | float:
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger, handle_event_submit
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    route = route or _find_waiting(session, event.execution_id)
    if route is None:
        return NO_TASK
    locked = select(TaskInstance).filter_by(**dataclasses.asdict(route)).with_for_update(of=TaskInstance)
    ti = session.scalars(locked).one_or_none()
    if ti is None:
        return "ignored: no such task instance"
    if ti.state == TaskInstanceState.DEFERRED:
        trigger = session.get(Trigger, ti.trigger_id) if ti.trigger_id is not None else None
        if (
            trigger is None
            or not str(trigger.classpath).startswith(_TRIGGER_MODULE)
            or trigger.kwargs.get("execution_id") != event.execution_id
        ):
            return "ignored: the task waits for something else"
        deferred_for = (datetime.now(timezone.utc) - trigger.created_date).total_seconds()
        if grace > 0 and deferred_for < grace:
            return grace - deferred_for
        payload = {**event.done_event(), "try_number": ti.try_number}
        _store_xcom(session, payload, route)
        handle_event_submit(TriggerEvent(payload), task_instance=ti, session=session)
        log.info("Resumed %s: ModelRoute webhook %s says its execution ended", route, event.event_id)
        return RESUMED
    if ti.state == TaskInstanceState.RUNNING and not ti.next_method:
        _store_xcom(session, event.done_event(), route)  # the early-event race: its trigger reads this
        return RECORDED
    return "ignored: the task is not waiting"


def _find_waiting(session: Any, execution_id: str) -> mode.TaskRoute | None:
    """The task that waits for an execution, by the marker XCom it pushed (one indexed lookup)."""
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    row = session.execute(
        select(XComModel.dag_id, XComModel.run_id, XComModel.task_id, XComModel.map_index)
        .where(XComModel.key == mode.waiting_xcom_key(execution_id))
        .limit(1)
    ).first()
    return mode.TaskRoute(row.dag_id, row.run_id, row.task_id, row.map_index) if row is not None else None


def _store_xcom(session: Any, value: Any, route: mode.TaskRoute) -> None:
    """Store the task's event XCom from the api-server as the execution API stores a worker's: in the
    XCom backend's serialized form, so that ``XCom.get_one`` in the trigger reads back ``value``."""
    import inspect

    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.providers.common.compat.sdk import XCom
    from sqlalchemy import delete, select

    ids = dataclasses.asdict(route)
    stored = XCom.serialize_value(value, key=mode.EVENT_XCOM_KEY, **ids)
    if "serialize" in inspect.signature(XComModel.set).parameters:  # Airflow 3.2+
        XComModel.set(key=mode.EVENT_XCOM_KEY, value=stored, serialize=False, session=session, **ids)
        return
    # Airflow 3.1's XComModel.set would serialize again: do what its execution API's set_xcom does
    model: Any = XComModel
    session.execute(delete(model).filter_by(key=mode.EVENT_XCOM_KEY, **ids))
    dag_run_id = session.scalar(select(DagRun.id).filter_by(dag_id=route.dag_id, run_id=route.run_id))
    session.add(model(dag_run_id=dag_run_id, key=mode.EVENT_XCOM_KEY, value=stored, **ids))
    session.flush()


def _server_connection(conn_id: str) -> Any:
    """A connection as Airflow's server processes see it (metadata DB, environment, secrets backends)."""
    import contextlib

    from airflow.providers.common.compat.sdk import Connection

    if hasattr(Connection, "get"):  # the Task SDK's: in the api-server it reads the metadata DB too
        with contextlib.suppress(AirflowNotFoundException):
            return Connection.get(conn_id)
    from airflow.models.connection import Connection as ConnectionModel

    return ConnectionModel.get_connection_from_secrets(conn_id)


# -- the plugin ----------------------------------------------------------------------------------------


class LazyReceiver:
    """An ASGI app that builds the receiver on its first request."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            self._app = create_app()
        await self._app(scope, receive, send)


class ModelRouteWebhooksPlugin(AirflowPlugin):
    """Serves ``POST /modelroute/webhooks/{conn_id}`` in the api-server (entry point ``airflow.plugins``)."""

    name = "modelroute_webhooks"
    fastapi_apps = (
        [{"app": LazyReceiver(), "url_prefix": mode.URL_PREFIX, "name": "ModelRoute webhook receiver"}]
        if AIRFLOW_V_3_1_PLUS
        else []
    )
