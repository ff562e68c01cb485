"""A fast fake backend for benchmarks: raw asyncio (uvloop when installed), keep-alive.

``POST /v1/chat/completions?chunks=N&interval_ms=T`` answers an SSE stream of N chunks, each
its own write, T milliseconds apart (0: as fast as the socket takes them), then
``data: [DONE]``. ``GET /v1/models`` lists one model, ``bench``. Any other path answers a
fixed chat completion JSON, after ``--delay-ms`` (a runtime's generation time; 0 by
default), at most ``--concurrency`` at once (a runtime's batch; the rest wait their turn).

    python -m bench.upstream --port 9100 [--delay-ms 10 --concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

JSON_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }
).encode()
JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(JSON_BODY)
    + JSON_BODY
)
MODELS_BODY = (
    b'{"object":"list","data":[{"id":"bench","object":"model","created":1700000000,"owned_by":"bench"}]}'
)
MODELS_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(MODELS_BODY)
    + MODELS_BODY
)
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENT = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench",'
    b'"choices":[{"index":0,"delta":{"content":"token"},"finish_reason":null}]}\n\n'
)
DONE = b"data: [DONE]\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Protocol(asyncio.Protocol):
    delay = 0.0
    concurrency = 0
    """With a delay: at most this many answers in the making at once, the rest queued (a
    runtime's batch); 0, no limit."""
    active = 0
    queue: ClassVar[collections.deque[Protocol]] = collections.deque()

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.streaming: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        target = head.split(" ", 2)[1]
        url = urlsplit(target)
        if url.path == "/v1/chat/completions" and url.query:
            query = parse_qs(url.query)
            chunks = int(query.get("chunks", ["100"])[0])
            interval = float(query.get("interval_ms", ["0"])[0]) / 1000
            self.busy = True
            self.streaming = asyncio.ensure_future(self._stream(chunks, interval))
        elif url.path == "/v1/models":
            assert self.transport is not None
            self.transport.write(MODELS_RESPONSE)
            if self.buffer:
                self._next()
        elif self.delay:
            self.busy = True
            Protocol.queue.append(self)
            Protocol.start_waiting()
        else:
            assert self.transport is not None
            self.transport.write(JSON_RESPONSE)
            if self.buffer:
                self._next()

    @classmethod
    def start_waiting(cls) -> None:
        loop = asyncio.get_running_loop()
        while cls.queue and (not cls.concurrency or cls.active < cls.concurrency):
            cls.active += 1
            loop.call_later(cls.delay, cls.queue.popleft()._answer_late)

    def _answer_late(self) -> None:
        Protocol.active -= 1
        Protocol.start_waiting()
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(JSON_RESPONSE)
        if self.buffer:
            self._next()

    async def _stream(self, chunks: int, interval: float) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.write(SSE_HEAD)
        for _ in range(chunks):
            if interval:
                await asyncio.sleep(interval)
            if transport.is_closing():
                return
            transport.write(_chunk(EVENT))
        transport.write(_chunk(DONE) + b"0\r\n\r\n")
        self.busy = False
        if self.buffer:
            self._next()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Protocol, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=0)
    args = parser.parse_args()
    Protocol.delay = args.delay_ms / 1000
    Protocol.concurrency = args.concurrency
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
