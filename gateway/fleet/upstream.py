"""The one door to a replica: its connection pool, the backend's own headers, and the
mapping of the client's errors to the gateway's.

Everything the gateway sends to a runtime goes through an ``Upstream``: the proxied
request (``request``), and the small answers it reads whole for itself (``fetch``: model
lists, probes, load reports, model management). Both raise ``UpstreamError`` alone; the
two functions below turn one into the error the client is shown.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from gateway.client import (
    BadResponse,
    Body,
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    Headers,
    Origin,
    Pool,
    PoolTimeout,
    ReadTimeout,
    Response,
    TooLarge,
    UpstreamError,
)
from gateway.config.settings import Settings
from gateway.core.errors import BackendBadResponse, BackendError, BackendTimeout, BackendUnreachable
from gateway.fleet.backend import USER_AGENT


class Upstream:
    """Owns the pool of connections to one replica; opened and closed by the app's lifespan."""

    def __init__(self, settings: Settings, url: str, auth_header: tuple[bytes, bytes] | None = None) -> None:
        self.settings = settings
        self.origin = Origin.from_url(url)
        self.auth_header = auth_header
        """The header that authenticates the gateway to the backend, added to every request."""
        self.own_headers: Headers = []
        """Headers of the gateway's own requests (probes, model lists), not a client's."""
        self.set_auth(auth_header)
        self.on_retry: Callable[[], object] | None = None
        """Called when a request is sent again on a fresh connection (a metric)."""
        self._pool: Pool | None = None

    def set_auth(self, auth_header: tuple[bytes, bytes] | None) -> None:
        """Authenticate to the backend with this header from the next request on (a key
        rotated in the backends file, read again on SIGHUP)."""
        self.auth_header = auth_header
        self.own_headers = [(b"user-agent", USER_AGENT)]
        if auth_header is not None:
            self.own_headers.append(auth_header)

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            raise RuntimeError("the upstream pool is opened by the app's lifespan")
        return self._pool

    def with_key(self, forward: Headers) -> Headers:
        """A client's headers as they go to the backend: with the backend's key, if it has one."""
        return forward if self.auth_header is None else [*forward, self.auth_header]

    def request(
        self, method: str, target: str, forward: Headers, body: Body, deadline: float | None
    ) -> Coroutine[Any, Any, Response]:
        """A client's request, answered once the status line and headers have come
        (``Pool.request``; the pool's own coroutine, so the hot path has one frame less)."""
        headers = forward if self.auth_header is None else [*forward, self.auth_header]
        return self.pool.request(method, target, headers, body, deadline)

    async def fetch(
        self,
        method: str,
        target: str,
        seconds: float,
        *,
        body: bytes | None = None,
        forward: Headers | None = None,
    ) -> tuple[int, bytes]:
        """A whole small answer within ``seconds``: the gateway's own request with its own
        headers, or a client's (``forward``) with the backend's key."""
        headers = self.own_headers if forward is None else self.with_key(forward)
        return await self.pool.fetch(method, target, headers, seconds, body)

    async def health(self, path: str, fallback: str | None, seconds: float) -> int:
        """The status of the runtime's readiness route, or of ``fallback`` where the server
        answers 404 to it."""
        status, _ = await self.fetch("GET", path, seconds)
        if status == 404 and fallback is not None:
            status, _ = await self.fetch("GET", fallback, seconds)
        return status

    async def open(self) -> None:
        settings = self.settings
        self._pool = Pool(
            self.origin,
            limit=settings.backend_max_connections,
            connect_timeout=settings.backend_connect_timeout,
            # Bounds the wait for the status line; the proxy narrows it to the stream
            # idle timeout once the response has started.
            read_timeout=settings.backend_timeout,
            keepalive=settings.backend_keepalive_timeout,
            max_head_bytes=settings.backend_max_header_bytes,
            max_headers=settings.backend_max_headers,
            max_read_bytes=settings.backend_max_read_bytes,
            on_retry=self.on_retry,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def before_response_error(exc: UpstreamError, settings: Settings) -> BackendError:
    """Map a failure met before the backend's status line to the gateway's error."""
    if isinstance(exc, ConnectTimeout):
        return BackendUnreachable(
            f"could not connect to the backend within {settings.backend_connect_timeout:g} s"
        )
    if isinstance(exc, PoolTimeout):
        return BackendTimeout(
            f"no connection to the backend became free within {settings.backend_timeout:g} s "
            f"(--backend-max-connections {settings.backend_max_connections})"
        )
    if isinstance(exc, ReadTimeout):
        return BackendTimeout(f"the backend did not answer within {settings.backend_timeout:g} s")
    if isinstance(exc, ConnectFailed):
        return BackendUnreachable(f"cannot connect to the backend: {exc}")
    if isinstance(exc, Disconnected):
        return BackendBadResponse("the backend closed the connection without answering")
    if isinstance(exc, TooLarge):
        return BackendBadResponse(f"the backend's answer is too large: {exc}")
    if isinstance(exc, BadResponse):
        return BackendBadResponse(f"bad answer from the backend: {exc}")
    return BackendBadResponse(f"bad answer from the backend: {type(exc).__name__}")


def mid_stream_error(exc: UpstreamError, settings: Settings) -> BackendError:
    """Map a failure after the response started (the stream is cut short)."""
    if isinstance(exc, ReadTimeout):
        return BackendTimeout(
            f"the backend sent nothing for {settings.stream_idle_timeout:g} s; the stream was cut off"
        )
    return BackendBadResponse("the backend ended the response before it was complete")
