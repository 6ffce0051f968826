"""The docs and the code stay in step: error codes and messages in Troubleshooting, operator parameters
and connection extras in docs/, links that resolve, and docs that speak about the product."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modelroute import api
from tests.conftest import REPO

PACKAGE = REPO / "airflow_provider_modelroute"
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
#: What users read: none of it may talk about how the project was made.
USER_DOCS = [README, *DOCS, REPO / "BENCHMARKS.md", REPO / "RELIABILITY.md", REPO / "CHANGELOG.md"]

#: The public classes and where docs/operators.md documents them (module candidates, newest first).
PUBLIC_CLASSES: dict[str, tuple[str, ...]] = {
    "ModelRouteExecuteOperator": ("operators.modelroute",),
    "ModelRouteCancelExecutionOperator": ("operators.modelroute", "operators.cancel"),
    "ModelRouteExecutionSensor": ("sensors.modelroute",),
    "ModelRouteExecutionTrigger": ("triggers.modelroute",),
    "ModelRouteToStorageOperator": ("transfers.modelroute",),
    "StorageToModelRouteOperator": ("transfers.modelroute",),
}
#: Codes ModelRoute is seen to send though its docs do not list them (an unknown execution id in one
#: reading); the provider never depends on them, but users meet them in messages.
OBSERVED_CODES = frozenset({"EXECUTION_NOT_FOUND"})
CODE_RE = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*(?:_<status>)?$")


def package_source() -> str:
    """The provider's code, the local test server aside (it plays the API; it is not the provider)."""
    return "\n".join(p.read_text() for p in sorted(PACKAGE.rglob("*.py")) if "testing" not in p.parts)


def section(text: str, heading: str) -> str:
    """The body of the ``heading`` section, up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}\n", text, flags=re.M)
    assert match is not None, f"no section {heading!r}"
    body = text[match.end() :]
    following = re.search(rf"^#{{1,{len(match.group(1))}}} ", body, flags=re.M)
    return body[: following.start()] if following else body


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row in ``text`` (header and ``|---|`` lines left out)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|\s*-", line):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows[1:] if rows else rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# --- Troubleshooting: every code and message the provider raises has a row that says what it says ---


def troubleshooting() -> list[tuple[str, str]]:
    body = section(README.read_text(), "Troubleshooting")
    lines = body.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    last = max(i for i, line in enumerate(lines) if line.startswith("|"))
    assert all(line.startswith("|") for line in lines[first : last + 1]), "a line breaks the table"
    return [(row[0], row[1]) for row in table_rows(body) if len(row) == 2]


def raised_codes() -> set[str]:
    """Every error code the provider raises: the API's documented table, and its own codes."""
    codes = set(api.ERROR_CODES)
    if 'f"HTTP_{' in package_source():  # an error answer without ModelRoute's body
        codes.add("HTTP_<status>")
    return codes


def rows_naming(code: str) -> list[str]:
    return [f"{error} {fix}" for error, fix in troubleshooting() if code in ticked(error)]


def normalized(text: str) -> str:
    return " ".join(text.lower().replace("`", "").split())


@pytest.mark.parametrize("code", sorted(raised_codes() | OBSERVED_CODES))
def test_every_error_code_has_a_row_quoting_its_hint(code: str) -> None:
    rows = rows_naming(code)
    assert rows, f"README Troubleshooting has no row for {code}"
    hint = api.error_hint(code)
    if hint is not None:
        assert any(normalized(hint.rstrip(".")) in normalized(row) for row in rows), (
            f"the {code} row does not say what the error says: {hint!r}"
        )


def test_every_documented_code_is_one_the_provider_can_raise() -> None:
    known = raised_codes() | OBSERVED_CODES | {f"HTTP_{status}" for status in range(400, 600)}
    documented = {code for error, _ in troubleshooting() for code in ticked(error) if CODE_RE.match(code)}
    assert documented, "no error code in Troubleshooting"
    assert documented <= known, f"documented codes the provider never raises: {sorted(documented - known)}"


def test_every_quoted_message_is_one_the_provider_writes() -> None:
    """A row quoting a message ("...") quotes text that is in the code, so a reworded message fails here."""
    source = package_source()
    quoted = [q for error, _ in troubleshooting() for q in re.findall(r'"([^"]+)"', error)]
    assert quoted
    for message in quoted:
        for fragment in filter(None, (part.strip() for part in message.split("..."))):
            assert fragment in source, f"Troubleshooting quotes {message!r}, which no message says"


# --- parameters and extras -------------------------------------------------------------------------


def public_class(name: str) -> Any:
    for module in PUBLIC_CLASSES[name]:
        found = getattr(importlib.import_module(f"airflow_provider_modelroute.{module}"), name, None)
        if found is not None:
            return found
    raise AssertionError(f"{name} is in none of {PUBLIC_CLASSES[name]}")


def documented_names(doc: Path, heading: str) -> set[str]:
    return {name for row in table_rows(section(doc.read_text(), heading)) for name in ticked(row[0])[:1]}


@pytest.mark.parametrize("name", list(PUBLIC_CLASSES))
def test_every_parameter_is_documented_and_nothing_documented_is_gone(name: str) -> None:
    parameters = {
        p.name
        for p in inspect.signature(public_class(name).__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    documented = documented_names(REPO / "docs" / "operators.md", f"`{name}`")
    assert parameters - documented == set(), f"{name}: parameters missing from docs/operators.md"
    assert documented - parameters == set(), f"{name}: docs/operators.md documents parameters it lacks"


class RecordingExtras(dict):
    """Connection extras that remember every name the code asks for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: set[str] = set()

    def get(self, key: Any, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return super().__contains__(key)


class FakeConnection:
    conn_id = "modelroute_docs"
    conn_type = "modelroute"
    host = "https://api.modelroute.ai"
    port = None
    login = schema = None
    password = "sk_" + "0" * 64 + "_00000000"

    extra = "{}"


def extras_read(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The extra names the hook and webhook mode read, asked of a connection that sets none of them
    (the webhook ones of one that turns webhook mode on, so every one of them is read)."""
    from airflow_provider_modelroute.hooks import transport
    from airflow_provider_modelroute.webhooks.mode import WebhookConfig

    hook_asked: set[str] = set()
    read_extra = transport.extra_value
    monkeypatch.setattr(
        transport, "extra_value", lambda values, name: hook_asked.add(name) or read_extra(values, name)
    )
    transport.ConnectionSettings.from_connection(FakeConnection())  # type: ignore[arg-type]
    webhook_extras = RecordingExtras(
        webhook_secret="whsec_docs",
        webhook_receiver_url="https://airflow.example.com/modelroute/webhooks/modelroute_docs",
    )
    WebhookConfig.from_extras("modelroute_docs", webhook_extras)
    asked = hook_asked | webhook_extras.asked
    return {name.removeprefix("extra__modelroute__") for name in asked}


def test_every_extra_read_is_documented_and_nothing_documented_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read = extras_read(monkeypatch)
    documented = documented_names(REPO / "docs" / "connections.md", "Extras")
    assert {"timeout", "webhook_secret"} <= read  # the recording sees the reads at all
    assert read - documented == set(), "extras the provider reads but docs/connections.md does not list"
    assert documented - read == set(), "extras docs/connections.md lists but the provider never reads"


# --- the docs as a whole -------------------------------------------------------------------------


def test_readme_reads_in_ten_minutes() -> None:
    assert len(README.read_text().splitlines()) < 300


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_docs_speak_about_the_product(doc: Path) -> None:
    offending = [
        line
        for line in doc.read_text().splitlines()
        if re.search(r"session|helper|this machine|other engineers|issue [0-9]", line, flags=re.I)
    ]
    assert offending == []


@pytest.mark.parametrize("doc", [README, *DOCS, REPO / "CONTRIBUTING.md"], ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if "://" not in target:
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_changelog_has_one_unreleased_section() -> None:
    headings = re.findall(r"^## (.+)$", (REPO / "CHANGELOG.md").read_text(), flags=re.M)
    assert [h for h in headings if "unreleased" in h.lower()] == ["[Unreleased]"]
