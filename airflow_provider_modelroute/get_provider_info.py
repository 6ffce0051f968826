"""What Airflow's ProvidersManager reads about this provider (entry point ``apache_airflow_provider``).

Imports nothing from Airflow: ProvidersManager loads it in every Airflow process. The connection
form is declared once here; Airflow 3.2+ reads ``conn-fields``/``ui-field-behaviour`` from provider
info, and Airflow 2.11 gets the same definitions through the hook's classmethods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow_provider_modelroute import __version__

CONN_TYPE = "modelroute"
_PKG = "airflow_provider_modelroute"

_UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    # Port stays on the form: Airflow's Test button refuses a connection saved without one ("Bad
    # Request": it sends port 0 and compares it with the stored empty port).
    "hidden-fields": ["schema", "login"],
    "relabeling": {"password": "API key", "host": "Base URL"},
    "placeholders": {
        "host": "https://api.modelroute.ai (default)",
        "password": "sk_<64 hex>_<8 hex>",
        "port": "443, or the Base URL's port (the Test button needs it)",
    },
}

_CONN_FIELDS: dict[str, dict[str, Any]] = {
    "timeout": {
        "label": "Read timeout (seconds)",
        "description": "How long one HTTP response may take.",
        "schema": {"type": ["number", "null"], "default": 30},
    },
    "connect_timeout": {
        "label": "Connect timeout (seconds)",
        "schema": {"type": ["number", "null"], "default": 10},
    },
    "max_retries": {
        "label": "Max retries",
        "description": "Retries of one request on connection errors, 429 and retryable 5xx.",
        "schema": {"type": ["integer", "null"], "default": 5},
    },
    "retry_base_wait": {
        "label": "Retry base wait (seconds)",
        "description": "The first retry waits up to this long (at random), each next one up to twice that.",
        "schema": {"type": ["number", "null"], "default": 0.5},
    },
    "retry_max_wait": {
        "label": "Retry max wait (seconds)",
        "description": "The longest wait between two retries, unless the server's Retry-After asks more.",
        "schema": {"type": ["number", "null"], "default": 30},
    },
    "retry_deadline": {
        "label": "Retry deadline (seconds)",
        "description": "Total time one request may spend retrying.",
        "schema": {"type": ["number", "null"], "default": 120},
    },
    "dashboard_url": {
        "label": "Dashboard URL",
        "description": "Where the 'ModelRoute execution' link points.",
        "schema": {"type": ["string", "null"], "default": "https://app.modelroute.ai"},
    },
    "ca_bundle": {
        "label": "CA bundle (path)",
        "description": "PEM file (or directory) of the CAs to trust for the API and storage hosts, e.g. a "
        "corporate CA. Default: REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE or SSL_CERT_FILE, else certifi.",
        "schema": {"type": ["string", "null"]},
    },
    "client_cert": {
        "label": "Client certificate (path)",
        "description": "PEM certificate (with its key, or see client_key) shown to the API host only.",
        "schema": {"type": ["string", "null"]},
    },
    "client_key": {
        "label": "Client certificate key (path)",
        "description": "PEM private key of client_cert, if that file does not hold it.",
        "schema": {"type": ["string", "null"]},
    },
    "allow_insecure_storage_urls": {
        "label": "Allow http/loopback storage URLs (local testing only)",
        "description": "Lets the local ModelRoute test server's http://127.0.0.1 file URLs through "
        "(TLS, when used, is still verified).",
        "schema": {"type": ["boolean", "null"], "default": False},
    },
    # -- webhook mode: `python -m airflow_provider_modelroute.webhooks setup` fills these --
    "webhook_secret": {
        "label": "Webhook secret",
        "description": "The endpoint's whsec_... secret; with the receiver URL it turns webhook mode on.",
        "schema": {"type": ["string", "null"], "format": "password"},
    },
    "webhook_receiver_url": {
        "label": "Webhook receiver URL",
        "description": "Where ModelRoute reaches the receiver: https://<airflow>/modelroute/webhooks/<conn>.",
        "schema": {"type": ["string", "null"]},
    },
    "webhook_poll_interval": {
        "label": "Webhook safety-net poll interval (seconds)",
        "description": "In webhook mode, each wait still looks at its execution this often (jittered).",
        "schema": {"type": ["number", "null"], "default": 600},
    },
}


def extra_value(extras: Mapping[str, Any], name: str) -> Any:
    """An extra by its plain name or the ``extra__modelroute__`` form older UIs store; None if unset."""
    for key in (name, f"extra__{CONN_TYPE}__{name}"):
        if extras.get(key) not in (None, ""):
            return extras[key]
    return None


def ui_field_behaviour() -> dict[str, Any]:
    """The connection form's field behaviour in the hook classmethod's (Airflow 2) shape."""
    return {
        "hidden_fields": list(_UI_FIELD_BEHAVIOUR["hidden-fields"]),
        "relabeling": dict(_UI_FIELD_BEHAVIOUR["relabeling"]),
        "placeholders": dict(_UI_FIELD_BEHAVIOUR["placeholders"]),
    }


def connection_form_widgets() -> dict[str, Any]:
    """The extra fields as Airflow 2 form widgets (wtforms and FAB exist only in Airflow 2's web server)."""
    from flask_appbuilder.fieldwidgets import BS3PasswordFieldWidget, BS3TextFieldWidget
    from flask_babel import lazy_gettext
    from wtforms import BooleanField, PasswordField, StringField

    widgets: dict[str, Any] = {}
    for name, spec in _CONN_FIELDS.items():
        label = lazy_gettext(spec["label"])
        if "boolean" in spec["schema"]["type"]:
            widgets[name] = BooleanField(label, default=spec["schema"]["default"])
        elif spec["schema"].get("format") == "password":
            widgets[name] = PasswordField(label, widget=BS3PasswordFieldWidget())
        else:
            widgets[name] = StringField(label, widget=BS3TextFieldWidget())
    return widgets


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-modelroute",
        "name": "ModelRoute",
        "description": "`ModelRoute <https://docs.modelroute.ai>`__: run AI executions, store their files.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "ModelRoute",
                "external-doc-url": "https://docs.modelroute.ai",
                "tags": ["software"],
            }
        ],
        "hooks": [{"integration-name": "ModelRoute", "python-modules": [f"{_PKG}.hooks.modelroute"]}],
        "operators": [
            {
                "integration-name": "ModelRoute",
                "python-modules": [f"{_PKG}.operators.modelroute"],
            }
        ],
        "sensors": [{"integration-name": "ModelRoute", "python-modules": [f"{_PKG}.sensors.modelroute"]}],
        "triggers": [{"integration-name": "ModelRoute", "python-modules": [f"{_PKG}.triggers.modelroute"]}],
        "transfers": [
            {
                "source-integration-name": "ModelRoute",
                "target-integration-name": "Common IO",
                "python-module": f"{_PKG}.transfers.modelroute",
            },
            {
                "source-integration-name": "Common IO",
                "target-integration-name": "ModelRoute",
                "python-module": f"{_PKG}.transfers.modelroute",
            },
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
