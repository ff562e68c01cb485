"""A fake OpenAI-compatible runtime for routing tests: its own name and models, and knobs to
make it slow, failing or loading. Runs in the tests' loop thread or as its own process
(``python -m tests.support.fleet_fakes --port P --name N --models a,b``), so that it can be killed.

Every answer says which runtime gave it (``"backend"`` in the JSON, ``x-runtime`` header)
and which model it was asked for, so a test can tell where a request went and what the
gateway forwarded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from typing import Any

from aiohttp import web


class FleetRuntime:
    def __init__(self, name: str, models: list[str], delay: float = 0.0) -> None:
        self.name = name
        self.models = models
        self.delay = delay
        """Seconds before each answer's status line."""
        self.status = 200
        """Status of completions and embeddings (a 503, a 429, a 400...)."""
        self.loading = False
        self.chunks = 5
        self.chunk_delay = 0.0
        self.die_after_chunks: int | None = None
        """Cut the connection after this many stream chunks (a crash mid-stream)."""
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.metrics_text = ""
        """What ``/metrics`` answers (Prometheus text)."""
        self.metrics_delay = 0.0
        """Seconds ``/metrics`` takes to answer (a slow or hung metrics route)."""
        self.metrics_open = 0
        self.metrics_open_most = 0
        """The most ``/metrics`` requests ever open at once."""
        self.metrics_peers: list[object] = []
        """The client address of each ``/metrics`` request (a new one: a new connection)."""
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/v1/models", self.list_models)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/embeddings", self.chat)
        self.app.router.add_post("/v1/audio/transcriptions", self.upload)

    def count(self, path: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if path is None or r["path"] == path)

    async def health(self, request: web.Request) -> web.Response:
        if self.loading:
            return web.json_response({"error": "loading"}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        self.metrics_open += 1
        assert request.transport is not None
        self.metrics_peers.append(request.transport.get_extra_info("peername"))
        self.metrics_open_most = max(self.metrics_open_most, self.metrics_open)
        try:
            if self.metrics_delay:
                await asyncio.sleep(self.metrics_delay)
            return web.Response(text=self.metrics_text, content_type="text/plain")
        finally:
            self.metrics_open -= 1

    async def list_models(self, request: web.Request) -> web.Response:
        if self.loading:
            return web.json_response({"error": {"message": "Loading model", "code": 503}}, status=503)
        data = [{"id": m, "object": "model", "created": 1, "owned_by": self.name} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def upload(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self.lock:
            self.requests.append({"path": request.path, "model": None, "size": len(body)})
        return web.json_response({"backend": self.name, "text": "ok"}, headers={"x-runtime": self.name})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        with self.lock:
            self.requests.append(
                {
                    "path": request.path,
                    "model": body.get("model"),
                    "session": request.headers.get("x-session-id"),
                }
            )
        if self.delay:
            await asyncio.sleep(self.delay)
        headers = {"x-runtime": self.name}
        if self.status != 200:
            if self.status == 429:
                headers["retry-after"] = "7"
            error = {
                "error": {"message": f"{self.name} says {self.status}", "type": "x", "code": self.status}
            }
            return web.json_response(error, status=self.status, headers=headers)
        if body.get("stream"):
            response = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
            await response.prepare(request)
            for i in range(self.chunks):
                if self.die_after_chunks is not None and i >= self.die_after_chunks:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                chunk = {"backend": self.name, "model": body.get("model"), "i": i}
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        answer = {
            "id": "c1",
            "object": "chat.completion",
            "backend": self.name,
            "model": body.get("model"),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
            ],
        }
        return web.json_response(answer, headers=headers)


async def start_runtime(
    runtime: FleetRuntime, port: int = 0, host: str = "127.0.0.1"
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(runtime.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    server = site._server
    assert server is not None
    return runner, server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--models", default="m")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    runtime = FleetRuntime(args.name, args.models.split(","), args.delay)
    web.run_app(runtime.app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
