"""``/metrics`` on a port of its own (``--metrics-port``), for a scraper on another network.

It serves that one path and nothing else (404), asks for the metrics token as the main
port does, and answers from the same once-a-second page. Every connection is handled on
one event loop of its own thread with a deadline for the request head, a cap on its size
and one request per connection, so slow or half-sent requests cost a socket each, never a
thread. At most ``MAX_CONNECTIONS`` wait for their heads: one more cuts the one that has
waited longest, so idle sockets never keep a scraper (which sends its head at once) out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from gateway.core.errors import GatewayError, NotFound
from gateway.observability.metrics import CONTENT_TYPE
from gateway.observability.page import DENIED, Page

logger = logging.getLogger("gateway.metrics")

HEAD_TIMEOUT = 5.0
MAX_HEAD = 8 * 1024
MAX_CONNECTIONS = 64


class MetricsPort:
    def __init__(self, page: Page, host: str, port: int) -> None:
        self.page = page
        self.host = host
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.open = 0
        self._started = threading.Event()
        self._server: asyncio.Server | None = None
        self._error: BaseException | None = None
        self._waiting: dict[asyncio.StreamWriter, None] = {}
        """Connections whose request head has not come, oldest first."""

    def start(self) -> None:
        """Listen (in a thread of its own); OSError when the port cannot be had."""
        thread = threading.Thread(target=self._run, name="metrics-port", daemon=True)
        thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._server = self.loop.run_until_complete(
                asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD)
            )
        except OSError as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    def stop(self) -> None:
        def close() -> None:
            if self._server is not None:
                self._server.close()
            self.loop.stop()

        self.loop.call_soon_threadsafe(close)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        waiting = self._waiting
        try:
            if len(waiting) >= MAX_CONNECTIONS:
                oldest = next(iter(waiting))
                del waiting[oldest]
                oldest.transport.abort()
            waiting[writer] = None
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                return
            finally:
                waiting.pop(writer, None)
            status, content_type, body = self._answer(head)
            writer.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                % (status, REASONS[status], content_type, len(body))
                + body
            )
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
        finally:
            self.open -= 1
            writer.close()

    def _answer(self, head: bytes) -> tuple[int, bytes, bytes]:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, b"text/plain", b"bad request\n"
        method, target = parts[0], parts[1]
        path = target.split(b"?", 1)[0]
        if path != b"/metrics":
            return 404, b"application/json", NotFound("this port serves only /metrics").body()
        if method not in {b"GET", b"HEAD"}:
            return 405, b"text/plain", b"method not allowed\n"
        authorization: bytes | None = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"authorization":
                if authorization is not None:
                    return 400, b"text/plain", b"several authorization headers\n"
                authorization = value.strip()
        if not self.page.allowed(authorization):
            return 401, b"application/json", DENIED.body()
        try:
            body = self.page.body()
        except (GatewayError, OSError, ValueError) as exc:
            logger.error("metrics could not be rendered: %s", exc)
            return 500, b"text/plain", b"metrics could not be rendered\n"
        return 200, CONTENT_TYPE.encode(), b"" if method == b"HEAD" else body


REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    500: b"Internal Server Error",
}
