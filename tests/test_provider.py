"""Airflow discovers the provider: provider info is schema-valid and the CLI lists it and its hook."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.resources import files

import jsonschema
import pytest

from airflow_provider_modelroute.get_provider_info import get_provider_info
from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook


def test_provider_info_matches_airflows_own_schema() -> None:
    schema = json.loads(files("airflow").joinpath("provider_info.schema.json").read_text())
    info = get_provider_info()
    jsonschema.validate(info, schema)
    assert info["package-name"] == "airflow-provider-modelroute"
    conn = info["connection-types"][0]
    assert conn["connection-type"] == ModelRouteHook.conn_type == "modelroute"
    assert conn["hook-class-name"] == f"{ModelRouteHook.__module__}.{ModelRouteHook.__name__}"
    assert conn["ui-field-behaviour"]["relabeling"]["password"] == "API key"


def test_every_declared_module_and_link_imports() -> None:
    import importlib

    info = get_provider_info()
    modules = [
        m
        for kind in ("hooks", "operators", "sensors", "triggers")
        for e in info[kind]
        for m in e["python-modules"]
    ]
    modules += [e["python-module"] for e in info["transfers"]]
    for module in modules:
        importlib.import_module(module)
    for path in info["extra-links"]:
        module, _, name = path.rpartition(".")
        assert getattr(importlib.import_module(module), name).name


def test_hook_classmethods_match_provider_info() -> None:
    declared = get_provider_info()["connection-types"][0]["ui-field-behaviour"]
    behaviour = ModelRouteHook.get_ui_field_behaviour()
    assert behaviour["hidden_fields"] == declared["hidden-fields"]
    assert behaviour["relabeling"] == declared["relabeling"]


def _airflow_cli(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    result = subprocess.run(
        [sys.executable, "-m", "airflow", *args, "--output", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (("providers", "list"), "airflow-provider-modelroute"),
        (("providers", "hooks"), "airflow_provider_modelroute.hooks.modelroute.ModelRouteHook"),
    ],
)
def test_airflow_cli_lists_provider(command: tuple[str, ...], expected: str) -> None:
    out = _airflow_cli(*command)
    # the JSON array, after any log lines (Airflow 3.0 may log to stdout: "[2026-...] {...} INFO ...")
    start = re.search(r"^\[(?=\{|\])", out, flags=re.M)
    assert start, out[-2000:]
    rows = json.loads(out[start.start() :])
    assert any(expected in json.dumps(row) for row in rows), out[-2000:]
