"""A fake OpenAI-compatible backend on a real socket, and a thread to run servers in.

The fake's behaviour is picked by the request's ``model`` (or the path): ``echo`` answers
with what it received, ``slow`` waits before answering, ``stall`` and ``die`` break a
stream after two chunks, ``error-400`` and ``error-500`` answer OpenAI-shaped errors.
What the fake observed (a cancelled handler, a closed stream) is recorded in ``seen``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web

MODELS: dict[str, Any] = {
    "object": "list",
    "data": [
        {"id": "fake-model", "object": "model", "created": 1700000000, "owned_by": "fake"},
        {"id": "org/name-7b", "object": "model", "created": 1700000000, "owned_by": "fake"},
    ],
}


def chat_completion(model: str, content: str = "Hello there!") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def chat_chunk(model: str, i: int, content: str, finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class Seen:
    """What the fake backend observed, readable from any thread."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.stream_closed = threading.Event()
        self.requests: list[dict[str, Any]] = []
        self.received_chunks: list[tuple[float, int]] = []
        self.upload_started = threading.Event()


class FakeBackend:
    def __init__(self) -> None:
        self.seen = Seen()
        self.app = web.Application(client_max_size=1024**3)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/v1/models/{model:.+}", self.model)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/secret/admin", self.health)
        self.health_status = 200
        self.models_status = 200

    async def transcriptions(self, request: web.Request) -> web.Response:
        """Reads the upload as it arrives, recording each piece."""
        size = 0
        head = b""
        tail = b""
        async for chunk in request.content.iter_any():
            self.seen.received_chunks.append((time.monotonic(), len(chunk)))
            self.seen.upload_started.set()
            if len(head) < 512:
                head += chunk[: 512 - len(head)]
            tail = (tail + chunk)[-512:]
            size += len(chunk)
        self._record(request, head)
        boundary = (
            request.content_type == "multipart/form-data"
            and request.headers["Content-Type"].split("boundary=")[1]
        )
        complete = bool(boundary) and tail.rstrip().endswith(f"--{boundary}--".encode())
        return web.json_response(
            {
                "text": "hello from the fake",
                "bytes": size,
                "complete": complete,
                "chunked": "Content-Length" not in request.headers,
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, status=self.health_status)

    async def models(self, request: web.Request) -> web.Response:
        self._record(request, b"")
        if request.query.get("fail") == "401":
            return web.Response(status=401)
        if self.models_status != 200:
            return _error(self.models_status, "engine is not healthy", "internal_error")
        return web.json_response(MODELS, headers={"Set-Cookie": "session=backend-secret"})

    async def model(self, request: web.Request) -> web.Response:
        self._record(request, b"")
        model_id = request.match_info["model"]
        for entry in MODELS["data"]:
            if entry["id"] == model_id:
                return web.json_response(entry)
        return _error(404, f"model {model_id!r} not found", "not_found_error")

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.read()
        self._record(request, body)
        data = json.loads(body)
        inputs = data["input"] if isinstance(data["input"], list) else [data["input"]]
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                    for i in range(len(inputs))
                ],
                "model": data["model"],
                "usage": {"prompt_tokens": 2, "total_tokens": 2},
            }
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self._record(request, body)
        data = json.loads(body)
        model = data.get("model", "fake-model")
        if data.get("stream"):
            response = await self._sse_start(request)
            for word in ["Once", " upon", " a", " time"]:
                chunk = {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": 1,
                    "model": model,
                    "choices": [{"index": 0, "text": word, "finish_reason": None}],
                }
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        return web.json_response(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1,
                "model": model,
                "choices": [
                    {"index": 0, "text": "Once upon a time", "finish_reason": "stop", "logprobs": None}
                ],
                "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6},
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self._record(request, body)
        data = json.loads(body)
        model = data.get("model", "fake-model")
        try:
            if model == "echo":
                return web.json_response(
                    {
                        "method": request.method,
                        "path": request.raw_path,
                        "headers": [[k, v] for k, v in request.headers.items()],
                        "body": body.decode(),
                    }
                )
            if model == "error-400":
                return _error(400, "This model's maximum context length is 8 tokens", "invalid_request_error")
            if model == "error-500":
                return _error(500, "engine crashed", "internal_error")
            if model == "hop-headers":
                return web.json_response(
                    chat_completion(model),
                    headers={
                        "Connection": "X-Backend-Hop",
                        "X-Backend-Hop": "1",
                        "Keep-Alive": "timeout=5",
                        "X-Backend-Kept": "1",
                    },
                )
            if model == "gzip":
                payload = gzip.compress(json.dumps(chat_completion(model)).encode())
                return web.Response(
                    body=payload, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
                )
            if model == "slow":
                await asyncio.sleep(float(request.headers.get("x-fake-delay", "30")))
                return web.json_response(chat_completion(model))
            if model == "die-json":
                response = web.StreamResponse(
                    headers={"Content-Type": "application/json", "Content-Length": "500"}
                )
                await response.prepare(request)
                await response.write(b'{"id": "chatcmpl-1", "object": ')
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.close()
                return response
            if data.get("stream"):
                return await self._stream(request, model, data)
            return web.json_response(chat_completion(model))
        except asyncio.CancelledError:
            self.seen.cancelled.set()
            raise

    async def _sse_start(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        return response

    async def _stream(self, request: web.Request, model: str, data: dict[str, Any]) -> web.StreamResponse:
        response = await self._sse_start(request)
        words = ["Hello", " there", ",", " friend", "!"]
        delay = float(request.headers.get("x-fake-delay", "0"))
        try:
            if model in {"stall", "die", "endless"}:
                for i in range(2):
                    await response.write(chat_chunk(model, i, words[i]))
                if model == "stall":
                    await asyncio.sleep(3600)
                if model == "die":
                    await asyncio.sleep(0.05)
                    assert request.transport is not None
                    request.transport.close()
                    return response
                i = 2
                while True:
                    await asyncio.sleep(0.05)
                    await response.write(chat_chunk(model, i, " more"))
                    i += 1
            for i, word in enumerate(words):
                if delay:
                    await asyncio.sleep(delay)
                # The last chunk says why the generation ended, as runtimes' do.
                await response.write(chat_chunk(model, i, word, "stop" if i == len(words) - 1 else None))
            if (data.get("stream_options") or {}).get("include_usage"):
                usage = {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "created": 1700000000,
                    "model": model,
                    "choices": [],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
                }
                await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.seen.stream_closed.set()
            raise
        return response

    def _record(self, request: web.Request, body: bytes) -> None:
        if request.headers.get("User-Agent", "").startswith("inference-gateway/"):
            return  # the gateway's own model-list and readiness requests
        self.seen.requests.append(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": dict(request.headers),
                "body": body,
            }
        )


def _error(status: int, message: str, type_: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": type_, "param": None, "code": None}}, status=status
    )


class LoopThread:
    """An event loop in a thread, for servers the (often synchronous) tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
        return self.run(_call(fn), timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def _call(fn: Callable[[], Awaitable[Any]]) -> Any:
    return await fn()


async def start_fake(backend: FakeBackend, port: int = 0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(backend.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server = site._server
    assert server is not None
    sockets = server.sockets  # type: ignore[attr-defined]
    return runner, sockets[0].getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
