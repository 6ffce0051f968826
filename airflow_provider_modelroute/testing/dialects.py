"""Dialects of the local server: one choice for each place where the ModelRoute docs disagree or are silent.

The docs are several pages written at different times; a real account may behave like any of these
readings. The server plays one dialect at a time (``ModelRouteServer(dialect=...)``, the CLI's
``--dialect``, or the ``MODELROUTE_DIALECT`` environment variable), so that DAG tests can run the
same flows against each. A dialect is a preset name, optionally followed by overrides:
``"redirect"``, ``"literal,submit=sync,replay_header=true"``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

ENV_VAR = "MODELROUTE_DIALECT"

#: The values each reading may take (the first is the literal reading of the docs).
CHOICES: dict[str, tuple[Any, ...]] = {
    # GET /v1/files/{id}/download: the bytes (the seed's `curl -o`), the JSON URL document, a redirect
    "download": ("bytes", "json", "redirect"),
    # POST /v1/executions: 202 PENDING, or 200 with an execution that is already terminal
    "submit": ("async", "sync"),
    # POST /v1/files/upload: v2 = the uploading page (purpose required), v1 = llms.txt (filename...)
    "upload": ("v2", "v1"),
    # X-RateLimit-Reset: a unix time (the polling page's example), a delta in seconds, or absent
    "rate_limit_reset": ("unix", "delta", "absent"),
    # a repeated Idempotency-Key: the original answer again (even a stale PENDING), or the current state
    "replay": ("original", "current"),
    # ... and whether the answer says so with `Idempotent-Replayed: true`
    "replay_header": (False, True),
    # an unknown execution id: a documented error body (404), or a bare 404 without a body
    "unknown_id": ("error-body", "bare-404"),
    # POST /v1/files/confirm: required before an upload is usable, or absent (404 or 405)
    "confirm": ("required", "404", "405"),
    # GET /v1/files/{id}/url (llms.txt only): present or absent
    "url_endpoint": (True, False),
}


@dataclass(frozen=True)
class Dialect:
    """How the server reads each disputed or silent place of the docs (see ``CHOICES``)."""

    name: str = "literal"
    download: str = "bytes"
    submit: str = "async"
    upload: str = "v2"
    rate_limit_reset: str = "unix"
    replay: str = "original"
    replay_header: bool = False
    unknown_id: str = "error-body"
    confirm: str = "required"
    url_endpoint: bool = True

    def __post_init__(self) -> None:
        for reading, allowed in CHOICES.items():
            if getattr(self, reading) not in allowed:
                raise ValueError(
                    f"dialect {self.name!r}: {reading} must be one of {list(allowed)}, "
                    f"got {getattr(self, reading)!r}"
                )

    def readings(self) -> dict[str, Any]:
        """The choices, without the name."""
        return {reading: getattr(self, reading) for reading in CHOICES}


#: Named presets; together they play every value of every reading at least once.
PRESETS: dict[str, Dialect] = {
    # The docs read literally: the seed page's /download examples get the bytes, 202 PENDING, the
    # newer upload page, Reset as in the polling page's example, a silent replay of the original
    # answer, documented error bodies, the newer confirm step, llms.txt's /url.
    "literal": Dialect(),
    # llms.txt's view: presigned-URL document, the old upload body and no confirm step; a replay
    # says so and shows the current state; Reset as a delta; an unknown id is a bare 404.
    "presigned": Dialect(
        name="presigned",
        download="json",
        upload="v1",
        rate_limit_reset="delta",
        replay="current",
        replay_header=True,
        unknown_id="bare-404",
        confirm="404",
    ),
    # An S3-style redirect from /download, no /url, no Reset header, a replay marked by the header.
    "redirect": Dialect(
        name="redirect",
        download="redirect",
        rate_limit_reset="absent",
        replay_header=True,
        unknown_id="bare-404",
        url_endpoint=False,
    ),
    # The seed page's end-to-end example: the POST answers the finished execution.
    "sync": Dialect(
        name="sync",
        download="redirect",
        submit="sync",
        upload="v1",
        confirm="405",
        url_endpoint=False,
    ),
}
DEFAULT = PRESETS["literal"]


def _value(reading: str, text: str) -> Any:
    if isinstance(CHOICES[reading][0], bool):
        return text.strip().lower() in ("1", "true", "yes", "on")
    return text.strip()


def dialect_from(spec: str | Dialect | None) -> Dialect:
    """A dialect from a preset name with optional overrides (``"sync,download=json"``), or as given.

    None reads ``MODELROUTE_DIALECT`` (the literal reading when it is unset).
    """
    if isinstance(spec, Dialect):
        return spec
    spec = spec if spec is not None else os.environ.get(ENV_VAR, "")
    name, *overrides = [part.strip() for part in spec.split(",")] if spec.strip() else ["literal"]
    if name not in PRESETS:
        raise ValueError(f"unknown dialect {name!r}; presets: {', '.join(PRESETS)}")
    changes: dict[str, Any] = {}
    for override in overrides:
        reading, _, text = override.partition("=")
        if reading.strip() not in CHOICES:
            raise ValueError(
                f"unknown reading {reading!r} in dialect {spec!r}; readings: {', '.join(CHOICES)}"
            )
        changes[reading.strip()] = _value(reading.strip(), text)
    if changes:
        changes["name"] = spec
    return dataclasses.replace(PRESETS[name], **changes)
