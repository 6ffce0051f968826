"""The one way tests and drills wait: poll a condition, with a deadline in minutes, and say what was seen.

A fixed ``sleep`` is a guess about how fast the machine is; on a loaded 2-core CI machine the guess is
wrong. These helpers wait for a state instead (a status on the server, a file, a counter, a log line)
and, if it never comes, fail with what they waited for and the last thing they saw.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Long enough for a loaded machine; a condition that holds returns at once anyway.
DEFAULT_TIMEOUT = 180.0


class WaitTimeout(AssertionError):
    """A condition did not hold before its deadline."""


def _message(what: str, timeout: float, seen: object, describe: Callable[[], str] | None) -> str:
    detail = describe() if describe is not None else f"last seen: {seen!r}"
    return f"Timed out after {timeout:.0f} s waiting for {what}; {detail}"


def wait_for(
    what: str,
    check: Callable[[], T],
    *,
    until: Callable[[T], object] = bool,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.05,
    describe: Callable[[], str] | None = None,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Call ``check`` until ``until(result)`` holds (default: the result is truthy); return the result.

    After ``timeout`` seconds raise :class:`WaitTimeout` naming ``what`` and ``describe()`` (default:
    the last value ``check`` returned). Exceptions in ``ignore`` count as "not yet" (a restarting peer).
    """
    deadline = time.monotonic() + timeout
    seen: object = None
    while True:
        try:
            seen = result = check()
            if until(result):
                return result
        except ignore as exc:
            seen = exc
        if time.monotonic() > deadline:
            raise WaitTimeout(_message(what, timeout, seen, describe))
        time.sleep(interval)


async def async_wait_for(
    what: str, check: Callable[[], T], *, timeout: float = DEFAULT_TIMEOUT, interval: float = 0.01
) -> T:
    """:func:`wait_for` inside an event loop: the loop keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise WaitTimeout(_message(what, timeout, result, None))
        await asyncio.sleep(interval)
    return result
