"""Injected faults and the rate limit: what the local server breaks, slows or refuses on purpose."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from airflow_provider_modelroute.testing.dialects import Dialect

FAULT_KINDS = frozenset({"error", "rate_limit", "slow", "drop", "truncate", "expire_url", "outcome"})


@dataclass
class Fault:
    """One injected fault: ``kind`` on requests to ``endpoint`` (a route key), ``remaining`` times."""

    endpoint: str
    kind: str
    remaining: int | None
    params: dict[str, Any]


class FaultsMixin:
    """Fault injection and the per-key rate limit of :class:`ModelRouteServer`."""

    _lock: threading.RLock
    _faults: list[Fault]
    _counters: Counter[str]
    _epoch: float
    _window: tuple[int, Counter[str]]
    dialect: Dialect
    rate_limit: int | None
    rate_window: float

    def add_fault(self, endpoint: str, kind: str, count: int | None = 1, **params: Any) -> None:
        """Inject ``kind`` into the next ``count`` requests (None: all) to ``endpoint``.

        ``endpoint`` is a route key as in ``stats()["requests"]`` (e.g. ``"GET /v1/executions/{id}"``,
        ``"GET /files/{file_id}"``) or ``"*"`` for every API route. Kinds: ``error`` (``code``,
        ``status`` when not the code's own, ``retry_after``), ``rate_limit`` (``retry_after``),
        ``slow`` (``seconds``), ``drop`` (close the connection; a create is dropped after the
        execution exists), ``truncate`` (``after_bytes``; storage, or ``/download`` in the bytes
        reading), ``expire_url`` (storage answers 403) and ``outcome`` (the next created execution
        ends ``outcome`` with ``error_code``).
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; use one of {sorted(FAULT_KINDS)}")
        with self._lock:
            self._faults.append(Fault(endpoint, kind, count, params))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults = []

    def _take_fault(self, endpoint: str, kinds: Iterable[str] = FAULT_KINDS) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                matches = fault.endpoint == endpoint or (fault.endpoint == "*" and " /v1/" in endpoint)
                if matches and fault.kind in kinds:
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    self._counters["faults_fired"] += 1
                    return fault
        return None

    def _rate_limit_headers(self, key: str) -> tuple[dict[str, str], bool]:
        """Count a request against the key's window; return the headers and whether it is over."""
        if self.rate_limit is None:
            return {}, False
        with self._lock:
            now = time.time()
            window = int((now - self._epoch) // self.rate_window)
            if window != self._window[0]:
                self._window = (window, Counter())
            counts = self._window[1]
            counts[key] += 1
            reset = math.ceil(self._epoch + (window + 1) * self.rate_window)
            over = counts[key] > self.rate_limit
            headers = {
                "x-ratelimit-limit": str(self.rate_limit),
                "x-ratelimit-remaining": str(max(0, self.rate_limit - counts[key])),
            }
            if self.dialect.rate_limit_reset != "absent":
                delta = self.dialect.rate_limit_reset == "delta"
                headers["x-ratelimit-reset"] = str(max(0, math.ceil(reset - now)) if delta else reset)
            if over:
                self._counters["rate_limited"] += 1
                headers["retry-after"] = str(max(1, math.ceil(reset - now)))
            return headers, over
