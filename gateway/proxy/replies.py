"""The answers the gateway writes itself, as ASGI messages: errors in the envelope, and
JSON bodies it made or rewrote."""

from __future__ import annotations

from adapters.base import ANTHROPIC_ROUTES
from gateway.core.asgi import Send
from gateway.core.errors import GatewayError, anthropic_envelope
from gateway.core.exchange import Exchange

JSON_HEADERS = [(b"content-type", b"application/json")]
# Headers of a backend's answer that no longer hold once the gateway rewrote its body.
REWRITTEN_HEADERS = frozenset({b"content-type", b"content-length", b"content-encoding"})


async def send_whole(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """An answer the gateway rewrote (reshaped, cut to a key's share, IDs sealed), whole, as JSON."""
    headers = [h for h in headers if h[0] not in REWRITTEN_HEADERS]
    headers += [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, body: bytes, exchange: Exchange) -> None:
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *exchange.headers_out]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, error: GatewayError, exchange: Exchange) -> None:
    exchange.status = error.status
    exchange.error = error.type
    body = (
        anthropic_envelope(error.status, error.message)
        if exchange.route in ANTHROPIC_ROUTES
        else error.body()
    )
    headers = error.response_headers()
    headers.append((b"content-length", str(len(body)).encode()))
    headers.extend(exchange.headers_out)
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
