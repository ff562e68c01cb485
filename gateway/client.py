"""A small HTTP/1.1 client for the one backend: keep-alive connections and streamed bodies.

The gateway sends every request to the same origin and passes bodies on as they are, so
it needs little of a general client: no cookies, redirects, decompression, proxies or
header rewriting. What it needs is to be cheap per request and per chunk. Responses are
parsed by httptools (llhttp, the parser behind uvicorn and Node.js); each connection is
an ``asyncio.Protocol`` whose body chunks go straight to the reader without a stream
object in between. Measured against aiohttp's client in the same minimal proxy, this
takes a third of the CPU time per request (README, Performance).
"""

from __future__ import annotations

import asyncio
import collections
import re
import select
import ssl
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

# Buffered body bytes at which reading from the backend pauses until the client catches up.
HIGH_WATER = 256 * 1024
# What a request target must not hold; bytes above 0x7f pass as the client sent them.
BREAKS_REQUEST_LINE = re.compile(r"[\x00-\x20\x7f]")
# Methods whose requests carry a body: an empty one is sent with Content-Length: 0.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Requests that may be sent again when a reused connection fails before any answer byte
# (RFC 9110 9.2.2, and Go's net/http rule: an Idempotency-Key header makes any method so).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
IDEMPOTENCY_KEY = b"idempotency-key"
# Defaults for the backend's response head: Envoy's 60 KiB and 100 headers, rounded up.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
# Bodies the gateway reads whole for itself: probes, model lists, error bodies.
MAX_READ_BYTES = 1024 * 1024


class UpstreamError(Exception):
    """Anything that went wrong between the gateway and the backend."""


class ConnectFailed(UpstreamError):
    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error) or type(error).__name__)
        self.os_error = error


class ConnectTimeout(UpstreamError):
    """No connection within the connect timeout."""


class ReadTimeout(UpstreamError):
    """The backend sent nothing for the read timeout."""


class HeadTimeout(ReadTimeout):
    """The backend's final status line did not come before the request's deadline."""


class Disconnected(UpstreamError):
    """The backend closed the connection before the response was complete."""


class PoolTimeout(UpstreamError):
    """No connection to the backend became free before the request's deadline."""


class BadResponse(UpstreamError):
    """The backend's bytes are not an HTTP/1.x response, or not one the gateway accepts."""


class TooLarge(BadResponse):
    """A body the gateway reads whole for itself is larger than it accepts."""


class _Poisoned(Exception):
    """Raised inside a parser callback: bytes past the end of the one expected message."""


class _Refused(Exception):
    """Raised inside a parser callback: a response head the gateway does not accept."""


Body = bytes | AsyncIterable[bytes] | None


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: scheme, host, port and a path prefix taken from a base URL."""

    host: str
    port: int
    tls: bool
    prefix: str
    host_header: bytes

    @classmethod
    def from_url(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"backend URL must be http:// or https:// with a host: {url!r}")
        tls = parts.scheme == "https"
        default = 443 if tls else 80
        port = parts.port or default
        host = parts.hostname
        shown = host if host.isascii() else host.encode("idna").decode("ascii")
        shown = f"[{shown}]" if ":" in shown else shown
        host_header = shown if port == default else f"{shown}:{port}"
        return cls(host, port, tls, parts.path.rstrip("/"), host_header.encode("ascii"))


class Pool:
    """Keep-alive connections to one origin, most recently used first.

    Deadlines: ``connect_timeout`` bounds opening a connection; ``read_timeout`` bounds the
    wait for the final status line, counted from the call (so it covers the wait for a free
    connection) and stretched by the time spent uploading a streamed body; interim answers
    and bytes trickling in do not extend it. Once the head has arrived, the response's
    read timeout counts silence between chunks instead (``Response.set_read_timeout``).
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
        headers: list[tuple[bytes, bytes]],
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
        head, chunked = _head(method, self.origin, target, headers, body)
        retried = False
        while True:
            connection, reused = await self._acquire(loop, deadline, fresh=retried)
            response = Response(connection, method, self.read_timeout, deadline)
            sent = False
            try:
                connection.send(response, head, chunked, body)
                sent = True
                await response.wait_head()
            except Disconnected:
                response.close()
                # Nothing written yet is always safe to send elsewhere; written, only if
                # repeating it is harmless.
                safe = not sent or _repeatable(method, headers, body)
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
        headers: list[tuple[bytes, bytes]],
        seconds: float,
        body: bytes | None = None,
    ) -> tuple[int, bytes]:
        """A whole small answer, for the gateway's own calls (probes, model lists, model
        management on every replica).

        A body larger than ``max_read_bytes`` raises ``TooLarge`` after reading just past it.
        """
        limit = self.max_read_bytes
        async with asyncio.timeout(seconds):
            response = await self.request(method, target, headers, body)
            try:
                answer, whole = await response.read_up_to(limit)
            except BaseException:
                response.close()
                raise
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
                    lambda: Connection(self),
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

    def _put_back(self, connection: Connection) -> None:
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

    def _forget(self) -> None:
        self._count -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        waiting = self._waiting
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one request at a time.

    Exactly one response is accepted per request. A byte past its end, in the same read
    or a later one, poisons the connection: it is closed and never reused, and the bytes
    reach nobody. Trailers are parsed and dropped, never taken for headers.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        """Made when the connection is: it holds this object's methods, a cycle that the
        connection's end breaks, so that a closed connection is freed at once and never
        waits for a full collection."""
        self.response: Response | None = None
        self.idle_since = 0.0
        self._closed = False
        self._write_ready: asyncio.Future[None] | None = None
        self._fd = -1
        self._ended = False
        """The current request's one response is complete: any further byte is a fault."""
        self._head_only = False
        self._in_head = False
        self._head_bytes = 0
        """Bytes read before the final head was complete: bounds the parser's buffering."""
        self._head_size = 0
        self._headers = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the methods without being asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.parser = httptools.HttpResponseParser(self)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1

    def data_received(self, data: bytes) -> None:
        response = self.response
        parser = self.parser
        if response is None or self._ended or parser is None:
            # Bytes nobody asked for: this connection cannot be trusted with a request.
            self.close()
            return
        response.last_read = response.loop.time()
        response.received = True
        head = not response._head
        if head:
            self._head_bytes += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            response.fail(BadResponse("the backend switched protocols"))
            self.close()
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                response.fail(BadResponse(str(cause)))
            elif not isinstance(cause, _Poisoned):
                response.fail(BadResponse(f"the backend's response could not be parsed: {exc}"))
            self.close()
            return
        except httptools.HttpParserError as exc:
            response.fail(BadResponse(f"the backend's response could not be parsed: {exc}"))
            self.close()
            return
        if head and not response._head and self._head_bytes > self.pool.max_head_bytes:
            limit = self.pool.max_head_bytes
            response.fail(BadResponse(f"the backend's response head is larger than {limit} bytes"))
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._closed = True
            self.pool._forget()
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)  # an upload waiting on it sees the close
        response = self.response
        if response is not None:
            response.connection_lost()
        self.parser = None
        self.transport = None

    def pause_writing(self) -> None:
        if self._write_ready is None or self._write_ready.done():
            self._write_ready = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)

    # httptools callbacks: an exception raised here stops the parser in its tracks.

    def on_message_begin(self) -> None:
        if self._ended or self.response is None:
            raise _Poisoned
        self._in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer: dropped
        self._headers += 1
        self._head_size += len(name) + len(value) + 4
        if self._headers > self.pool.max_headers:
            raise _Refused(f"the backend's response has more than {self.pool.max_headers} headers")
        if self._head_size > self.pool.max_head_bytes:
            raise _Refused(f"the backend's response head is larger than {self.pool.max_head_bytes} bytes")
        response = self.response
        assert response is not None
        response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        response = self.response
        assert response is not None
        assert self.parser is not None
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:
            raise _Refused(f"the backend answered with status {status}, outside 100-599")
        response.head_complete(status)
        if response._complete:
            # A HEAD answer is whole with its head; httptools may still call the end of
            # the message, and anything else that follows is not ours.
            self._ended = self._head_only = True

    def on_body(self, body: bytes) -> None:
        if self._ended:
            raise _Poisoned
        response = self.response
        assert response is not None
        response.feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if self._head_only:
            self._head_only = False
            return
        if self._ended or response is None or self.parser is None:
            raise _Poisoned
        if response._head:
            self._ended = True
            response.message_complete(self.parser.should_keep_alive())
        # else: the end of an interim (1xx) answer; the final one follows.

    # used by Response and Pool

    def send(self, response: Response, head: bytes, chunked: bool, body: Body) -> None:
        if self.transport is None or self.is_closed():
            raise Disconnected("the connection to the backend is closed")
        self.response = response
        self._ended = self._head_only = False
        self._head_bytes = self._head_size = self._headers = 0
        if isinstance(body, bytes):
            if len(body) < 65536:
                self.transport.write(head + body)  # one segment for the usual small request
            else:
                self.transport.writelines((head, body))
        else:
            self.transport.write(head)
            if body is not None:
                response.upload = asyncio.ensure_future(self._upload(response, body, chunked))

    async def _upload(self, response: Response, body: AsyncIterable[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        loop = response.loop
        started = loop.time()
        try:
            async for chunk in body:
                if self._closed:
                    return
                if not chunk:
                    continue  # an empty chunk would end a chunked body
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._write_ready is not None and not self._write_ready.done():
                    try:
                        async with asyncio.timeout(self.pool.read_timeout):
                            await self._write_ready
                    except TimeoutError:
                        response.fail(
                            ReadTimeout(
                                f"the backend read none of the request for {self.pool.read_timeout:g} s"
                            )
                        )
                        self.close()
                        return
            if chunked and not self._closed:
                transport.write(b"0\r\n\r\n")
        except Exception:
            # The client's side failed (gone, or too large): the request cannot be finished.
            response.fail(Disconnected("the request body could not be sent"))
            self.close()
        finally:
            response.upload_done(loop.time() - started)

    def is_closed(self) -> bool:
        return self._closed or self.transport is None or self.transport.is_closing()

    def readable(self) -> bool:
        """Whether the socket holds input (an end of file, or bytes) the loop has not read yet."""
        if self._fd < 0:
            return False
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        if not self._closed:
            self._closed = True
            self.pool._forget()

    def finished(self, reusable: bool) -> None:
        """The response is done with this connection: back to the pool, or closed."""
        self.response = None
        if reusable and not self.is_closed():
            self.idle_since = asyncio.get_running_loop().time()
            self.pool._put_back(self)
        else:
            self.close()


class Response:
    """A response as it arrives: status and headers, then the body chunk by chunk."""

    def __init__(self, connection: Connection, method: str, read_timeout: float, deadline: float) -> None:
        self.connection: Connection | None = connection
        self.loop = asyncio.get_running_loop()
        self.method = method
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.read_timeout = read_timeout
        """Seconds the backend may stay silent between body chunks."""
        self.deadline = deadline
        """Loop time by which the final status line must have come (the upload stretches it)."""
        self.last_read = self.waiting_since = self.loop.time()
        self.received = False
        """Whether any byte came from the backend for this request."""
        self.upload: asyncio.Future[None] | None = None
        self._head = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._complete = False
        self._keep_alive = False
        self._until_close = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def upload_done(self, seconds: float) -> None:
        """The deadline for the status line counts from the end of the upload."""
        self.deadline += seconds
        if self._timer is not None and not self._head:
            self._timer.cancel()
            self._timer = self.loop.call_at(self._expiry(self.loop.time()), self._check_timeout)

    def set_read_timeout(self, seconds: float) -> None:
        self.read_timeout = seconds
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def header(self, name: bytes) -> bytes | None:
        """A header's value, by lower-case name."""
        for key, value in self.raw_headers:
            if key.lower() == name:
                return value
        return None

    async def wait_head(self) -> None:
        while not self._head:
            await self._wait()

    async def read(self) -> bytes:
        """The body bytes received since the last read; ``b""`` once the body is complete."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    connection = self.connection
                    if connection is not None and connection.transport is not None:
                        connection.transport.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()

    async def read_up_to(self, limit: int | None) -> tuple[bytes, bool]:
        """The body, or its first ``limit`` bytes and more, and whether that was all of it."""
        chunks: list[bytes] = []
        size = 0
        while limit is None or size <= limit:
            chunk = await self.read()
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks), False

    def at_eof(self) -> bool:
        return self._complete and not self._chunks

    def release(self) -> None:
        """Done with a complete response: its connection goes back to the pool."""
        self._finish(self._complete and self._keep_alive and self._error is None)

    def close(self) -> None:
        """Done early: the connection is closed, which tells the backend to stop."""
        self._finish(False)

    # called by the connection

    def head_complete(self, status: int) -> None:
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self.raw_headers = []
            return
        self.status = status
        self._head = True
        if self.method == "HEAD":
            # httptools cannot be told that a HEAD answer has no body: it would wait for
            # Content-Length bytes. The response is complete; the connection is not reused.
            self._complete = True
        elif status not in (204, 304):
            framed = False
            for name, value in self.raw_headers:
                lower = name.lower()
                if lower == b"content-length" or (
                    lower == b"transfer-encoding" and b"chunked" in value.lower()
                ):
                    framed = True
                    break
            self._until_close = not framed
        self._wake()

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused:
            connection = self.connection
            if connection is not None and connection.transport is not None:
                self._paused = True
                connection.transport.pause_reading()
        self._wake()

    def message_complete(self, keep_alive: bool) -> None:
        if not self._head:
            return  # the end of an interim answer
        self._complete = True
        self._keep_alive = keep_alive and self.method != "HEAD"
        self._wake()

    def connection_lost(self) -> None:
        if not self._complete and self._error is None:
            if self._head and self._until_close:
                self._complete = True  # a body delimited by the connection's end
            else:
                self._error = Disconnected(
                    "the backend closed the connection without answering"
                    if not self._head
                    else "the backend closed the connection before the response was complete"
                )
        self._wake()

    def fail(self, error: UpstreamError) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._wake()

    # internals

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        if self._complete:
            return
        waiter = self._waiter = self.loop.create_future()
        # Silence counts from the last byte or from the start of this wait, whichever is
        # later: time spent relaying to a slow client is not the backend's.
        self.waiting_since = now = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_at(self._expiry(now), self._check_timeout)
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _expiry(self, now: float) -> float:
        if not self._head:
            if self.upload is not None and not self.upload.done():
                return now + self.read_timeout  # the deadline waits for the upload's end
            return self.deadline
        return max(self.last_read, self.waiting_since) + self.read_timeout

    def _check_timeout(self) -> None:
        self._timer = None
        if self._waiter is None or self._complete or self._error is not None:
            return
        now = self.loop.time()
        expiry = self._expiry(now)
        if now >= expiry:
            if self._head:
                self._error = ReadTimeout(f"the backend sent nothing for {self.read_timeout:g} s")
            else:
                self._error = HeadTimeout("the backend's status line did not come in time")
            self._wake()
            if self.connection is not None:
                self.connection.close()
        else:
            self._timer = self.loop.call_at(expiry, self._check_timeout)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _finish(self, reusable: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        upload = self.upload
        if upload is not None and not upload.done():
            upload.cancel()
            reusable = False
        connection = self.connection
        if connection is None:
            return
        self.connection = None
        if connection.response is self:
            connection.finished(reusable)
        elif not reusable:
            connection.close()


def _repeatable(method: str, headers: list[tuple[bytes, bytes]], body: Body) -> bool:
    """Whether a request that got no answer may be sent again."""
    if not (body is None or isinstance(body, bytes)):
        return False  # a streamed body is gone once sent
    return method in IDEMPOTENT_METHODS or any(name.lower() == IDEMPOTENCY_KEY for name, _ in headers)


def _head(
    method: str, origin: Origin, target: str, headers: list[tuple[bytes, bytes]], body: Body
) -> tuple[bytes, bool]:
    """The request line and headers, and whether the body goes chunked."""
    start = f"{method} {origin.prefix}{target} HTTP/1.1\r\n".encode("latin-1")
    lines = [start, b"host: %s\r\n" % origin.host_header]
    has_length = False
    for name, value in headers:
        if name == b"content-length":
            has_length = True
        lines.append(b"%s: %s\r\n" % (name, value))
    chunked = False
    if isinstance(body, bytes):
        if not has_length:
            lines.append(b"content-length: %d\r\n" % len(body))
    elif body is None:
        if method in BODY_METHODS and not has_length:
            lines.append(b"content-length: 0\r\n")
    elif not has_length:
        chunked = True
        lines.append(b"transfer-encoding: chunked\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), chunked
