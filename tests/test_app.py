"""App-level checks through httpx's ASGI transport (no sockets needed for these)."""

from __future__ import annotations

import dataclasses

import httpx

from adapters.base import CHAT_COMPLETIONS, MODELS, Adapter
from gateway.app import create_app
from gateway.backend import Backend
from gateway.settings import Settings
from tests.conftest import Fake


async def test_route_the_backend_lacks_is_501_without_calling_it(fake: Fake) -> None:
    settings = Settings(backend_url=fake.url)
    narrow = Adapter(name="narrow", routes=frozenset({MODELS, CHAT_COMPLETIONS}))
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
