"""One request and its answer on a client's connection: uvicorn's request-response cycle
with the answer's head written by the gateway's own code, and the request's
``DisconnectWatch``.

The head is uvicorn's, with the same refusals: its header names and values are checked all
at once (``header_refusal``) rather than by two regular expressions for each header. An
answer of known length is held and written with its body's first bytes, so that a small
answer goes out in one write; a streamed answer's head goes at once. The cycle's ``Watch`` is
what the scope's ``gateway.disconnect`` extension holds: the app registers a callback with it
and is told once if the client goes before the answer is complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

# The scope extension that carries a request's DisconnectWatch (its cycle's Watch).
DISCONNECT = "gateway.disconnect"


class DisconnectWatch(Protocol):
    """What the ``gateway.disconnect`` extension holds: told once if the client goes before
    the answer is complete."""

    fired: bool
    """Whether the client went before the answer was complete."""

    def register(self, callback: Callable[[], object] | None) -> None:
        """What to call on a disconnect; None once the app no longer wants to know."""


class Watch:
    """A request's ``DisconnectWatch``, apart from its cycle: the scope that carries it must
    not hold the cycle that holds the scope, a reference cycle every request would leave to
    the garbage collector."""

    __slots__ = ("_callback", "fired")

    def __init__(self) -> None:
        self.fired = False
        self._callback: Callable[[], object] | None = None

    def register(self, callback: Callable[[], object] | None) -> None:
        self._callback = callback

    def fire(self) -> None:
        if self.fired:
            return
        self.fired = True
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


class Signal:
    """What uvicorn's cycle does with its ``message_event`` (set, clear, wait), without the
    asyncio.Event's waiter queue made for every request: a list only once something waits."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)  # cancelled before it was set
        return True


# The bytes uvicorn refuses in a response header's name (HEADER_RE) and value (HEADER_VALUE_RE).
NAME_FORBIDDEN = bytes(range(0x20)) + b'\x7f()<>@,;:[]={} \t\\"'
VALUE_FORBIDDEN = bytes(range(0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"


def header_refusal(names: bytes, values: bytes) -> str | None:
    """uvicorn's refusal of an answer's headers, given every name and every value joined: a
    byte one may not hold is in their concatenation as surely as in each. Deleting the
    forbidden bytes and comparing lengths costs a byte's copy where a regular expression
    tests every byte against a class."""
    if len(names.translate(None, NAME_FORBIDDEN)) != len(names):
        return "Invalid HTTP header name."
    if len(values.translate(None, VALUE_FORBIDDEN)) != len(values):
        return "Invalid HTTP header value."
    return None


# Response headers uvicorn reads for the framing and the connection's fate.
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))


class Cycle(RequestResponseCycle):
    """One request and its answer: uvicorn's cycle with a leaner head written, and the
    request's ``Watch``."""

    watch: Watch
    """Set by the protocol, which puts it in the scope too."""
    # Set on the instance once it changes: a cycle is made with uvicorn's own __init__.
    _held: bytes | None = None
    """The head of an answer of known length, written with its body's first bytes: one
    write (and one segment to the client) for the whole of a small answer, not two."""

    def lost(self) -> None:
        """The connection is gone: call back if the answer was not complete."""
        if not self.response_complete:
            self.watch.fire()

    async def send(self, message: ASGISendEvent) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        fields = cast(dict[str, Any], message)  # one of the send events, told apart by type
        kind = fields["type"]
        if not self.response_started:
            if kind != "http.response.start" or self.access_log:
                # uvicorn's refusal of a message out of turn, or its access log line.
                await super().send(message)
                return
            self._write_head(fields["status"], fields.get("headers", ()))
        elif kind == "http.response.body" and not self.response_complete:
            body: bytes = fields.get("body", b"")
            more_body: bool = fields.get("more_body", False)
            if self.scope["method"] == "HEAD":
                self.expected_content_length = 0
            elif self.chunked_encoding:
                if body:
                    self.transport.write(b"%x\r\n%s\r\n" % (len(body), body))
                if not more_body:
                    self.transport.write(b"0\r\n\r\n")
            else:
                if len(body) > self.expected_content_length:
                    raise RuntimeError("Response content longer than Content-Length")
                self.expected_content_length -= len(body)
                held = self._held
                if held is None:
                    self.transport.write(body)
                else:
                    self._held = None
                    if len(body) < 65536:
                        self.transport.write(held + body)
                    else:
                        self.transport.writelines((held, body))
            if not more_body:
                if self.expected_content_length != 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                self.response_complete = True
                self.message_event.set()
                if not self.keep_alive:
                    self.transport.close()
                self.on_response()
        else:
            await super().send(message)  # uvicorn's refusal of a message after the answer

    def _write_head(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """uvicorn's status line and headers, framing read from them as uvicorn reads it."""
        self.response_started = True
        self.waiting_for_100_continue = False
        if self.default_headers:
            headers = [*self.default_headers, *headers]
        content = [STATUS_LINE[status]]
        close = False
        for name, value in headers:
            name = name.lower()
            if name in _FRAMING:
                if name == b"content-length":
                    if self.chunked_encoding is None:
                        self.expected_content_length = int(value.decode())
                        self.chunked_encoding = False
                elif name == b"transfer-encoding":
                    if value.lower() == b"chunked":
                        self.expected_content_length = 0
                        self.chunked_encoding = True
                elif b"close" in [token.lower().strip() for token in value.split(b",")]:
                    self.keep_alive = False
                    close = True
            content += (name, b": ", value, b"\r\n")
        refusal = header_refusal(b"".join(content[1::4]), b"".join(content[3::4]))
        if refusal is not None:
            raise RuntimeError(refusal)
        if not self.keep_alive and not close:
            content.append(b"connection: close\r\n")
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in (204, 304):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        if self.chunked_encoding is False and self.expected_content_length and self.scope["method"] != "HEAD":
            self._held = b"".join(content)
        else:
            self.transport.write(b"".join(content))
