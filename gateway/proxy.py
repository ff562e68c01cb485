"""Request in, bytes out: the one hot path.

Each forwarded route is a ``ProxyEndpoint``, a raw ASGI app mounted by the router. It
authenticates, reads and checks a JSON body, sends the request to the backend through the
pooled session and relays the answer chunk by chunk. Everything that can go wrong before
the backend's status line becomes an error envelope; after it, a stream that breaks gets
a final SSE error event and any other body is cut off, never ended cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import orjson
from yarl import URL

from gateway.auth import Authenticator
from gateway.backend import Backend
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    RequestTooLarge,
    Unsupported,
    sse_error_event,
)
from gateway.routes import RouteSpec
from gateway.settings import Settings
from gateway.upstream import UPSTREAM_ERRORS, Upstream, before_response_error, mid_stream_error

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger("gateway.proxy")

# RFC 9110 7.6.1, plus Proxy-Connection which some clients still send.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers the gateway consumes or sets itself. Expect is answered by the server in
# front; the backend gets the whole body at once.
NOT_FORWARDED = HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"x-api-key",
    b"content-length",
    b"x-request-id",
    b"x-forwarded-for",
    b"expect",
}
NOT_RETURNED = HOP_BY_HOP | {b"x-request-id"}

SSE = b"text/event-stream"
# Tell nginx-style proxies in front of the gateway not to buffer a stream either.
SSE_HEADERS = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))
SSE_HEADER_NAMES = frozenset(name for name, _ in SSE_HEADERS)
REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


class ProxyEndpoint:
    def __init__(
        self,
        route: RouteSpec,
        backend: Backend,
        upstream: Upstream,
        auth: Authenticator,
        settings: Settings,
    ) -> None:
        self.route = route
        self.backend = backend
        self.upstream = upstream
        self.auth = auth
        self.settings = settings
        self.max_body = settings.max_body_bytes
        self.idle_timeout = settings.stream_idle_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id: bytes | None = None
        authorization = x_api_key = content_length = forwarded_for = None
        connection_tokens: list[bytes] = []
        forwarded: list[tuple[str, str]] = []
        for name, value in scope["headers"]:
            if name in NOT_FORWARDED:
                if name == b"authorization":
                    authorization = value
                elif name == b"x-api-key":
                    x_api_key = value
                elif name == b"x-request-id":
                    request_id = value
                elif name == b"content-length":
                    content_length = value
                elif name == b"x-forwarded-for":
                    forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
                elif name == b"connection":
                    connection_tokens.extend(value.split(b","))
                continue
            forwarded.append((name.decode("latin-1"), value.decode("latin-1")))
        if connection_tokens:
            drop = _connection_listed(connection_tokens)
            forwarded = [(k, v) for k, v in forwarded if k.encode("latin-1") not in drop]
        request_id = _valid_request_id(request_id)
        request_id_header = (b"x-request-id", request_id)

        try:
            path: str = scope["path"]
            if "/." in path and _has_dot_segment(path):
                raise NotFound(f"no route {path}")
            self.auth.authenticate(authorization, x_api_key)
            adapter = self.backend.adapter
            if not adapter.serves(self.route.name):
                raise Unsupported(
                    f"{self.route.path} is not served by the {adapter.name} backend",
                    code="unsupported_route",
                )
            body = b""
            if self.route.json_body:
                body = await self._read_json_body(receive, content_length)
        except GatewayError as exc:
            await send_error(send, exc, request_id_header)
            return
        except ClientGone:
            return

        if self.backend.auth_header is not None:
            forwarded.append(self.backend.auth_header)
        forwarded.append(("x-request-id", request_id.decode("latin-1")))
        client = scope.get("client")
        if client:
            peer = client[0]
            chain = f"{forwarded_for.decode('latin-1')}, {peer}" if forwarded_for else peer
            forwarded.append(("x-forwarded-for", chain))
        elif forwarded_for:
            forwarded.append(("x-forwarded-for", forwarded_for.decode("latin-1")))

        query = scope.get("query_string", b"")
        path = self.backend.path_for(
            self.route.name, scope.get("raw_path", b"").decode("latin-1") or scope["path"]
        )
        target = self.backend.url + path
        if query:
            target += "?" + query.decode("latin-1")
        url = URL(target, encoded=True)

        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, task))
        try:
            await self._forward(scope["method"], url, forwarded, body, send, request_id_header)
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled() and task.uncancel() == 0:
                logger.info("client disconnected", extra={"request_id": request_id.decode("latin-1")})
                return
            raise
        finally:
            watcher.cancel()

    async def _read_json_body(self, receive: Receive, content_length: bytes | None) -> bytes:
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                raise InvalidRequest("Content-Length is not a number") from None
            if declared > self.max_body:
                raise _too_large(self.max_body)
        body = await _read_body(receive, self.max_body)
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(parsed, dict):
            raise InvalidRequest("request body must be a JSON object", code="invalid_json")
        return body

    async def _forward(
        self,
        method: str,
        url: URL,
        headers: list[tuple[str, str]],
        body: bytes,
        send: Send,
        request_id_header: tuple[bytes, bytes],
    ) -> None:
        settings = self.settings
        try:
            response = await self.upstream.session.request(
                method, url, headers=headers, data=body or None, allow_redirects=False
            )
        except UPSTREAM_ERRORS as exc:
            error = before_response_error(exc, settings)
            logger.warning("backend request failed: %s", error.message)
            await send_error(send, error, request_id_header)
            return

        complete = False
        try:
            response_headers = [request_id_header]
            streaming = False
            connection_tokens: list[bytes] = []
            for name, value in response.raw_headers:
                name = name.lower()
                if name in NOT_RETURNED:
                    if name == b"connection":
                        connection_tokens.extend(value.split(b","))
                    continue
                if name == b"content-type" and value.startswith(SSE):
                    streaming = True
                response_headers.append((name, value))
            if connection_tokens:
                drop = _connection_listed(connection_tokens)
                response_headers = [h for h in response_headers if h[0] not in drop]
            if streaming:
                response_headers = [h for h in response_headers if h[0] not in SSE_HEADER_NAMES]
                response_headers.extend(SSE_HEADERS)
            await send(
                {"type": "http.response.start", "status": response.status, "headers": response_headers}
            )
            complete = await self._relay(response, send, streaming)
        finally:
            if complete:
                response.release()
            else:
                response.close()

    async def _relay(self, response: aiohttp.ClientResponse, send: Send, streaming: bool) -> bool:
        """Send the body on as it arrives; True when the backend finished it."""
        content = response.content
        if not content.is_eof() and response.connection is not None:
            protocol = response.connection.protocol
            if protocol is not None:
                protocol.read_timeout = self.idle_timeout
                protocol.start_timeout()
        last = b""
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                last = chunk
                done = content.at_eof()
                await send({"type": "http.response.body", "body": chunk, "more_body": not done})
                if done:
                    return True
        except UPSTREAM_ERRORS as exc:
            error = mid_stream_error(exc, self.settings)
            logger.warning("backend broke off a response: %s", error.message)
            if not streaming:
                # Returning without the final body message makes the server drop the
                # connection, so the client sees a cut, not a short body that looks whole.
                return False
            event = sse_error_event(error)
            if not last.endswith(b"\n\n"):
                event = b"\n\n" + event
            await send({"type": "http.response.body", "body": event, "more_body": False})
            return False
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True


async def _read_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _too_large(limit)
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
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _connection_listed(tokens: list[bytes]) -> set[bytes]:
    """Header names a Connection header declares hop-by-hop (RFC 9110 7.6.1)."""
    return {token.strip().lower() for token in tokens}


def _has_dot_segment(path: str) -> bool:
    # A backend that normalises "/v1/models/../../admin" would serve a route never listed.
    return any(segment in {".", ".."} for segment in path.split("/"))


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"request body is larger than {limit} bytes", code="request_too_large")


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return


def _valid_request_id(value: bytes | None) -> bytes:
    if value and REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex.encode()


async def send_error(send: Send, error: GatewayError, *extra: tuple[bytes, bytes]) -> None:
    body = error.body()
    headers = error.response_headers()
    headers.append((b"content-length", str(len(body)).encode()))
    headers.extend(extra)
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
