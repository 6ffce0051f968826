"""The webhook receiver: an api-server plugin app (Airflow 3.1+) at ``/modelroute`` that resumes waits.

Airflow authenticates no plugin app, so the signature is the only gate (the body capped, then
``X-Signature`` over the raw bytes, then a route's token). Secrets and signatures are never logged.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import OrderedDict
from dataclasses import asdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowPlugin

from airflow_provider_modelroute import api
from airflow_provider_modelroute.get_provider_info import CONN_TYPE, extra_value
from airflow_provider_modelroute.utils import assets
from airflow_provider_modelroute.version_compat import AIRFLOW_V_3_1_PLUS, TriggerEvent
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
#: A task is resumed no sooner than this after it deferred: Airflow 3.3.2's scheduler can fail a task
#: resumed before it processed the deferring process's exit (apache/airflow#72716).
RESUME_GRACE = 5.0
RESUMED, RECORDED = "resumed", "recorded for the task's trigger"
NO_WAITING_TASK = "ignored: no task waits for this execution"


def parse_event(body: bytes) -> dict[str, Any]:
    """The trigger's "done" event for a delivery in either documented shape: ``{"id", "event_type",
    "execution_id", "data", ...}`` or ``{"id", "type", "data", ...}``, ``data`` the execution."""
    document = json.loads(body)  # ValueError: not JSON
    if not isinstance(document, dict) or not isinstance(document.get("data"), dict):
        raise ValueError("the body is not an event whose 'data' is an execution")
    event_id, event_type = document.get("id"), document.get("event_type", document.get("type"))
    if not (isinstance(event_id, str) and event_id and isinstance(event_type, str) and event_type):
        raise ValueError("the event has no 'id', or no 'event_type' (or 'type')")
    execution = document["data"]
    execution_id = str(document.get("execution_id") or execution.get("id"))
    if not execution_id.startswith("exec_") or execution.get("id") not in (None, execution_id):
        raise ValueError("the event names no execution, or two ('execution_id' and 'data.id')")
    # A final event implies its status where the execution document leaves it out.
    execution = {"status": event_type.removeprefix("execution.").upper(), **execution, "id": execution_id}
    summary = api.execution_summary(execution)
    return dict(status="done", execution_id=execution_id, execution=summary, webhook_event_id=event_id)


#: Event ids resumed or recorded lately, oldest first: the cheap first line of deduplication (only the
#: event loop touches it); the database is the real one (a repeat finds the task no longer deferred).
seen_events: OrderedDict[str, None] = OrderedDict()
#: Webhook secrets by connection id, with when they were read ("": the connection names none).
secret_cache: dict[str, tuple[float, str]] = {}


def webhook_secret(conn_id: str) -> str | None:
    """The connection's webhook secret (read again after ``SECRET_CACHE_SECONDS``), or None."""
    read_at, secret = secret_cache.get(conn_id, (float("-inf"), ""))
    if time.monotonic() - read_at >= SECRET_CACHE_SECONDS:
        try:  # the Task SDK's reading (in the api-server, the metadata DB too), else the server's own
            from airflow.models.connection import Connection as ConnectionModel
            from airflow.providers.common.compat.sdk import Connection

            try:
                conn = Connection.get(conn_id)
            except Exception:
                conn = ConnectionModel.get_connection_from_secrets(conn_id)
            found = extra_value(conn.extra_dejson, mode.SECRET_EXTRA) if conn.conn_type == CONN_TYPE else None
        except Exception:  # not found, or a secrets backend that is down
            found = None
        if len(secret_cache) > 256:  # made-up connection ids cannot grow it
            secret_cache.clear()
        secret = str(found or "")
        secret_cache[conn_id] = (time.monotonic(), secret)
    return secret or None


@functools.cache
def create_app() -> Starlette:
    """The receiver's ASGI app: ``POST /webhooks/{conn_id}``, mounted at ``/modelroute``."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    return Starlette(routes=[Route(mode.WEBHOOK_PATH, receive, methods=["POST"])])


async def _lazy_app(scope: Any, receive_: Any, send: Any) -> None:
    """The receiver, built on its first request: plugins load in every Airflow process."""
    await create_app()(scope, receive_, send)


def _answer(status: int, outcome: str, conn_id: str | None = None) -> JSONResponse:
    """The receiver's answer; a refusal (``conn_id`` given) is logged with its reason."""
    from starlette.responses import JSONResponse

    if conn_id is not None:
        log.warning("ModelRoute webhook for connection %r refused: %s", conn_id, outcome)
        outcome = f"refused: {outcome}"
    return JSONResponse({"outcome": outcome}, status_code=status)


async def receive(request: Request) -> JSONResponse:
    """Verify one delivery, then resume (or record the event for) the task that waits for it."""
    from starlette.concurrency import run_in_threadpool

    conn_id, query = str(request.path_params["conn_id"]), request.query_params
    body = b""
    async for chunk in request.stream():  # read no further than the cap
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return _answer(413, f"the body is larger than {MAX_BODY_BYTES} bytes", conn_id)
    secret = await run_in_threadpool(webhook_secret, conn_id)
    if secret is None:
        return _answer(404, f"no ModelRoute connection {conn_id!r} with a {mode.SECRET_EXTRA}", conn_id)
    try:
        headers = request.headers
        mode.verify(secret, headers.get(mode.SIGNATURE_HEADER), headers.get(mode.TIMESTAMP_HEADER), body)
    except mode.SignatureRejected as exc:
        return _answer(401, str(exc), conn_id)
    if "route" in query and not mode.token_matches(secret, query["route"], query.get("token")):
        return _answer(403, "the route's token does not match", conn_id)
    try:
        event = parse_event(body)
    except ValueError as exc:  # signed by ModelRoute, but in no shape we know: do not make it retry
        log.info("ModelRoute webhook for connection %r verified; not an execution event: %s", conn_id, exc)
        return _answer(200, "ignored: not an execution event")
    event_id, status = event["webhook_event_id"], event["execution"]["status"]
    if event_id in seen_events:
        return _answer(200, "duplicate")
    if not api.is_terminal(status):
        return _answer(200, f"ignored: {status} is not a final state")
    route = mode.TaskRoute.decode(query["route"]) if "route" in query else None
    try:
        outcome = await run_in_threadpool(apply_event, event, route)
        if not isinstance(outcome, str):  # deferred just now: resume a little later (see RESUME_GRACE)
            await asyncio.sleep(min(outcome, RESUME_GRACE))
            outcome = str(await run_in_threadpool(apply_event, event, route, 0.0))
        if outcome == NO_WAITING_TASK:  # an execution started outside Airflow, maybe: its model's asset
            execution = event["execution"]
            outcome = (
                await run_in_threadpool(assets.record_outside_execution, conn_id, execution, event_id)
                or outcome
            )
    except Exception:
        log.exception("Could not apply ModelRoute webhook %s; ModelRoute delivers it again", event_id)
        return _answer(503, "the database is busy; deliver again later")
    if outcome != NO_WAITING_TASK:  # an unroutable copy must not shadow the routable one
        seen_events[event_id] = None
        if len(seen_events) > 100_000:  # deliveries expire after 24 h: the oldest ids go first
            seen_events.popitem(last=False)
    log.info("ModelRoute webhook %s (%s, %s): %s", event_id, event["execution_id"], status, outcome)
    return _answer(200, outcome)


def apply_event(
    event: dict[str, Any], route: mode.TaskRoute | None, grace: float = RESUME_GRACE
) -> str | float:
    """Resume the waiting task, or record the event for its trigger, in one transaction (retried as
    Airflow retries its own); or return the seconds to wait if the task deferred under ``grace`` ago."""
    from airflow.utils.retries import run_with_db_retries

    return run_with_db_retries()(_apply, event, route, grace)


def _apply(event: dict[str, Any], route: mode.TaskRoute | None, grace: float) -> str | float:
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger, handle_event_submit
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    with create_session() as session:
        if route is None:  # an organisation-wide delivery: the task's marker XCom names it
            marker = select(XComModel.dag_id, XComModel.run_id, XComModel.task_id, XComModel.map_index)
            row = session.execute(
                marker.where(XComModel.key == mode.waiting_xcom_key(event["execution_id"]))
            ).first()
            route = mode.TaskRoute(*row) if row is not None else None
        ti = trigger = None
        if route is not None:
            locked = select(TaskInstance).filter_by(**asdict(route)).with_for_update(of=TaskInstance)
            ti = session.scalars(locked).one_or_none()
        if ti is not None and ti.trigger_id is not None:
            trigger = session.get(Trigger, ti.trigger_id)
        if (
            ti is not None
            and ti.state == TaskInstanceState.DEFERRED
            and trigger is not None
            and str(trigger.classpath).startswith("airflow_provider_modelroute.")
            and trigger.kwargs.get("execution_id") == event["execution_id"]
        ):
            deferred_for = (datetime.now(timezone.utc) - trigger.created_date).total_seconds()
            if grace > 0 and deferred_for < grace:
                return grace - deferred_for
            payload = {**event, "try_number": ti.try_number}
            _store_event(session, payload, ti)
            handle_event_submit(TriggerEvent(payload), task_instance=ti, session=session)
            log.info(
                "Resumed %s: ModelRoute webhook %s says its execution ended", route, event["webhook_event_id"]
            )
            return RESUMED
        if ti is not None and ti.state == TaskInstanceState.RUNNING and not ti.next_method:
            _store_event(session, event, ti)  # not deferred yet: its trigger reads this
            return RECORDED
        # The delivery is verified, but no task waits for this execution.
        return NO_WAITING_TASK


def _store_event(session: Any, value: Any, ti: Any) -> None:
    """Store the task's event XCom as the execution API stores a worker's: serialized by the XCom backend
    (so that the trigger's ``XCom.get_one`` reads back ``value``), replacing the row there was."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.providers.common.compat.sdk import XCom
    from sqlalchemy import delete, select

    ids = {"key": mode.EVENT_XCOM_KEY, **asdict(mode.TaskRoute.of(ti))}
    stored = XCom.serialize_value(value, **ids)
    dag_run_id = session.scalar(select(DagRun.id).filter_by(dag_id=ti.dag_id, run_id=ti.run_id))
    session.execute(delete(XComModel).filter_by(**ids))
    session.add(XComModel(dag_run_id=dag_run_id, value=stored, **ids))
    session.flush()


class ModelRouteWebhooksPlugin(AirflowPlugin):
    """Serves ``POST /modelroute/webhooks/{conn_id}`` in the api-server (entry point ``airflow.plugins``)."""

    name = "modelroute_webhooks"
    fastapi_apps = (
        [{"app": _lazy_app, "url_prefix": mode.URL_PREFIX, "name": "ModelRoute webhook receiver"}]
        if AIRFLOW_V_3_1_PLUS
        else []
    )
