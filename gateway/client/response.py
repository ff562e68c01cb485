"""A response as it arrives from the backend: status and headers, then the body chunk by chunk."""

from __future__ import annotations

import asyncio
from typing import Protocol

from gateway.client.errors import Disconnected, HeadTimeout, ReadTimeout, UpstreamError
from gateway.core.alarm import Alarm

# Buffered body bytes at which reading from the backend pauses until the client catches up.
HIGH_WATER = 256 * 1024


class Carrier(Protocol):
    """What a response needs of the connection that carries it."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...

    def finished(self, response: Response, reusable: bool) -> None: ...


class Response:
    """A response as it arrives: status and headers, then the body chunk by chunk."""

    def __init__(
        self,
        connection: Carrier,
        method: str,
        read_timeout: float,
        deadline: float,
        loop: asyncio.AbstractEventLoop | None = None,
        alarm: Alarm | None = None,
    ) -> None:
        self.connection: Carrier | None = connection
        self.loop = loop = loop or asyncio.get_running_loop()
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
        # The connection's, which its responses take in turn: its timer outlives each.
        self._alarm = alarm = alarm or Alarm(loop, self._check_timeout)
        alarm.callback = self._check_timeout
        alarm.clear()

    def upload_done(self, seconds: float) -> None:
        """The deadline for the status line counts from the end of the upload."""
        self.deadline += seconds
        if self._alarm.when is not None and not self._head:
            self._alarm.set(self._expiry(self.loop.time()))

    def set_read_timeout(self, seconds: float) -> None:
        self.read_timeout = seconds
        self._alarm.clear()  # the next wait sets it for the new timeout

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
                    if self.connection is not None:
                        self.connection.resume_reading()
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
        if self._buffered > HIGH_WATER and not self._paused and self.connection is not None:
            self._paused = True
            self.connection.pause_reading()
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
        if self._alarm.when is None:
            self._alarm.set(self._expiry(now))
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
            self._alarm.set(expiry)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _finish(self, reusable: bool) -> None:
        self._alarm.clear()
        upload = self.upload
        if upload is not None and not upload.done():
            upload.cancel()
            reusable = False
        connection = self.connection
        if connection is None:
            return
        self.connection = None
        connection.finished(self, reusable)
