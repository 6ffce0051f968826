"""Client-side pacing by the API's ``X-RateLimit-*`` headers, shared by every client of one key."""

from __future__ import annotations

import asyncio
import collections
import random
import time
import weakref
from dataclasses import dataclass


@dataclass
class RateLimit:
    """The last ``X-RateLimit-*`` headers seen (reset in unix seconds)."""

    limit: int | None = None
    remaining: int | None = None
    reset: float | None = None


class RateBudget:
    """Paces the async requests of all clients of one connection in one event loop (one triggerer).

    It learns the window from the ``X-RateLimit-*`` headers: it hands out the requests that remain,
    then holds everyone until the window resets, so thousands of triggers do not storm the API
    into 429s. Until the first response only one request is in flight; a server that sends no
    rate-limit headers is not paced at all. Responses only ever lower the allowance (many are in
    flight at once, so a response's ``Remaining`` is already stale); it is restored when the window
    resets.
    """

    def __init__(self) -> None:
        self.limit: int | None = None
        self.remaining: int | None = None
        self.reset: float | None = None
        self.unpaced = False
        self._probing = False
        self._recent: collections.deque[float] = collections.deque()

    def _open_window(self, now: float) -> None:
        # ``Reset`` is in whole seconds, rounded up: the server's window may have turned up to a
        # second earlier, so what we sent in that second may already count against the new one.
        carried = sum(1 for sent in self._recent if sent > (self.reset or now) - 1)
        # Nothing left to hand out (or only the carry): probe the server again rather than wait on
        # a reset that no response will ever announce.
        self.remaining, self.reset = max(0, (self.limit or 1) - carried) or None, None

    async def acquire(self) -> None:
        while not self.unpaced:
            now = time.time()
            if self.remaining is None:
                if not self._probing:
                    self._probing = True
                    return
                await asyncio.sleep(0.05)
                continue
            if self.reset is not None and now >= self.reset:
                self._open_window(now)
                continue
            if self.remaining > 0:
                self.remaining -= 1
                self._recent.append(now)
                while self._recent[0] < now - 2:
                    self._recent.popleft()
                return
            # Spread the wake-ups a little so a new window does not open with a thundering herd.
            await asyncio.sleep(max(self.reset - now, 0.0) if self.reset else 0.05)
            await asyncio.sleep(random.uniform(0, 0.05))

    def observe(self, seen: RateLimit | None) -> None:
        """Learn from a response's rate-limit headers (None: the request got no response)."""
        self._probing = False
        if seen is None:
            return
        if seen.remaining is None:
            self.unpaced = self.remaining is None
            return
        # Without a Limit header, the most we have seen remaining is the best guess.
        self.limit = seen.limit if seen.limit is not None else max(self.limit or 0, seen.remaining)
        if self.remaining is None:  # the first answer
            self.remaining, self.reset = seen.remaining, seen.reset
            return
        if seen.reset is None or seen.reset <= time.time() or (self.reset and seen.reset < self.reset):
            return  # a late answer from a window that has already closed
        self.remaining = min(self.remaining, seen.remaining)
        self.reset = max(self.reset or 0.0, seen.reset)


_BUDGETS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, RateBudget]] = (
    weakref.WeakKeyDictionary()
)


def shared_rate_budget(key: str) -> RateBudget:
    """The one budget of a connection in the running event loop."""
    per_loop = _BUDGETS.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(key, RateBudget())
