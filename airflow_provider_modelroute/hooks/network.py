"""How to reach a URL (the CA to trust, the client certificate, the proxy): one answer for both clients.

The sync client (requests) and the async one (aiohttp) read the environment differently on their
own, so neither is left to: both clients turn environment reading off and take what ``route``
says. The same rules apply to API and storage URLs:

- CA bundle: the connection extra ``ca_bundle``, else ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` or
  ``SSL_CERT_FILE`` (the first set), else certifi's bundle (what requests trusts by default).
- Client certificate (``client_cert``, ``client_key`` extras): shown to the API host only.
- Proxy: ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` by the URL's scheme, except for hosts that
  ``NO_PROXY`` matches (names, domain suffixes, IP ranges, ``host:port``), as requests reads them.
"""

from __future__ import annotations

import functools
import os
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from requests.utils import get_environ_proxies, select_proxy

from airflow_provider_modelroute.exceptions import ModelRouteConfigError
from airflow_provider_modelroute.hooks.settings import ConnectionSettings

CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")
PROXY_VARIABLES = tuple(
    name for base in ("https_proxy", "http_proxy", "all_proxy") for name in (base, base.upper())
)


@dataclass(frozen=True)
class Route:
    """The CA bundle to trust, the client certificate to show, and the proxy to use for one URL."""

    ca_bundle: str
    client_cert: str | None = None
    client_key: str | None = None
    proxy: str | None = None

    def requests_options(self) -> dict[str, Any]:
        """``verify``/``cert``/``proxies`` for a requests call (whose ``trust_env`` is off)."""
        cert = (self.client_cert, self.client_key) if self.client_key else self.client_cert
        proxies = {"http": self.proxy, "https": self.proxy} if self.proxy else {}
        return {"verify": self.ca_bundle, "cert": cert, "proxies": proxies}

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context for aiohttp (cached: loading a CA bundle takes ~25 ms)."""
        try:
            return _ssl_context(self.ca_bundle, self.client_cert, self.client_key)
        except (ssl.SSLError, OSError) as exc:
            raise ModelRouteConfigError(
                f"Cannot load the TLS files (ca_bundle {self.ca_bundle!r}, client_cert "
                f"{self.client_cert!r}, client_key {self.client_key!r}): {exc}. Fix the connection extras "
                "or the CA environment variable"
            ) from None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def _ca_bundle(settings: ConnectionSettings) -> str:
    if settings.ca_bundle:
        return settings.ca_bundle
    for name in CA_BUNDLE_VARIABLES:
        path = os.environ.get(name)
        if path:
            if not os.path.exists(path):
                raise ModelRouteConfigError(
                    f"The environment variable {name} names {path!r}, which does not exist: fix or unset it"
                )
            return path
    import certifi

    return str(certifi.where())


def route(settings: ConnectionSettings, url: str) -> Route:
    """How to reach ``url`` with this connection's settings and the environment of this process."""
    if settings.client_key and not settings.client_cert:
        raise ModelRouteConfigError(
            "Connection extra 'client_key' is set without 'client_cert': set both (or client_cert alone "
            "for a PEM file that holds the certificate and its key)"
        )
    to_api = url == settings.base_url or _origin(url) == _origin(settings.base_url)
    return Route(
        ca_bundle=_ca_bundle(settings),
        client_cert=settings.client_cert if to_api else None,
        client_key=settings.client_key if to_api else None,
        proxy=_proxy(url),
    )


def _proxy(url: str) -> str | None:
    # Reading the proxy variables as requests does scans the whole environment (~0.3 ms): skip it
    # when none of the usual names is set, as is the rule inside a cluster.
    if not any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    return select_proxy(url, get_environ_proxies(url))


@functools.lru_cache(maxsize=16)
def _ssl_context(ca_bundle: str, client_cert: str | None, client_key: str | None) -> ssl.SSLContext:
    if os.path.isdir(ca_bundle):
        context = ssl.create_default_context(capath=ca_bundle)
    else:
        context = ssl.create_default_context(cafile=ca_bundle)
    if client_cert:
        context.load_cert_chain(client_cert, client_key)
    return context
