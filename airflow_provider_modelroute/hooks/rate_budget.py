"""When a request may go: pacing by the API's ``X-RateLimit-*`` headers, and the retry policy.

One budget per API key per process.
The sync hook (threads) and the triggers (event loops) draw from it.
Its state sits behind a ``threading.Lock``; a request that must wait queues a waiter (an Event for a
thread, a Future for a coroutine) and sleeps until it is granted a request: nothing polls. Only the
head of the queue holds a timer, to the window's reset; a new window wakes exactly as many waiters
as it has requests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import tenacity

from airflow_provider_modelroute import api, metrics
from airflow_provider_modelroute.exceptions import ModelRouteApiError, ModelRouteConnectionError

#: A wait longer than this is logged ("waiting 38 s for the rate window of key ...1a2b").
LOG_WAITS_OVER = 5.0

_log = logging.getLogger(__name__)


@dataclass
class RateLimit:
    """The ``X-RateLimit-*`` headers of one response (reset normalised to unix seconds)."""

    limit: int | None = None
    remaining: int | None = None
    reset: float | None = None

    @classmethod
    def read(cls, headers: Mapping[str, str]) -> RateLimit | None:
        """The window the headers describe, or None if they name none.

        ``Reset`` may be a unix time, a delta in seconds, or absent. Without it the window's end is
        unknown, so ``Remaining`` cannot pace anything: only ``Retry-After`` (then backoff) on a 429.
        """

        def as_int(name: str) -> int | None:
            with contextlib.suppress(TypeError, ValueError):
                return int(float(headers.get(name)))  # type: ignore[arg-type]
            return None

        limit, remaining = as_int("X-RateLimit-Limit"), as_int("X-RateLimit-Remaining")
        reset = api.rate_limit_reset(headers.get("X-RateLimit-Reset"), time.time())
        if limit is None and remaining is None:
            return None
        return cls(limit, remaining if reset is not None else None, reset)


class _ThreadWaiter:
    """A blocked thread (the sync hook)."""

    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.granted = False

    def wake(self) -> None:
        self.event.set()

    def wait(self, timeout: float | None) -> None:
        self.event.wait(timeout)
        self.event.clear()


class _TaskWaiter:
    """A blocked coroutine (a trigger), woken from any thread."""

    __slots__ = ("future", "granted", "loop", "thread")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.future: asyncio.Future[None] = self.loop.create_future()
        self.granted = False

    def _set(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def wake(self) -> None:
        if threading.get_ident() == self.thread:
            self._set()
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._set)

    async def wait(self, timeout: float | None) -> None:
        timer = self.loop.call_later(timeout, self._set) if timeout is not None else None
        try:
            await self.future
        finally:
            if timer is not None:
                timer.cancel()
            self.future = self.loop.create_future()


_Waiter = _ThreadWaiter | _TaskWaiter
W = TypeVar("W", _ThreadWaiter, _TaskWaiter)


class RateBudget:
    """Paces every request of one API key in this process by the server's rate-limit headers.

    It hands out the requests that remain in the window, then holds everyone until it resets, so
    thousands of triggers do not storm the API into 429s. Until the first answer (or while the
    window is spent and its reset unknown) one request at a time goes out to learn the state; a
    server that sends no rate-limit headers is not paced at all. Answers only ever lower the
    allowance (many are in flight at once, so an answer's ``Remaining`` is already stale).
    """

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

    # -- state (under the lock) -----------------------------------------------------------------

    def _take(self, now: float) -> bool:
        """Take one request if the budget allows it now."""
        if self.reset is not None and now >= self.reset:
            # ``Reset`` is in whole seconds, rounded up: the server's window may have turned up to a
            # second earlier, so what we sent in that second may already count against the new one.
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
            if self.remaining is not None:  # paced: remember the send for the next window
                self._sent.append(now)
                while self._sent[0] < now - 2:
                    self._sent.popleft()
        return allowed

    def _grant(self) -> None:
        """Hand requests to the waiters at the head of the queue; have the head (re)arm its timer."""
        now = time.time()
        head = self._queue[0] if self._queue else None
        while self._queue and self._take(now):
            waiter = self._queue.popleft()
            waiter.granted = True
            waiter.wake()
        if self._queue and (self._queue[0] is not head or self.reset != self._armed_for):
            self._queue[0].wake()

    def _timeout(self, waiter: _Waiter) -> float | None:
        """The head waits for the reset; everyone else until granted (no timer at all)."""
        if not self._queue or self._queue[0] is not waiter:
            return None
        self._armed_for = self.reset
        return None if self.reset is None else max(0.0, self.reset - time.time())

    def _now_or_queue(self, make_waiter: Callable[[], W], log: Any) -> W | None:
        """Take a request now (None), or queue and return a new waiter (FIFO: no overtaking)."""
        with self._lock:
            if not self._queue and self._take(time.time()):
                return None
            waiter = make_waiter()
            self._queue.append(waiter)
            seconds = None if self.reset is None else self.reset - time.time()
        if seconds is not None and seconds > LOG_WAITS_OVER:
            (log or _log).info("waiting %.0f s for the rate window of key ...%s", seconds, self.label)
        return waiter

    def _granted(self, waiter: _Waiter) -> tuple[bool, float | None]:
        """After a wake-up: whether the waiter got its request, else the timeout of its next wait."""
        with self._lock:
            if not waiter.granted:
                self._grant()
            return waiter.granted, None if waiter.granted else self._timeout(waiter)

    def _leave(self, waiter: _Waiter) -> None:
        """A waiter gave up (cancelled): leave the queue, or hand back the request it was granted."""
        with self._lock:
            if waiter.granted:
                self.in_flight -= 1
            else:
                self._queue.remove(waiter)
            self._grant()

    # -- the clients' side ----------------------------------------------------------------------

    def acquire_blocking(self, log: Any = None) -> None:
        """Wait (blocking this thread) until a request may be sent; pair it with one ``observe``."""
        started = time.monotonic()
        waiter = self._now_or_queue(_ThreadWaiter, log)
        if waiter is None:
            return
        granted, timeout = self._granted(waiter)
        while not granted:
            waiter.wait(timeout)
            granted, timeout = self._granted(waiter)
        metrics.rate_budget_wait(time.monotonic() - started)

    async def acquire(self, log: Any = None) -> None:
        """Wait (not blocking the event loop) until a request may be sent; pair it with one ``observe``."""
        started = time.monotonic()
        waiter = self._now_or_queue(_TaskWaiter, log)
        if waiter is None:
            return
        try:
            granted, timeout = self._granted(waiter)
            while not granted:
                await waiter.wait(timeout)
                granted, timeout = self._granted(waiter)
        except BaseException:
            self._leave(waiter)
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
        if first or self.remaining is None or learning:
            # The first answer, or the one request that went out to learn a spent window's state.
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
        budget = _BUDGETS.get(key)
        if budget is None:
            budget = _BUDGETS[key] = RateBudget(label=api_key[-4:])
        return budget


def retry_after(status: int, headers: Mapping[str, str], window: RateLimit) -> float | None:
    """How long the server asks us to wait: ``Retry-After`` (seconds or a date), else a 429's window reset."""
    value = headers.get("Retry-After")
    if value:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value))
        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    if status == 429 and window.reset is not None:
        return max(0.0, window.reset - time.time())
    return None


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (ModelRouteConnectionError, ModelRouteApiError)) and bool(exc.retryable)


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry a failed request, the same for sync and async calls (tenacity's arguments).

    Only what says it is retryable, at most ``max_retries`` times within ``deadline`` seconds; a
    stale kept-alive connection at once, the server's ``Retry-After`` when given, else backoff.
    """

    max_retries: int = 5
    base_wait: float = 0.5
    max_wait: float = 30.0
    deadline: float = 120.0
    log: Any = field(default=_log, compare=False, repr=False)

    def backoff(self, attempt: int) -> float:
        """Capped exponential backoff with full jitter for the ``attempt``-th retry (1-based)."""
        return random.uniform(0, min(self.max_wait, self.base_wait * 2 ** (attempt - 1)))

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if getattr(exc, "stale", False) and state.attempt_number == 1:
            return 0.0
        hinted = getattr(exc, "retry_after", None)
        if hinted is not None:  # the server's hint, plus a little jitter so clients do not return at once
            return float(hinted) + random.uniform(0, min(1.0, 0.1 * float(hinted) + 0.05))
        return self.backoff(state.attempt_number)

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        upcoming = getattr(state, "upcoming_sleep", 0.0) or 0.0
        return (
            state.attempt_number > self.max_retries
            or (state.seconds_since_start or 0.0) + upcoming > self.deadline
        )

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        metrics.retry()
        self.log.warning(
            "ModelRoute request failed (%s); retry %d of %d in %.1f s",
            exc,
            state.attempt_number,
            self.max_retries,
            getattr(state, "upcoming_sleep", 0.0) or 0.0,
        )

    def args(self) -> dict[str, Any]:
        """Keyword arguments for ``tenacity.Retrying`` and ``tenacity.AsyncRetrying``."""
        return {
            "retry": tenacity.retry_if_exception(_retryable),
            "wait": self._wait,
            "stop": self._stop,
            "before_sleep": self._before_sleep,
            "reraise": True,
        }
