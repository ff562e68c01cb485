"""App-level checks through httpx's ASGI transport (no sockets needed for these)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import MutableMapping
from typing import Any

import httpx

from adapters.base import Adapter, Route
from gateway.app import create_app
from gateway.config.settings import Settings
from gateway.fleet.backend import Backend
from tests.conftest import Fake

Message = MutableMapping[str, Any]


async def test_route_the_backend_lacks_is_501_without_calling_it(fake: Fake) -> None:
    settings = Settings(backend_url=fake.url)
    narrow = Adapter(name="narrow", routes=frozenset({Route.MODELS, Route.CHAT_COMPLETIONS}))
    backend = dataclasses.replace(Backend.from_settings(settings), adapter=narrow)
    app = create_app(settings, backend)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            response = await client.post("/v1/embeddings", json={"model": "m", "input": "x"})
            assert response.status_code == 501
            assert response.headers["x-should-retry"] == "false"
            error = response.json()["error"]
            assert error["type"] == "unsupported"
            assert "narrow" in error["message"]
            assert "/v1/embeddings" in error["message"]
            assert (await client.get("/v1/models")).status_code == 200
    assert [r["path"] for r in fake.seen.requests] == ["/v1/models"]


async def test_under_another_server_a_client_that_goes_cancels_the_backend_request(fake: Fake) -> None:
    # No gateway.disconnect extension in the scope (not the gateway's own server): the
    # proxy waits on receive() for the disconnect instead.
    app = create_app(Settings(backend_url=fake.url))
    body = b'{"model": "slow"}'
    gone = asyncio.Event()
    asked: list[str] = []
    sent: list[Message] = []

    async def receive() -> Message:
        if not asked:
            asked.append("body")
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000), "state": {},
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip
    async with app.router.lifespan_context(app):
        answering = asyncio.ensure_future(app(scope, receive, send))
        for _ in range(100):  # the backend has the request
            if fake.seen.requests:
                break
            await asyncio.sleep(0.02)
        gone.set()
        await asyncio.wait_for(answering, 5)
        for _ in range(100):
            if fake.seen.cancelled.is_set():
                break
            await asyncio.sleep(0.02)
    assert fake.seen.cancelled.is_set()
    assert sent == []  # nothing was answered to a client that had gone
