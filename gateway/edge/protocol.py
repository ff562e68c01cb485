"""The client side of the wire: uvicorn's httptools protocol with limits and deadlines.

uvicorn's protocol reads a request head of any size and waits for a slow client for ever.
This subclass adds what nginx has (``large_client_header_buffers``,
``client_header_timeout``, ``client_body_timeout``) and Envoy's header count:

- a request head larger than ``max_header_bytes`` or with more than ``max_headers`` lines
  gets 431 and the connection is closed, before any of it reaches the app: memory stays
  at the limit plus a read or two (a head pipelined behind another request is counted
  from the read after the one it began in), whoever sends it, with a key or without;
- a connection has ``header_timeout`` seconds from its first byte (or from being opened)
  to finish a request head, then 408 and closed;
- a request body may go ``body_timeout`` seconds without a byte while the app waits for
  it, and must be whole ``body_deadline`` seconds after its head, however steadily it
  trickles; then 408 if no answer has started, else the connection is closed. Time the
  app holds reading back (flow control) is not the client's for the first; it is for the
  second. The rest of a body the answer did not wait for (a refusal) has ``body_timeout``
  seconds in all from the answer's end;
- an answer the client does not take: once the socket's send buffer is full, a client
  that takes no byte of it for ``write_timeout`` seconds is cut (nginx's
  ``send_timeout``); the app sees a disconnect, so the backend request is closed and its
  replica's slot freed;
- a request that is not HTTP/1.1 the parser accepts (a bad request line, a control byte
  in a header, two framings) gets 400 ``invalid_request`` in the gateway's envelope, and
  the connection is closed;
- a refusal of a pipelined request waits for the answers to the requests before it, which
  go out whole (uvicorn writes its own 400 over them);
- a refused connection is closed as nginx's lingering close does: the refusal goes out
  with a FIN and what the client still sends is read and dropped, up to ``LINGER_BYTES``
  and ``LINGER_SECONDS``, before the socket is closed. Closed at once with bytes unread,
  the kernel would answer with a reset, which can reach a client still sending before it
  has read its 408 or 431 (and makes it report a reset instead);
- an app is told when its client goes before the answer is complete, at once and without
  a task of its own waiting on ``receive()``: the scope's ``gateway.disconnect`` extension
  holds (as ``watch``) the request's ``Watch``, a ``DisconnectWatch`` to register a
  callback with (not the cycle itself, which holds the scope: the two would make a
  reference cycle that only the garbage collector frees).

The common request, whose head and body come in one read, arms no timer at all. The
request head is read by this module's own code and the answer's head written by
``gateway.edge.cycle``'s rather than through uvicorn's, with the same checks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.core.alarm import Alarm
from gateway.core.errors import GatewayError, InvalidRequest, RequestHeadTooLarge, RequestTimeout
from gateway.edge.cycle import DISCONNECT, Cycle, Signal, Watch

logger = logging.getLogger("gateway.protocol")

NOT_HTTP = (
    "the request is not valid HTTP/1.1: check the request line, the header names and values, "
    "and that the body is framed by one Content-Length or by chunked encoding"
)

UPGRADE_REFUSED = InvalidRequest(
    "the gateway does not switch protocols: send the request without Upgrade (and Connection: upgrade)",
    code="upgrade_unsupported",
)
# Where a connection is in its current request.
IDLE, HEAD, BODY = 0, 1, 2
# What a refused connection reads and drops, at most, before it is closed.
LINGER_BYTES = 1 << 20
LINGER_SECONDS = 2.0


class _HeadRefused(Exception):
    """Raised in a parser callback to stop reading a head past a limit."""


@dataclass(frozen=True, slots=True)
class ClientLimits:
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout: float = 60.0
    body_timeout: float = 60.0
    body_deadline: float = 300.0
    write_timeout: float = 60.0


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, limits: ClientLimits = ClientLimits(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_header_bytes = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.header_timeout = limits.header_timeout
        self.body_timeout = limits.body_timeout
        self.body_deadline = limits.body_deadline
        self.write_timeout = limits.write_timeout
        self._write_timer: asyncio.TimerHandle | None = None
        self._unsent = 0
        """Bytes waiting in the send buffer when the client was last seen taking some."""
        self._taken_at = 0.0
        self._phase = IDLE
        self._head_started = 0.0
        self._head_bytes = 0
        self._header_count = 0
        self._head_bytes_exact = 0
        self._last_body = 0.0
        self._body_due = 0.0
        """When the body being read must be whole."""
        self._timer: asyncio.TimerHandle | None = None
        self._refused: GatewayError | None = None
        self._deferred: GatewayError | None = None
        self._watches: list[Cycle] = []
        """One per request whose answer is not complete yet (a pipelined one waits its turn)."""
        self._linger_left: int | None = None
        """Bytes a refused connection may still read and drop (None: not refused)."""

    @classmethod
    def with_limits(cls, limits: ClientLimits) -> Callable[..., LimitedHttpToolsProtocol]:
        """The protocol factory to hand uvicorn (``Config(http=...)``); it pickles for workers."""
        return functools.partial(cls, limits=limits)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn's keep-alive timeout, on an alarm moved by each answer, not a timer made
        # and cancelled for each.
        self._keep_alive = Alarm(self.loop, self.timeout_keep_alive_handler)
        # A connection that never sends a byte is held no longer than a slow head would be.
        self._head_started = self.loop.time()
        self._timer = self.loop.call_at(self._head_started + self.header_timeout, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._cancel_write_timer()
        super().connection_lost(exc)
        self._keep_alive.close()
        watches, self._watches = self._watches, []
        for watch in watches:
            watch.lost()

    def shutdown(self) -> None:
        if self._linger_left is not None:
            self._end_linger()  # a refused connection holds no answer: the server need not wait
            return
        super().shutdown()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._unsent = self.transport.get_write_buffer_size()
        self._taken_at = self.loop.time()
        self._cancel_write_timer()
        self._write_timer = self.loop.call_later(self._write_check_every(), self._check_writing)

    def resume_writing(self) -> None:
        self._cancel_write_timer()
        super().resume_writing()

    def _write_check_every(self) -> float:
        return max(min(self.write_timeout / 4, 1.0), 0.01)

    def _check_writing(self) -> None:
        """While the app waits for the send buffer to drain: is the client taking bytes?"""
        self._write_timer = None
        transport = self.transport
        if transport is None or transport.is_closing() or not self.flow.write_paused:
            return
        now = self.loop.time()
        unsent = transport.get_write_buffer_size()
        if unsent < self._unsent:
            self._unsent, self._taken_at = unsent, now
        elif now - self._taken_at >= self.write_timeout:
            logger.info(
                "closing a client connection: it took no byte of its answer for %g s", self.write_timeout
            )
            # Not close(): that would wait for the buffer to drain, which is what never happens.
            transport.abort()
            return
        self._write_timer = self.loop.call_later(self._write_check_every(), self._check_writing)

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def data_received(self, data: bytes) -> None:
        if self._deferred is not None:
            return  # a refusal waits for the answers before it; nothing more is read
        if self._linger_left is not None:
            self._linger_left -= len(data)  # refused: dropped
            if self._linger_left < 0:
                self._end_linger()
            return
        phase = self._phase
        if phase == IDLE:
            self._start_head()
        if self._phase == HEAD:
            self._head_bytes += len(data)
        # A limit met in a parser callback raises; uvicorn turns the parser's error into
        # send_400_response, which answers with the refusal instead.
        super().data_received(data)
        if self.transport.is_closing() or self._deferred is not None or self._linger_left is not None:
            return
        phase = self._phase
        if phase == HEAD:
            if self._head_bytes > self.max_header_bytes:
                self._reject(self._head_too_large())
            elif self._timer is None:
                self._timer = self.loop.call_at(self._head_started + self.header_timeout, self._check)
        elif phase == BODY:
            self._last_body = self.loop.time()
            if self._timer is None:
                self._timer = self.loop.call_at(self._last_body + self.body_timeout, self._check)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own answer is plain text, and written even over an answer under way.
        refused, self._refused = self._refused, None
        self._reject(refused or InvalidRequest(NOT_HTTP, code="invalid_http"))

    def on_response_complete(self) -> None:
        deferred = self._deferred
        if deferred is not None and not self.pipeline:
            # The last answer before a refused request is out: now the refusal.
            self._deferred = None
            self.server_state.total_requests += 1
            self._refuse(deferred)
            return
        # uvicorn's, but for the keep-alive timeout.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if self._phase == BODY:
            # Answered before its body was read: the rest is read and dropped, within a
            # body timeout in all, not one between bytes.
            self._body_due = min(self._body_due, self.loop.time() + self.body_timeout)
            if self._timer is None:
                self._timer = self.loop.call_at(self._body_due, self._check)
        self.flow.resume_reading()
        if self.pipeline:
            self._keep_alive.clear()
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._keep_alive.set(self.loop.time() + self.timeout_keep_alive)

    def _unset_keepalive_if_required(self) -> None:
        # Bytes came, or the connection went: uvicorn's keep-alive timeout is off.
        self._keep_alive.clear()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._phase != HEAD:
            # A pipelined request begun in the read that ended the previous one.
            self._start_head()
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.max_header_bytes:
            self._refused = self._head_too_large()
            raise _HeadRefused(self._refused.message)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_bytes_exact += len(name) + len(value) + 4
        if self._header_count > self.max_headers:
            self._refused = RequestHeadTooLarge(
                f"the request has more than {self.max_headers} headers", code="too_many_headers"
            )
            raise _HeadRefused(self._refused.message)
        if self._head_bytes_exact > self.max_header_bytes:
            self._refused = self._head_too_large()
            raise _HeadRefused(self._refused.message)
        name = name.lower()
        # llhttp keeps a value's trailing whitespace, which is not part of it (RFC 9110 5.5).
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade() and not self._should_upgrade() and _declares_body(self.headers):
            # llhttp ends an Upgrade request (h2c, websocket) at its head and never reads its
            # body, which the backend would wait for. Without a body it is answered.
            self._refused = UPGRADE_REFUSED
            raise _HeadRefused(UPGRADE_REFUSED.message)
        self._phase = BODY
        self._last_body = self.loop.time()
        self._body_due = self._last_body + self.body_deadline
        self._cancel_timer()
        parser = self.parser
        scope = self.scope
        http_version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        url = httptools.parse_url(self.url)
        raw_path = url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root = self.root_path
        scope["path"] = root + path
        scope["raw_path"] = root.encode("ascii") + raw_path if root else raw_path
        scope["query_string"] = url.query or b""
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        else:
            app = self.app
        previous = self.cycle
        cycle = self.cycle = Cycle(
            scope,
            self.transport,
            self.flow,
            self.logger,
            self.access_logger,
            self.access_log,
            self.server_state.default_headers,
            Signal(),  # type: ignore[arg-type]  # uvicorn's message_event, as it uses it
            self.expect_100_continue,
            http_version != "1.0" and parser.should_keep_alive(),  # keep_alive
            self.on_response_complete,
        )
        watches = self._watches
        while watches and watches[0].response_complete:
            del watches[0]  # answers complete in the order their requests came
        watches.append(cycle)
        watch = cycle.watch = Watch()
        scope["extensions"] = {DISCONNECT: {"watch": watch}}
        if previous is None or previous.response_complete:
            self._start_asgi_task(cycle, app)
        else:
            # A pipelined request waits for the answers before it.
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))

    def on_message_complete(self) -> None:
        self._phase = IDLE
        self._cancel_timer()
        super().on_message_complete()

    # internals

    def _start_head(self) -> None:
        self._phase = HEAD
        self._head_started = self.loop.time()
        self._head_bytes = 0
        self._head_bytes_exact = 0
        self._header_count = 0
        self._refused = None

    def _head_too_large(self) -> GatewayError:
        return RequestHeadTooLarge(
            f"the request head is larger than {self.max_header_bytes} bytes", code="headers_too_large"
        )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        now = self.loop.time()
        phase = self._phase
        if phase == IDLE:
            if self.cycle is None:  # opened, and not a byte since
                expiry = self._head_started + self.header_timeout
                if now >= expiry:
                    self.transport.close()
                else:
                    self._timer = self.loop.call_at(expiry, self._check)
            return
        if phase == HEAD:
            expiry = self._head_started + self.header_timeout
            if now >= expiry:
                self._reject(
                    RequestTimeout(f"the request head did not come within {self.header_timeout:g} s")
                )
                return
        else:
            if self.flow.read_paused:
                self._last_body = now  # the app is not reading: the client is not late
            expiry = min(self._last_body + self.body_timeout, self._body_due)
            if now >= expiry:
                if now >= self._body_due:
                    message = f"the request body did not come whole within {self.body_deadline:g} s"
                else:
                    message = f"the request body stopped for {self.body_timeout:g} s"
                self._refuse(RequestTimeout(message, code="body_timeout"))
                return
        self._timer = self.loop.call_at(expiry, self._check)

    def _reject(self, error: GatewayError) -> None:
        """Refuse the request being read: at once, or after the answers to the requests before it.

        A pipelining client gets those answers whole, then the refusal, then the close.
        """
        bad = self.cycle if self._phase == BODY else None
        if bad is not None and self.pipeline and self.pipeline[0][0] is bad:
            self.pipeline.popleft()  # it never runs; the requests before it are answered first
            waiting = True
        elif bad is None:
            waiting = self.cycle is not None and not self.cycle.response_complete
        else:
            waiting = False  # the bad request is the one being answered
        if waiting:
            self._deferred = error
            self._cancel_timer()
            self.transport.pause_reading()
            return
        self._refuse(error)

    def _refuse(self, error: GatewayError) -> None:
        """Answer ``error`` if this request has no answer under way, and close the connection."""
        self._cancel_timer()
        cycle = self.cycle
        if self._phase == HEAD:
            # The request being read has no cycle yet; the one before it may still be answering.
            free = cycle is None or cycle.response_complete
        else:
            free = cycle is not None and not cycle.response_started
        if cycle is not None and not cycle.response_complete:
            # The app sees a disconnect and its answer goes nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
        if free and not self.transport.is_closing():
            body = error.body()
            head = [b"HTTP/1.1 %d %s\r\n" % (error.status, HTTPStatus(error.status).phrase.encode())]
            head += [b"%s: %s\r\n" % header for header in error.response_headers()]
            head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
            self.transport.write(b"".join(head) + body)
        logger.info("closing a client connection: %s", error.message)
        self._linger()

    def _linger(self) -> None:
        """Close a refused connection once the client had the time to read its refusal."""
        transport = self.transport
        if transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        self._keep_alive.clear()
        self._linger_left = LINGER_BYTES
        transport.write_eof()  # the refusal, then a FIN; a FIN back closes the transport
        transport.resume_reading()
        self._timer = self.loop.call_later(LINGER_SECONDS, self._end_linger)

    def _end_linger(self) -> None:
        self._cancel_timer()
        transport = self.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size():
            transport.abort()  # a client that reads nothing is not waited for
        else:
            transport.close()


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(
        name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0 \t"))
        for name, value in headers
    )
