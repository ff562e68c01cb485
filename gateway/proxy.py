"""Request in, bytes out: the one hot path.

Each forwarded route is a ``ProxyEndpoint``, a raw ASGI app mounted by the router. It
authenticates, reads the body (whole and checked for JSON routes, streamed for uploads),
sends the request to the backend through the pooled session and relays the answer chunk
by chunk. Everything that can go wrong before the backend's status line becomes an error
envelope; after it, a stream that breaks gets a final SSE error event and any other body
is cut off, never ended cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any
from urllib.parse import quote

import orjson

from adapters import normalise
from adapters.base import CHAT_COMPLETIONS, COMPLETIONS, MODEL, MODELS, RESPONSES
from gateway.accesslog import AccessLog
from gateway.auth import Authenticator
from gateway.backend import Backend
from gateway.body import ClientGone, StreamedBody, check_declared_length, read_json_object
from gateway.client import Response
from gateway.errors import (
    BackendError,
    GatewayError,
    NotFound,
    Unsupported,
    sse_error_event,
)
from gateway.exchange import Exchange
from gateway.headers import RequestHeaders, response_headers, split_request_headers, valid_request_id
from gateway.metrics import Metrics
from gateway.ratelimit import KeyLimits, Limiter, estimate_tokens, requested_max_tokens
from gateway.routes import Body, RouteSpec
from gateway.settings import Settings
from gateway.upstream import UPSTREAM_ERRORS, Upstream, before_response_error, mid_stream_error
from gateway.usage import TAIL_BYTES, tokens_in

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger("gateway.proxy")

JSON_HEADERS = [(b"content-type", b"application/json")]
MAX_MODEL_NAME = 256
CLIENT_DISCONNECT = "client_disconnect"
MID_STREAM = "mid_stream"
# Routes whose answers are generated, so a token reservation counts their max_tokens.
GENERATING = frozenset({CHAT_COMPLETIONS, COMPLETIONS, RESPONSES})


class ProxyEndpoint:
    def __init__(
        self,
        route: RouteSpec,
        backend: Backend,
        upstream: Upstream,
        auth: Authenticator,
        settings: Settings,
        metrics: Metrics,
        access_log: AccessLog | None,
        limiter: Limiter | None = None,
        key_limits: Mapping[str, KeyLimits] | None = None,
    ) -> None:
        self.route = route
        self.backend = backend
        self.upstream = upstream
        self.auth = auth
        self.settings = settings
        self.metrics = metrics
        self.access_log = access_log
        self.limiter = limiter
        self.key_limits = key_limits or {}
        self.default_limits = self.key_limits.get("", KeyLimits((), ()))
        self.default_max_tokens = settings.default_max_tokens
        # A route without parameters, asked without a query, always goes to the same path.
        self.fixed_target = None if "{" in route.path else backend.path_for(route.name, route.path)
        self.max_body = settings.max_body_bytes
        self.idle_timeout = settings.stream_idle_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = split_request_headers(scope["headers"])
        request_id = valid_request_id(headers.request_id)
        exchange = Exchange(request_id.decode(), self.route.name, scope["method"], self.backend.name)
        self.metrics.started(exchange)
        try:
            exchange.headers_out.append((b"x-request-id", request_id))
            await self._handle(scope, receive, send, headers, exchange)
        finally:
            exchange.duration = time.perf_counter() - exchange.start
            if exchange.reservation is not None and self.limiter is not None:
                await self.limiter.settle(exchange.reservation, exchange.tokens_used())
            if exchange.error == CLIENT_DISCONNECT and not exchange.status:
                exchange.status = 499  # nginx's "client closed request"
            self.metrics.finished(exchange)
            if self.access_log is not None:
                self.access_log.write(exchange)

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: RequestHeaders,
        exchange: Exchange,
    ) -> None:
        backend = self.backend
        adapter = backend.adapter
        route = self.route

        body: bytes | StreamedBody | None = None
        try:
            path: str = scope["path"]
            if "/." in path and _has_dot_segment(path):
                raise NotFound(f"no route {path}")
            key = self.auth.authenticate(headers.authorization, headers.x_api_key)
            exchange.key = key.name if key is not None else None
            limiter = self.limiter
            if limiter is not None:
                client = scope.get("client")
                identity = key.name if key is not None else f"ip:{client[0] if client else '-'}"
                limits = self.key_limits.get(key.name if key is not None else "", self.default_limits)
                exchange.headers_out += await limiter.admit(identity, limits, exchange.key or "anonymous")
            if route.name == MODEL:
                exchange.model = scope["path_params"]["model"][:MAX_MODEL_NAME]
            if not adapter.serves(route.name) and not (route.name == MODEL and adapter.normalise):
                raise Unsupported(
                    f"{route.path} is not served by the {adapter.name} backend", code="unsupported_route"
                )
            if route.body is Body.JSON:
                check_declared_length(headers.content_length, self.max_body)
                body, parsed = await read_json_object(receive, self.max_body)
                model = parsed.get("model")
                if isinstance(model, str):
                    exchange.model = model[:MAX_MODEL_NAME]
                if limiter is not None and limits.tokens:
                    generated = self.default_max_tokens if route.name in GENERATING else 0
                    wanted = estimate_tokens(len(body), requested_max_tokens(parsed, generated))
                    reservation, held = await limiter.reserve(
                        identity, limits, wanted, exchange.key or "anonymous"
                    )
                    exchange.reservation = reservation
                    exchange.headers_out += held
            elif route.body is Body.STREAM:
                check_declared_length(headers.content_length, self.max_body)
                body = StreamedBody(receive, self.max_body)
        except GatewayError as exc:
            await send_error(send, exc, exchange)
            return
        except ClientGone:
            exchange.error = CLIENT_DISCONNECT
            return

        forward = headers.forward
        if isinstance(body, StreamedBody) and headers.content_length is not None:
            # A fixed-size upload stays fixed-size: some runtimes do not take chunked bodies.
            forward.append((b"content-length", headers.content_length))
        if backend.auth_header is not None:
            forward.append(backend.auth_header)
        forward.append((b"x-request-id", exchange.request_id.encode()))
        client = scope.get("client")
        if client:
            chain = headers.forwarded_for
            peer = client[0].encode("latin-1")
            forward.append((b"x-forwarded-for", chain + b", " + peer if chain else peer))
        elif headers.forwarded_for:
            forward.append((b"x-forwarded-for", headers.forwarded_for))

        task = asyncio.current_task()
        assert task is not None
        # An uploaded body is still being received: its reader notices a disconnect itself.
        watcher = (
            None
            if isinstance(body, StreamedBody)
            else asyncio.ensure_future(_cancel_on_disconnect(receive, task))
        )
        try:
            if not adapter.serves(route.name):
                await self._model_from_list(exchange, forward, send)
                return
            query = scope.get("query_string", b"")
            if self.fixed_target is not None and not query and scope["path"] == route.path:
                target = self.fixed_target
            else:
                target = backend.path_for(
                    route.name, scope.get("raw_path", b"").decode("latin-1") or quote(scope["path"])
                )
                if query:
                    target += "?" + query.decode("latin-1")
            await self._forward(scope["method"], target, forward, body, send, exchange)
        except asyncio.CancelledError:
            if watcher is not None and watcher.done() and not watcher.cancelled() and task.uncancel() == 0:
                exchange.error = CLIENT_DISCONNECT
                return
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _forward(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | StreamedBody | None,
        send: Send,
        exchange: Exchange,
    ) -> None:
        waited = time.perf_counter()
        try:
            response = await self.upstream.pool.request(method, target, headers, body)
        except UPSTREAM_ERRORS as exc:
            exchange.upstream_wait += time.perf_counter() - waited
            if isinstance(body, StreamedBody) and body.failure is not None:
                if isinstance(body.failure, ClientGone):
                    exchange.error = CLIENT_DISCONNECT
                    return
                error: GatewayError = body.failure
            else:
                error = before_response_error(exc, self.settings)
                logger.warning("backend request failed (request %s): %s", exchange.request_id, error.message)
            await send_error(send, error, exchange)
            return
        exchange.upstream_wait += time.perf_counter() - waited

        complete = False
        try:
            returned, streaming = response_headers(
                response.status, response.raw_headers, exchange.headers_out
            )
            exchange.status = response.status
            if self.backend.adapter.normalise and not streaming and self._reshapes(response):
                complete = await self._send_reshaped(response, returned, send, exchange)
            else:
                await send({"type": "http.response.start", "status": response.status, "headers": returned})
                if streaming:
                    exchange.stream = True
                    self.metrics.stream_opened(exchange)
                complete = await self._relay(response, send, streaming, exchange)
        finally:
            if complete:
                response.release()
            else:
                response.close()

    def _reshapes(self, response: Response) -> bool:
        if response.header(b"content-encoding") is not None:
            return False
        return response.status >= 400 or (self.route.name == MODELS and response.status == 200)

    async def _send_reshaped(
        self,
        response: Response,
        headers: list[tuple[bytes, bytes]],
        send: Send,
        exchange: Exchange,
    ) -> bool:
        """Send an error or a model list in the OpenAI shape, if it is small enough to read."""
        status = response.status
        waited = time.perf_counter()
        head, whole = await response.read_up_to(self.upstream.pool.max_read_bytes)
        exchange.upstream_wait += time.perf_counter() - waited
        exchange.ttfb = time.perf_counter() - exchange.start
        if whole:
            if status >= 400:
                reshaped = normalise.error_body(status, head)
            else:
                reshaped = normalise.model_list(head, self.backend.name)
            if reshaped is not None:
                headers = [h for h in headers if h[0] not in {b"content-type", b"content-length"}]
                headers += [*JSON_HEADERS, (b"content-length", str(len(reshaped)).encode())]
                head = reshaped
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": head, "more_body": not whole})
        if whole:
            return True
        return await self._relay(response, send, False, exchange)

    async def _model_from_list(
        self,
        exchange: Exchange,
        headers: list[tuple[bytes, bytes]],
        send: Send,
    ) -> None:
        """``GET /v1/models/{id}`` for a runtime without that route: the entry from its list."""
        backend = self.backend
        waited = time.perf_counter()
        try:
            status, body = await self.upstream.pool.fetch(
                "GET", "/v1/models", headers, self.settings.backend_timeout
            )
        except UPSTREAM_ERRORS as exc:
            await send_error(send, before_response_error(exc, self.settings), exchange)
            return
        finally:
            exchange.upstream_wait += time.perf_counter() - waited
        exchange.status = status
        if status != 200:
            reshaped = normalise.error_body(status, body) or body
            await _send_json(send, status, reshaped, exchange)
            return
        entry = normalise.find_model(body, exchange.model or "", backend.name)
        if entry is None:
            error = NotFound(f"model {exchange.model!r} not found", code="model_not_found")
            await send_error(send, error, exchange)
            return
        await _send_json(send, 200, orjson.dumps(entry), exchange)

    async def _relay(self, response: Response, send: Send, streaming: bool, exchange: Exchange) -> bool:
        """Send the body on as it arrives; True when the backend finished it."""
        response.set_read_timeout(self.idle_timeout)
        clock = time.perf_counter
        previous = last = b""
        waiting = 0.0
        done = False
        try:
            while not done:
                waited = clock()
                chunk = await response.read()
                waiting += clock() - waited
                if not chunk:
                    break
                if exchange.ttfb is None:
                    exchange.ttfb = clock() - exchange.start
                previous, last = last, chunk
                done = response.at_eof()
                await send({"type": "http.response.body", "body": chunk, "more_body": not done})
        except UPSTREAM_ERRORS as exc:
            exchange.upstream_wait += waiting
            error = mid_stream_error(exc, self.settings)
            exchange.error = MID_STREAM
            logger.warning(
                "backend broke off a response (request %s): %s", exchange.request_id, error.message
            )
            if not streaming:
                # Returning without the final body message makes the server drop the
                # connection, so the client sees a cut, not a short body that looks whole.
                return False
            await send({"type": "http.response.body", "body": _final_event(error, last), "more_body": False})
            return False
        exchange.upstream_wait += waiting
        if not done:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        if 200 <= exchange.status < 300:
            tail = last if len(last) >= TAIL_BYTES else previous[-TAIL_BYTES:] + last
            exchange.prompt_tokens, exchange.completion_tokens = tokens_in(tail)
        return True


def _final_event(error: BackendError, last: bytes) -> bytes:
    event = sse_error_event(error)
    # Close an event the backend left half-sent, so that ours is read on its own.
    return event if last.endswith(b"\n\n") else b"\n\n" + event


def _has_dot_segment(path: str) -> bool:
    # A backend that normalises "/v1/models/../../admin" would serve a route never listed.
    return any(segment in {".", ".."} for segment in path.split("/"))


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return


async def _send_json(send: Send, status: int, body: bytes, exchange: Exchange) -> None:
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *exchange.headers_out]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, error: GatewayError, exchange: Exchange) -> None:
    exchange.status = error.status
    exchange.error = error.type
    body = error.body()
    headers = error.response_headers()
    headers.append((b"content-length", str(len(body)).encode()))
    headers.extend(exchange.headers_out)
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
