"""The async client of triggers: status, result and cancel on aiohttp, one shared session per origin.

aiohttp is imported when the first session opens, never at import time: ``aiohttp.connector``
alone costs ~60 ms, which every DAG-file parse would pay (DAG files import the operators, which
import this module only when they run).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import tenacity

from airflow_provider_modelroute import api
from airflow_provider_modelroute.exceptions import ModelRouteApiError
from airflow_provider_modelroute.hooks.core import ApiCore, execution_path
from airflow_provider_modelroute.hooks.network import Route, route

if TYPE_CHECKING:
    import aiohttp

#: Idle keep-alive connections are kept this long: longer than the usual poll intervals (so a
#: trigger polling every 5-30 s does not reconnect each time), shorter than the idle timeouts of
#: common load balancers (60 s and up). A connection the server closed sooner is not reused.
_KEEPALIVE_EXPIRY = 50.0
#: Connections to one origin per event loop; more requests at once wait for a free connection.
_MAX_CONNECTIONS = 100

_SessionKey = tuple[str, str, str | None, str | None]


class _SharedSession:
    """One event loop's aiohttp session to one origin (and TLS setup), and how many clients use it."""

    __slots__ = ("session", "users")

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.users = 0


_SESSIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_SessionKey, _SharedSession]] = (
    weakref.WeakKeyDictionary()
)


def _open_session(key: _SessionKey, tls: Route) -> _SharedSession:
    """The running loop's session for ``key``, created on first use; the caller becomes a user."""
    per_loop = _SESSIONS.setdefault(asyncio.get_running_loop(), {})
    shared = per_loop.get(key)
    if shared is None:
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=_MAX_CONNECTIONS, keepalive_timeout=_KEEPALIVE_EXPIRY, ssl=tls.ssl_context()
        )
        # trust_env stays off: ``network.route`` already read the proxy and CA variables, the same way
        # for the sync client, and aiohttp's own reading of NO_PROXY differs from requests'.
        shared = per_loop[key] = _SharedSession(aiohttp.ClientSession(connector=connector, trust_env=False))
    shared.users += 1
    return shared


async def _release(key: _SessionKey, shared: _SharedSession) -> None:
    """The caller stops using the session; the last user closes it."""
    shared.users -= 1
    if shared.users > 0:
        return
    per_loop = _SESSIONS.get(asyncio.get_running_loop(), {})
    if per_loop.get(key) is shared:
        del per_loop[key]
    await shared.session.close()


class ModelRouteAsyncClient:
    """The async read paths (status, result, cancel) used by triggers.

    All clients of one event loop (one triggerer) that talk to one API origin share one aiohttp
    session: thousands of triggers share at most ``_MAX_CONNECTIONS`` keep-alive connections, and a
    poll reuses whichever is idle. Requests are paced by the API key's shared ``RateBudget``.
    """

    def __init__(self, core: ApiCore) -> None:
        self.core = core
        settings = core.settings
        self._route = route(settings, settings.base_url)
        self._key: _SessionKey = (
            settings.base_url,
            self._route.ca_bundle,
            self._route.client_cert,
            self._route.client_key,
        )
        self._shared: _SharedSession | None = None
        self._headers = core.headers
        self._timeout: Any = None

    async def _send(self, method: str, url: str) -> tuple[int, Mapping[str, str], bytes]:
        if self._shared is None:
            import aiohttp

            settings = self.core.settings
            self._timeout = aiohttp.ClientTimeout(
                total=settings.connect_timeout + settings.read_timeout,
                sock_connect=settings.connect_timeout,
                sock_read=settings.read_timeout,
            )
            self._shared = _open_session(self._key, self._route)
        try:
            async with self._shared.session.request(
                method,
                url,
                headers=self._headers,
                proxy=self._route.proxy,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                return response.status, response.headers, await response.read()
        except asyncio.TimeoutError as exc:
            if str(exc):
                raise
            settings = self.core.settings
            raise TimeoutError(
                f"no complete answer within {settings.connect_timeout:g} s (connect) + "
                f"{settings.read_timeout:g} s (read)"
            ) from exc

    async def _request_once(self, method: str, path: str) -> Any:
        url = self.core.url(path)
        budget = self.core.budget
        await budget.acquire(self.core.log)
        seen = None
        try:
            try:
                status, headers, content = await self._send(method, url)
            except Exception as exc:
                raise self.core.transport_error(exc, method, url) from None
            self.core.note_rate_limit(headers)
            seen = self.core.rate_limit
            return self.core.parse(method, path, status, headers, content)
        finally:
            budget.observe(seen)

    async def _request(self, method: str, path: str) -> Any:
        retrying = tenacity.AsyncRetrying(**self.core.retry_kwargs())
        return await retrying(self._request_once, method, path)

    async def get_execution(self, execution_id: str) -> dict[str, Any]:
        return await self._request("GET", execution_path(execution_id))

    async def get_execution_result(self, execution_id: str) -> dict[str, Any]:
        return await self._request("GET", execution_path(execution_id, "/result"))

    async def cancel_execution(self, execution_id: str) -> dict[str, Any] | None:
        """Cancel an execution; None if it had already finished (a refusal is checked by reading it)."""
        try:
            return await self._request("POST", execution_path(execution_id, "/cancel"))
        except ModelRouteApiError as exc:
            if not exc.permanent or not api.is_terminal(
                (await self.get_execution(execution_id)).get("status")
            ):
                raise
            return None

    @property
    def sharing(self) -> int:
        """How many clients of this event loop share this one's session (this one included)."""
        return self._shared.users if self._shared is not None else 1

    async def aclose(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            await _release(self._key, shared)
