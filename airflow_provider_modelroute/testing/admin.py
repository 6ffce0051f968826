"""The local server's ``/_admin/...`` routes: its in-process control surface, over HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute.testing.wire import Reply, json_reply

if TYPE_CHECKING:
    from airflow_provider_modelroute.testing.server import ModelRouteServer


def admin_reply(server: ModelRouteServer, method: str, action: str, body: Any) -> Reply:
    """Run one admin ``action`` (``faults``, ``reset``, ``stats``, ``dialect``, ``executions``...)."""
    body = body if isinstance(body, dict) else {}
    try:
        if action == "faults" and method == "POST":
            server.add_fault(body["endpoint"], body["kind"], body.get("count", 1), **body.get("params", {}))
            return json_reply(200, {})
        if action == "faults" and method == "DELETE":
            server.clear_faults()
            return json_reply(200, {})
        if action == "reset" and method == "POST":
            server.reset()
            return json_reply(200, {})
        if action == "stats":
            return json_reply(200, server.stats())
        if action == "dialect" and method == "POST":
            server.dialect = body["dialect"]
            return json_reply(200, {"name": server.dialect.name, **server.dialect.readings()})
        if action == "executions":
            return json_reply(200, server.execution_ids())
        kind, _, ident = action.partition("/")
        if kind == "executions" and method == "POST":
            return json_reply(200, server.set_execution_status(ident, body["status"], body.get("error_code")))
        if kind == "executions":
            return json_reply(200, server.execution(ident))
        if kind == "files":
            return json_reply(200, server.file_info(ident))
        if kind == "webhooks":
            return json_reply(200, server.webhooks.admin(method, ident, body))
    except (KeyError, ValueError, TypeError) as exc:
        return json_reply(400, {"error": {"code": "ADMIN_ERROR", "message": repr(exc)}})
    return json_reply(404, {"error": {"code": "NOT_FOUND", "message": action}})
