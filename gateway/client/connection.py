"""One HTTP/1.1 connection to the backend, parsed by httptools (llhttp).

The connection is an ``asyncio.Protocol`` whose body chunks go straight to the response
without a stream object in between; it carries one request at a time and tells its pool
through two callbacks when it can carry another (``on_idle``) and when it is gone
(``on_close``). Where it is in an exchange is one ``State``.
"""

from __future__ import annotations

import asyncio
import enum
import select
from collections.abc import AsyncIterable, Callable
from typing import cast

import httptools

from gateway.client.errors import BadResponse, Disconnected, ReadTimeout
from gateway.client.models import Body
from gateway.client.response import Response
from gateway.core.alarm import Alarm


class State(enum.Enum):
    IDLE = ("idle", False)
    """No request on it: a byte from the backend now is a fault."""
    WAITING = ("waiting", True)
    """A request went out; no response head is being read (or an interim answer ended)."""
    HEAD = ("head", True)
    """A response's status line came; its headers are arriving."""
    BODY = ("body", True)
    """The final head is in; the body is arriving."""
    HEAD_ONLY = ("head only", False)
    """The answer to a HEAD request is whole with its head; the parser's end of message
    may still come, and nothing else may."""
    ENDED = ("ended", False)
    """The request's one response is complete: any further byte is a fault."""
    CLOSED = ("closed", False)

    def __init__(self, label: str, reading: bool) -> None:
        self.label = label
        self.reading = reading
        """Whether a byte from the backend is expected now (else it belongs to nobody)."""


def _nothing() -> None:
    """An alarm's callback before a response takes it."""


class _Poisoned(Exception):
    """Raised inside a parser callback: bytes past the end of the one expected message."""


class _Refused(Exception):
    """Raised inside a parser callback: a response head the gateway does not accept."""


class Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one request at a time.

    Exactly one response is accepted per request. A byte past its end, in the same read
    or a later one, poisons the connection: it is closed and never reused, and the bytes
    reach nobody. Trailers are parsed and dropped, never taken for headers.
    """

    def __init__(
        self,
        on_idle: Callable[[Connection], None],
        on_close: Callable[[], None],
        *,
        max_head_bytes: int,
        max_headers: int,
        write_timeout: float,
    ) -> None:
        self.on_idle = on_idle
        self.on_close = on_close
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.write_timeout = write_timeout
        """Seconds an upload may wait for the backend to read any of it."""
        self.state = State.IDLE
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        """Made when the connection is: it holds this object's methods, a cycle that the
        connection's end breaks, so that a closed connection is freed at once and never
        waits for a full collection."""
        self.response: Response | None = None
        self.alarm: Alarm | None = None
        self.idle_since = 0.0
        self._write_ready: asyncio.Future[None] | None = None
        self._fd = -1
        self._head_bytes = 0
        """Bytes read before the final head was complete: bounds the parser's buffering."""
        self._head_size = 0
        self._headers = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the methods without being asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.parser = httptools.HttpResponseParser(self)
        self.alarm = Alarm(asyncio.get_running_loop(), _nothing)
        """The deadline of the response under way, kept from one to the next."""
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1

    def data_received(self, data: bytes) -> None:
        response = self.response
        parser = self.parser
        if response is None or not self.state.reading or parser is None:
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
        if head and not response._head and self._head_bytes > self.max_head_bytes:
            limit = self.max_head_bytes
            response.fail(BadResponse(f"the backend's response head is larger than {limit} bytes"))
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.on_close()
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)  # an upload waiting on it sees the close
        response = self.response
        if response is not None:
            response.connection_lost()
        if self.alarm is not None:
            self.alarm.close()  # its timer would hold the connection until it went off
        self.parser = None
        self.transport = None

    def pause_writing(self) -> None:
        if self._write_ready is None or self._write_ready.done():
            self._write_ready = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)

    # httptools callbacks: an exception raised here stops the parser in its tracks. They
    # run only inside data_received, on a connection that is not closed.

    def on_message_begin(self) -> None:
        if self.state is not State.WAITING:
            raise _Poisoned
        self.state = State.HEAD

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state is not State.HEAD:
            return  # a trailer: dropped
        self._headers += 1
        self._head_size += len(name) + len(value) + 4
        if self._headers > self.max_headers:
            raise _Refused(f"the backend's response has more than {self.max_headers} headers")
        if self._head_size > self.max_head_bytes:
            raise _Refused(f"the backend's response head is larger than {self.max_head_bytes} bytes")
        response = self.response
        assert response is not None
        response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
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
            self.state = State.HEAD_ONLY
        elif response._head:
            self.state = State.BODY
        else:
            self.state = State.WAITING  # an interim (1xx) answer; its body is empty

    def on_body(self, body: bytes) -> None:
        if self.state is not State.BODY:
            raise _Poisoned
        response = self.response
        assert response is not None
        response.feed(body)

    def on_message_complete(self) -> None:
        state = self.state
        if state is State.HEAD_ONLY:
            self.state = State.ENDED
            return
        if state is State.BODY:
            self.state = State.ENDED
            response = self.response
            assert response is not None
            assert self.parser is not None
            response.message_complete(self.parser.should_keep_alive())
        elif state is not State.WAITING:
            raise _Poisoned
        # else: the end of an interim (1xx) answer; the final one follows.

    # used by the pool

    def send(self, response: Response, head: bytes, chunked: bool, body: Body) -> None:
        if self.transport is None or self.is_closed():
            raise Disconnected("the connection to the backend is closed")
        self.response = response
        self.state = State.WAITING
        self._head_bytes = self._head_size = self._headers = 0
        try:
            if isinstance(body, bytes):
                if len(body) < 65536:
                    self.transport.write(head + body)  # one segment for the usual small request
                else:
                    self.transport.writelines((head, body))
            else:
                self.transport.write(head)
        except (OSError, RuntimeError) as exc:  # a transport closed under the write
            self.close()
            raise Disconnected(f"the request could not be written: {exc}") from None
        if body is not None and not isinstance(body, bytes):
            response.upload = asyncio.ensure_future(self._upload(response, body, chunked))

    async def _upload(self, response: Response, body: AsyncIterable[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        loop = response.loop
        started = loop.time()
        try:
            async for chunk in body:
                if self.state is State.CLOSED:
                    return
                if not chunk:
                    continue  # an empty chunk would end a chunked body
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._write_ready is not None and not self._write_ready.done():
                    try:
                        async with asyncio.timeout(self.write_timeout):
                            await self._write_ready
                    except TimeoutError:
                        response.fail(
                            ReadTimeout(f"the backend read none of the request for {self.write_timeout:g} s")
                        )
                        self.close()
                        return
            if chunked and self.state is not State.CLOSED:
                transport.write(b"0\r\n\r\n")
        except Exception:
            # The client's side failed (gone, or too large): the request cannot be finished.
            response.fail(Disconnected("the request body could not be sent"))
            self.close()
        finally:
            response.upload_done(loop.time() - started)

    def is_closed(self) -> bool:
        return self.state is State.CLOSED or self.transport is None or self.transport.is_closing()

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
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.on_close()

    # used by the response

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def finished(self, response: Response, reusable: bool) -> None:
        """``response`` is done with this connection: back to the pool, or closed."""
        if self.response is not response:
            if not reusable:
                self.close()
            return
        self.response = None
        if reusable and not self.is_closed():
            self.state = State.IDLE
            self.idle_since = response.loop.time()
            self.on_idle(self)
        else:
            self.close()
