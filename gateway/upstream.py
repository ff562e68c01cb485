"""The connection pool to the backend, and the mapping of its errors to the gateway's."""

from __future__ import annotations

from collections.abc import Callable

from gateway.client import (
    BadResponse,
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    Origin,
    Pool,
    PoolTimeout,
    ReadTimeout,
    TooLarge,
    UpstreamError,
)
from gateway.errors import BackendBadResponse, BackendError, BackendTimeout, BackendUnreachable
from gateway.settings import Settings


class Upstream:
    """Owns the pool of connections to the backend; opened and closed by the app's lifespan."""

    def __init__(self, settings: Settings, url: str) -> None:
        self.settings = settings
        self.origin = Origin.from_url(url)
        self.on_retry: Callable[[], object] | None = None
        """Called when a request is sent again on a fresh connection (a metric)."""
        self._pool: Pool | None = None

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            raise RuntimeError("the upstream pool is opened by the app's lifespan")
        return self._pool

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


def before_response_error(exc: BaseException, settings: Settings) -> BackendError:
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
    if isinstance(exc, ReadTimeout | TimeoutError):
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


def mid_stream_error(exc: BaseException, settings: Settings) -> BackendError:
    """Map a failure after the response started (the stream is cut short)."""
    if isinstance(exc, ReadTimeout | TimeoutError):
        return BackendTimeout(
            f"the backend sent nothing for {settings.stream_idle_timeout:g} s; the stream was cut off"
        )
    return BackendBadResponse("the backend ended the response before it was complete")


UPSTREAM_ERRORS = (UpstreamError, TimeoutError, OSError)
