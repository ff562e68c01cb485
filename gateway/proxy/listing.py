"""Model lists the gateway answers from the backends' own: ``GET /v1/models`` across
several backends, and ``GET /v1/models/{id}`` for a runtime without that route."""

from __future__ import annotations

import asyncio
import time

import orjson

from adapters import normalise
from adapters.base import Route
from gateway.client import UpstreamError
from gateway.config.settings import Settings
from gateway.core.asgi import Send
from gateway.core.errors import NotFound
from gateway.core.exchange import Exchange
from gateway.fleet.replicas import Group
from gateway.fleet.upstream import before_response_error
from gateway.proxy.replies import send_error, send_json
from gateway.routing.router import Router


async def model_from_list(
    router: Router,
    settings: Settings,
    group: Group,
    exchange: Exchange,
    headers: list[tuple[bytes, bytes]],
    send: Send,
) -> None:
    """``GET /v1/models/{id}`` for a runtime without that route: the entry from its list."""
    backend = group.backend
    exchange.backend = group.name
    replica = router.pick(group)
    assert replica is not None
    waited = time.perf_counter()
    try:
        status, body = await replica.upstream.fetch(
            "GET", "/v1/models", settings.backend_timeout, forward=headers
        )
    except UpstreamError as exc:
        await send_error(send, before_response_error(exc, settings), exchange)
        return
    finally:
        exchange.upstream_wait += time.perf_counter() - waited
    exchange.status = status
    exchange.headers_out.append((b"x-gateway-backend", group.name.encode()))
    if status != 200:
        await send_json(send, status, normalise.error_body(status, body), exchange)
        return
    wanted = group.backend_model(exchange.model or "")
    entry = normalise.find_model(body, wanted, backend.name)
    if entry is None:
        error = NotFound(f"model {exchange.model!r} not found", code="model_not_found")
        await send_error(send, error, exchange)
        return
    await send_json(send, 200, orjson.dumps({**entry, "id": exchange.model}), exchange)


async def send_model_list(router: Router, route: Route, send: Send, exchange: Exchange) -> None:
    """``GET /v1/models`` and ``/v1/models/{id}`` across several backends, from their lists:
    every model and alias, each once."""
    if any(group.models is None and group.listed_at is None for group in router.groups):
        await asyncio.gather(*(router.catalogue.refresh(g) for g in router.groups if g.listed_at is None))
    entries = router.catalogue.all_models()
    if exchange.restricted is not None:
        entries = [e for e in entries if exchange.restricted.may_use(str(e["id"]))]
    exchange.status = 200
    if route == Route.MODELS:
        await send_json(send, 200, orjson.dumps({"object": "list", "data": entries}), exchange)
        return
    entry = next((e for e in entries if e["id"] == exchange.model), None)
    if entry is None:
        error = NotFound(
            f"the model {exchange.model!r} does not exist", code="model_not_found", param="model"
        )
        await send_error(send, error, exchange)
        return
    await send_json(send, 200, orjson.dumps(entry), exchange)
