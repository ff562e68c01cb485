"""Reading a client's request body: whole and checked for JSON routes, streamed for uploads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from gateway.errors import GatewayError, InvalidRequest, RequestTooLarge

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


def check_declared_length(content_length: bytes | None, limit: int) -> None:
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise InvalidRequest("Content-Length is not a number") from None
    if declared > limit:
        raise too_large(limit)


async def read_json_object(receive: Receive, limit: int) -> tuple[bytes, dict[str, Any]]:
    """The body bytes as received, and the object they hold."""
    body = await read_body(receive, limit)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    return body, parsed


async def read_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise too_large(limit)
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class StreamedBody:
    """A request body passed on chunk by chunk as the client sends it.

    If the client goes away or sends too much, iteration stops with an error that the
    upstream request surfaces as a connection failure; ``failure`` says what really happened.
    """

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.failure: GatewayError | ClientGone | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.failure = ClientGone()
                raise self.failure
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                self.failure = too_large(self.limit)
                raise self.failure
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"request body is larger than {limit} bytes", code="request_too_large")
