"""The pooled aiohttp session to the backend, and the mapping of its errors to the gateway's."""

from __future__ import annotations

import asyncio

import aiohttp

from gateway.errors import BackendBadResponse, BackendError, BackendTimeout, BackendUnreachable
from gateway.settings import Settings

# Backends behind uvicorn (vLLM, SGLang, llama-cpp-python) close idle connections after
# 5 s; dropping ours first avoids sending a request into a socket being closed.
KEEPALIVE_SECONDS = 4.0

# Headers aiohttp would add on its own; the client's are forwarded as they are instead.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class Upstream:
    """Owns the one client session; opened and closed by the app's lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream session is opened by the app's lifespan")
        return self._session

    async def open(self) -> None:
        settings = self.settings
        connector = aiohttp.TCPConnector(
            limit=settings.backend_max_connections,
            limit_per_host=0,
            keepalive_timeout=KEEPALIVE_SECONDS,
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # sock_read bounds the wait for the first byte; the proxy narrows it to the
            # stream idle timeout once the response has started.
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=settings.backend_connect_timeout,
                sock_read=settings.backend_timeout,
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=SKIP_AUTO_HEADERS,
            trust_env=False,
            read_bufsize=2**16,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def before_response_error(exc: BaseException, settings: Settings) -> BackendError:
    """Map an aiohttp failure met before the backend's status line to the gateway's error."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return BackendUnreachable(
            f"could not connect to the backend within {settings.backend_connect_timeout:g} s"
        )
    if isinstance(exc, asyncio.TimeoutError):
        return BackendTimeout(f"the backend sent nothing within {settings.backend_timeout:g} s")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return BackendUnreachable(f"cannot connect to the backend: {exc.os_error.strerror or exc}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return BackendBadResponse("the backend closed the connection without answering")
    return BackendBadResponse(f"bad answer from the backend: {type(exc).__name__}")


def mid_stream_error(exc: BaseException, settings: Settings) -> BackendError:
    """Map a failure after the response started (the stream is cut short)."""
    if isinstance(exc, asyncio.TimeoutError):
        return BackendTimeout(
            f"the backend sent nothing for {settings.stream_idle_timeout:g} s; the stream was cut off"
        )
    return BackendBadResponse("the backend ended the response before it was complete")


UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
