"""When a request may go: one budget per API key per process paced by the ``X-RateLimit-*`` headers
(waiting requests queue and sleep; only the head holds a timer), and the retry policy."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tenacity

from airflow_provider_modelroute import api, metrics

#: A wait longer than this is logged ("waiting 38 s for the rate window of key ...1a2b").
LOG_WAITS_OVER = 5.0

_log = logging.getLogger(__name__)


@dataclass
class RateLimit:
    """The ``X-RateLimit-*`` headers of one response (reset in unix seconds)."""

    limit: int | None = None
    remaining: int | None = None
    reset: float | None = None

    @classmethod
    def read(cls, headers: Mapping[str, str]) -> RateLimit | None:
        """The window the headers describe, or None; without a ``Reset``, ``Remaining`` paces nothing."""

        def as_int(name: str) -> int | None:
            with contextlib.suppress(TypeError, ValueError):
                return int(float(headers.get(name)))  # type: ignore[arg-type]
            return None

        limit, remaining = as_int("X-RateLimit-Limit"), as_int("X-RateLimit-Remaining")
        reset = api.rate_limit_reset(headers.get("X-RateLimit-Reset"), time.time())
        if limit is None and remaining is None:
            return None
        return cls(limit, remaining if reset is not None else None, reset)


class _Waiter:
    """A queued request: a blocked thread (``loop`` None: an Event) or coroutine (a Future)."""

    __slots__ = ("granted", "loop", "signal")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.granted, self.loop = False, loop
        self.signal: Any = threading.Event() if loop is None else loop.create_future()

    def wake(self) -> None:  # from any thread
        if self.loop is None:
            self.signal.set()
        elif asyncio._get_running_loop() is self.loop:
            self._set()
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._set)

    def _set(self) -> None:
        if not self.signal.done():
            self.signal.set_result(None)


class RateBudget:
    """Hands out what remains of the key's window, then holds everyone until it resets; one request at a
    time learns an unknown state. A server without rate-limit headers is not paced."""

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.limit: int | None = None
        self.remaining: int | None = None
        self.reset: float | None = None
        self.answered = False
        self.in_flight = 0
        self._lock = threading.Lock()
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._armed_for: float | None = None  # the reset that the head's timer is set for
        self._sent: collections.deque[float] = collections.deque()  # the last two seconds' sends

    def _take(self, now: float) -> bool:
        """Take one request if the budget allows it now (under the lock)."""
        if self.reset is not None and now >= self.reset:
            # ``Reset`` is in whole seconds, rounded up: what we sent in its last second may already
            # count against the new window.
            carried = sum(1 for sent in self._sent if sent > self.reset - 1)
            self.remaining, self.reset = max(0, (self.limit or 1) - carried), None
        if self.remaining is None:
            allowed = self.answered or self.in_flight == 0  # unpaced, or the first (probing) request
        elif self.remaining > 0:
            self.remaining -= 1
            allowed = True
        else:  # spent: wait for the reset; if none is known, let one request at a time find out
            allowed = self.reset is None and self.in_flight == 0
        if allowed:
            self.in_flight += 1
            if self.remaining is not None:
                self._sent.append(now)
                while self._sent[0] < now - 2:
                    self._sent.popleft()
        return allowed

    def _grant(self) -> None:
        """Grant the head of the queue what the budget allows; have the head (re)arm its timer."""
        now, head = time.time(), self._queue[0] if self._queue else None
        while self._queue and self._take(now):
            waiter = self._queue.popleft()
            waiter.granted = True
            waiter.wake()
        if self._queue and (self._queue[0] is not head or self.reset != self._armed_for):
            self._queue[0].wake()

    def _enqueue(self, loop: asyncio.AbstractEventLoop | None, log: Any) -> _Waiter | None:
        """Take a request now (None), or queue a waiter (FIFO: no overtaking)."""
        with self._lock:
            if not self._queue and self._take(time.time()):
                return None
            waiter = _Waiter(loop)
            self._queue.append(waiter)
            seconds = None if self.reset is None else self.reset - time.time()
        if seconds is not None and seconds > LOG_WAITS_OVER:
            (log or _log).info("waiting %.0f s for the rate window of key ...%s", seconds, self.label)
        return waiter

    def _granted(self, waiter: _Waiter) -> tuple[bool, float | None]:
        """After a wake-up: whether granted, else the next wait's timeout (only the head has one)."""
        with self._lock:
            if not waiter.granted:
                self._grant()
            if waiter.granted or self._queue[0] is not waiter:
                return waiter.granted, None
            self._armed_for = self.reset
            return False, None if self.reset is None else max(0.0, self.reset - time.time())

    def acquire_blocking(self, log: Any = None) -> None:
        """Wait (blocking this thread) until a request may be sent; pair it with one ``observe``."""
        started, waiter = time.monotonic(), self._enqueue(None, log)
        if waiter is not None:
            granted, timeout = self._granted(waiter)
            while not granted:
                waiter.signal.wait(timeout)
                waiter.signal.clear()
                granted, timeout = self._granted(waiter)
            metrics.rate_budget_wait(time.monotonic() - started)

    async def acquire(self, log: Any = None) -> None:
        """Wait (not blocking the event loop) until a request may be sent; pair it with one ``observe``."""
        loop = asyncio.get_running_loop()
        started, waiter = time.monotonic(), self._enqueue(loop, log)
        if waiter is None:
            return
        try:
            granted, timeout = self._granted(waiter)
            while not granted:
                timer = loop.call_later(timeout, waiter._set) if timeout is not None else None
                try:
                    await waiter.signal
                finally:
                    if timer is not None:
                        timer.cancel()
                    waiter.signal = loop.create_future()
                granted, timeout = self._granted(waiter)
        except BaseException:  # cancelled: leave the queue, or hand back the granted request
            with self._lock:
                if waiter.granted:
                    self.in_flight -= 1
                else:
                    self._queue.remove(waiter)
                self._grant()
            raise
        metrics.rate_budget_wait(time.monotonic() - started)

    def observe(self, seen: RateLimit | None) -> None:
        """Learn from an answer's rate-limit headers (None: the request got no answer)."""
        with self._lock:
            self.in_flight -= 1
            if seen is not None:
                self._learn(seen)
            self._grant()

    def _learn(self, seen: RateLimit) -> None:
        first, self.answered = not self.answered, True
        if seen.remaining is None:  # no headers: the server does not pace (any more); neither do we
            self.remaining = self.reset = None
            return
        # Without a Limit header, the most we have seen remaining is the best guess.
        self.limit = seen.limit if seen.limit is not None else max(self.limit or 0, seen.remaining)
        learning = self.remaining == 0 and self.reset is None and not self.in_flight
        if first or self.remaining is None or learning:  # the first answer, or the one probing request
            self.remaining, self.reset = seen.remaining, seen.reset
            return
        if seen.reset is not None and (seen.reset <= time.time() or (self.reset and seen.reset < self.reset)):
            return  # a late answer from a window that has already closed
        self.remaining = min(self.remaining, seen.remaining)
        if seen.reset is not None:
            self.reset = max(self.reset or 0.0, seen.reset)


_BUDGETS: dict[str, RateBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def shared_rate_budget(base_url: str, api_key: str) -> RateBudget:
    """The one budget of an API key (at one base URL) in this process."""
    key = hashlib.sha256(f"{base_url}|{api_key}".encode()).hexdigest()
    with _BUDGETS_LOCK:
        return _BUDGETS.setdefault(key, RateBudget(label=api_key[-4:]))


def retry_after(status: int, headers: Mapping[str, str], window: RateLimit) -> float | None:
    """How long the server asks us to wait: ``Retry-After`` (seconds), else a 429's window reset."""
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, float(headers.get("Retry-After")))  # type: ignore[arg-type]
    if status == 429 and window.reset is not None:
        return max(0.0, window.reset - time.time())
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry, sync and async alike: what is retryable, ``max_retries`` times within ``deadline``
    seconds, after the server's ``Retry-After`` or a backoff (a stale kept-alive connection at once)."""

    max_retries: int = 5
    base_wait: float = 0.5
    max_wait: float = 30.0
    deadline: float = 120.0

    def backoff(self, attempt: int) -> float:
        """Capped exponential backoff with full jitter for the ``attempt``-th retry (1-based)."""
        return random.uniform(0, min(self.max_wait, self.base_wait * 2 ** (attempt - 1)))

    def retrying(self, log: Any, asynchronous: bool = False) -> tenacity.BaseRetrying:
        """A ``tenacity.Retrying`` (or ``AsyncRetrying``) for this policy, logging retries to ``log``."""

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if getattr(exc, "stale", False) and state.attempt_number == 1:
                return 0.0
            hinted = getattr(exc, "retry_after", None)
            if hinted is not None:  # the server's hint, with a little jitter
                return float(hinted) + random.uniform(0, min(1.0, 0.1 * float(hinted) + 0.05))
            return self.backoff(state.attempt_number)

        def stop(state: tenacity.RetryCallState) -> bool:
            spent = (state.seconds_since_start or 0.0) + (state.upcoming_sleep or 0.0)
            return state.attempt_number > self.max_retries or spent > self.deadline

        def before_sleep(state: tenacity.RetryCallState) -> None:
            metrics.retry()
            exc = state.outcome.exception() if state.outcome else None
            retry = (state.attempt_number, self.max_retries, state.upcoming_sleep)
            log.warning("ModelRoute request failed (%s); retry %d of %d in %.1f s", exc, *retry)

        retry = tenacity.retry_if_exception(lambda exc: getattr(exc, "retryable", None) is True)
        kind = tenacity.AsyncRetrying if asynchronous else tenacity.Retrying
        return kind(retry=retry, wait=wait, stop=stop, before_sleep=before_sleep, reraise=True)
