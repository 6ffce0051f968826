"""What Airflow's ProvidersManager reads about this provider; imports nothing from Airflow.

The connection form is declared once: Airflow 3.2+ reads it here, Airflow 2.11 from the hook's classmethods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow_provider_modelroute import __version__

CONN_TYPE = "modelroute"
_PKG = "airflow_provider_modelroute"
_DOCS = "https://docs.modelroute.ai"

_UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    # Port stays: Airflow's Test button refuses a connection saved without one ("Bad Request").
    "hidden-fields": ["schema", "login"],
    "relabeling": {"password": "API key", "host": "Base URL"},
    "placeholders": {
        "host": "https://api.modelroute.ai (default)",
        "password": "sk_<64 hex>_<8 hex>",
        "port": "443, or the Base URL's port (the Test button needs it)",
    },
}


def _field(label: str, kind: str, default: Any, description: str = "", **schema: Any) -> dict[str, Any]:
    """One extra field of the form (docs/connections.md says more about each)."""
    schema = {"type": [kind, "null"], **({} if default is None else {"default": default}), **schema}
    return {"label": label, "schema": schema, **({"description": description} if description else {})}


_CONN_FIELDS = {
    "timeout": _field("Read timeout (seconds)", "number", 30, "How long one HTTP response may take."),
    "connect_timeout": _field("Connect timeout (seconds)", "number", 10),
    "max_retries": _field("Max retries", "integer", 5, "Retries of a request: connection errors, 429, 5xx."),
    "retry_base_wait": _field("Retry base wait (seconds)", "number", 0.5, "Backoff of the first retry."),
    "retry_max_wait": _field("Retry max wait (seconds)", "number", 30, "Longest backoff (or Retry-After)."),
    "retry_deadline": _field(
        "Retry deadline (seconds)", "number", 120, "Total time one request may spend retrying."
    ),
    "dashboard_url": _field(
        "Dashboard URL", "string", "https://app.modelroute.ai", "Where the execution link points."
    ),
    "ca_bundle": _field("CA bundle (path)", "string", None, "PEM CAs to trust (default: SSL_CERT_FILE...)."),
    "client_cert": _field("Client certificate (path)", "string", None, "PEM certificate for the API host."),
    "client_key": _field("Client certificate key (path)", "string", None, "PEM key, if not in client_cert."),
    "allow_insecure_storage_urls": _field(
        "Allow http/loopback storage URLs (local testing only)",
        "boolean",
        False,
        "For the local test server's http:// URLs.",
    ),
    # webhook mode: `python -m airflow_provider_modelroute.webhooks setup` fills these
    "webhook_secret": _field("Webhook secret", "string", None, "The whsec_... secret.", format="password"),
    "webhook_receiver_url": _field("Webhook receiver URL", "string", None, "Where ModelRoute posts events."),
    "webhook_poll_interval": _field("Webhook safety-net poll interval (seconds)", "number", 600),
}


def extra_value(extras: Mapping[str, Any], name: str) -> Any:
    """An extra by its plain name or the ``extra__modelroute__`` form older UIs store; None if unset."""
    for key in (name, f"extra__{CONN_TYPE}__{name}"):
        if extras.get(key) not in (None, ""):
            return extras[key]
    return None


def ui_field_behaviour() -> dict[str, Any]:
    """The connection form's field behaviour in the hook classmethod's (Airflow 2) shape."""
    return {key.replace("-", "_"): value.copy() for key, value in _UI_FIELD_BEHAVIOUR.items()}


def connection_form_widgets() -> dict[str, Any]:
    """The extra fields as Airflow 2 form widgets (wtforms and FAB exist only in Airflow 2's web server)."""
    from flask_appbuilder.fieldwidgets import BS3PasswordFieldWidget, BS3TextFieldWidget
    from flask_babel import lazy_gettext
    from wtforms import BooleanField, PasswordField, StringField

    widgets: dict[str, Any] = {}
    for name, spec in _CONN_FIELDS.items():
        label, schema = lazy_gettext(spec["label"]), spec["schema"]
        if "boolean" in schema["type"]:
            widgets[name] = BooleanField(label, default=schema["default"])
        elif schema.get("format") == "password":
            widgets[name] = PasswordField(label, widget=BS3PasswordFieldWidget())
        else:
            widgets[name] = StringField(label, widget=BS3TextFieldWidget())
    return widgets


def get_provider_info() -> dict[str, Any]:
    modules = {
        kind: [{"integration-name": "ModelRoute", "python-modules": [f"{_PKG}.{kind}.modelroute"]}]
        for kind in ("hooks", "operators", "sensors", "triggers")
    }
    transfers = f"{_PKG}.transfers.modelroute"
    return {
        "package-name": "airflow-provider-modelroute",
        "name": "ModelRoute",
        "description": f"`ModelRoute <{_DOCS}>`__: run AI executions, store their files.",
        "versions": [__version__],
        "integrations": [{"integration-name": "ModelRoute", "external-doc-url": _DOCS, "tags": ["software"]}],
        **modules,
        "transfers": [
            {"source-integration-name": a, "target-integration-name": b, "python-module": transfers}
            for a, b in (("ModelRoute", "Common IO"), ("Common IO", "ModelRoute"))
        ],
        "task-decorators": [
            {"name": "modelroute", "class-name": f"{_PKG}.decorators.modelroute.modelroute_task"}
        ],
        "extra-links": [f"{_PKG}.operators.modelroute.ModelRouteExecutionLink"],
        "connection-types": [
            {
                "hook-class-name": f"{_PKG}.hooks.modelroute.ModelRouteHook",
                "hook-name": "ModelRoute",
                "connection-type": CONN_TYPE,
                "ui-field-behaviour": _UI_FIELD_BEHAVIOUR,
                "conn-fields": _CONN_FIELDS,
            }
        ],
    }
