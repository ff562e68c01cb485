"""Keep-alive connections to one origin, and the request that borrows one."""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable

from gateway.client.connection import Connection
from gateway.client.errors import (
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    PoolTimeout,
    ReadTimeout,
    TooLarge,
)
from gateway.client.models import BREAKS_REQUEST_LINE, Body, Headers, Origin, repeatable, request_head
from gateway.client.response import Response

# Defaults for the backend's response head: Envoy's 60 KiB and 100 headers, rounded up.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
# Bodies the gateway reads whole for itself: probes, model lists, error bodies.
MAX_READ_BYTES = 1024 * 1024


class Pool:
    """Keep-alive connections to one origin, most recently used first.

    Deadlines: ``connect_timeout`` bounds opening a connection; ``read_timeout`` bounds the
    wait for the final status line, counted from the call (so it covers the wait for a free
    connection) and stretched by the time spent uploading a streamed body; interim answers
    and bytes trickling in do not extend it. Once the head has arrived, the response's
    read timeout counts silence between chunks instead (``Response.set_read_timeout``).

    A connection tells the pool of its state through two callbacks: ``_on_idle`` when its
    response is done and it can carry another request, ``_on_close`` when it is gone.
    """

    def __init__(
        self,
        origin: Origin,
        *,
        limit: int = 0,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        keepalive: float = 4.0,
        max_head_bytes: int = MAX_HEAD_BYTES,
        max_headers: int = MAX_HEADERS,
        max_read_bytes: int = MAX_READ_BYTES,
        on_retry: Callable[[], object] | None = None,
    ) -> None:
        self.origin = origin
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.max_read_bytes = max_read_bytes
        """The most ``fetch`` reads: bodies the gateway reads whole for itself."""
        self.retries = 0
        """Requests sent again after a reused connection failed before answering."""
        self.on_retry = on_retry
        self._idle: list[Connection] = []
        self._count = 0
        """Connections open, in use or being opened: what ``limit`` bounds."""
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ssl = ssl.create_default_context() if origin.tls else None
        self._closed = False

    async def request(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: Body = None,
        deadline: float | None = None,
    ) -> Response:
        """Send a request; return once the backend's status line and headers have arrived.

        ``deadline`` (the loop's clock) ends the wait for the status line sooner than
        ``read_timeout`` would: what is left of a request's time after a failed attempt.

        ``target`` is the path and query, appended to the origin's prefix; ``headers`` go
        as they are, after Host and before the framing header this adds. A bytes body
        is sent with its length, an iterable one chunked unless ``headers`` give a
        Content-Length. The caller must ``release()`` or ``close()`` the response.

        A request on a reused connection that fails before any byte of an answer (the
        backend closed the idle connection as the request went out) is sent once more on
        a fresh connection when it is safe to repeat: an idempotent method, or an
        ``Idempotency-Key`` header, and a body that can be sent again.
        """
        if not target.startswith("/") or BREAKS_REQUEST_LINE.search(target):
            raise ValueError(f"not a request target: {target!r}")
        loop = asyncio.get_running_loop()
        own = loop.time() + self.read_timeout
        deadline = own if deadline is None else min(deadline, own)
        head, chunked = request_head(method, self.origin, target, headers, body)
        retried = False
        while True:
            connection, reused = await self._acquire(loop, deadline, fresh=retried)
            response = Response(connection, method, self.read_timeout, deadline, loop, connection.alarm)
            sent = False
            try:
                connection.send(response, head, chunked, body)
                sent = True
                await response.wait_head()
            except Disconnected:
                response.close()
                # Nothing written yet is always safe to send elsewhere; written, only if
                # repeating it is harmless.
                safe = not sent or repeatable(method, headers, body)
                if retried or not reused or response.received or not safe:
                    raise
                retried = True
                self.retries += 1
                if self.on_retry is not None:
                    self.on_retry()
                continue
            except BaseException:
                response.close()
                raise
            return response

    async def fetch(
        self,
        method: str,
        target: str,
        headers: Headers,
        seconds: float,
        body: bytes | None = None,
    ) -> tuple[int, bytes]:
        """A whole small answer within ``seconds``, for the gateway's own calls (probes,
        model lists, model management on every replica).

        A body larger than ``max_read_bytes`` raises ``TooLarge`` after reading just past it;
        an answer not whole in time ``ReadTimeout``.
        """
        limit = self.max_read_bytes
        try:
            async with asyncio.timeout(seconds):
                response = await self.request(method, target, headers, body)
                try:
                    answer, whole = await response.read_up_to(limit)
                except BaseException:
                    response.close()
                    raise
        except TimeoutError:
            raise ReadTimeout(f"the backend's answer to {target} did not come within {seconds:g} s") from None
        if not whole:
            response.close()
            raise TooLarge(f"the backend's answer to {target} is larger than {limit} bytes")
        response.release()
        return response.status, answer

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_exception(Disconnected("the gateway is shutting down"))

    async def _acquire(
        self, loop: asyncio.AbstractEventLoop, deadline: float, fresh: bool = False
    ) -> tuple[Connection, bool]:
        """A connection, and whether it was used before; ``fresh`` opens a new one."""
        while True:
            if self._closed:
                raise Disconnected("the gateway is shutting down")
            idle = self._idle
            stale = loop.time() - self.keepalive
            while idle and not fresh:
                connection = idle.pop()
                if connection.is_closed():
                    continue
                if connection.readable():
                    # An idle connection has nothing to say: this is the backend's close (or
                    # surplus bytes) not yet handled by the loop. Never send into it.
                    connection.close()
                    continue
                if connection.idle_since < stale:
                    connection.close()
                    continue
                return connection, True
            if not self.limit or self._count < self.limit:
                break
            if fresh and idle:
                idle.pop(0).close()  # make room: the oldest idle connection goes
                continue
            # At the limit: wait for a connection to come back or to close.
            waiter = loop.create_future()
            self._waiting.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()
                raise PoolTimeout(
                    f"no connection to the backend became free within {self.read_timeout:g} s"
                ) from None
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the turn on to the next in line
                raise
        self._count += 1
        try:
            return await self._connect(loop), False
        except BaseException:
            self._count -= 1
            self._wake_one()
            raise

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Connection:
        origin = self.origin
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    self._new_connection,
                    origin.host,
                    origin.port,
                    ssl=self._ssl,
                    server_hostname=origin.host if self._ssl else None,
                )
        except TimeoutError:
            raise ConnectTimeout(f"no connection within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise ConnectFailed(exc) from None
        return connection

    def _new_connection(self) -> Connection:
        return Connection(
            self._on_idle,
            self._on_close,
            max_head_bytes=self.max_head_bytes,
            max_headers=self.max_headers,
            write_timeout=self.read_timeout,
        )

    def _on_idle(self, connection: Connection) -> None:
        if self._closed or self.keepalive <= 0:
            connection.close()
            return
        loop_time = connection.idle_since
        idle = self._idle
        # The oldest idle connection is at the bottom: drop it once it is past keep-alive.
        if idle and idle[0].idle_since < loop_time - self.keepalive:
            idle.pop(0).close()
        idle.append(connection)
        self._wake_one()

    def _on_close(self) -> None:
        self._count -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        waiting = self._waiting
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
