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
import zlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any
from urllib.parse import quote

import orjson

from adapters import normalise
from adapters.base import (
    ANTHROPIC_ROUTES,
    BATCH_CREATE,
    CHAT_COMPLETIONS,
    COMPLETIONS,
    FILE_CONTENT,
    MANAGEMENT_ROUTES,
    MESSAGES,
    MODEL,
    MODELS,
    RESPONSES,
)
from gateway import management, ownership, reserve
from gateway.accesslog import AccessLog
from gateway.auth import Authenticator
from gateway.balancing import affinity_key
from gateway.body import ClientGone, StreamedBody, check_declared_length, read_json_object
from gateway.client import PoolTimeout, Response
from gateway.errors import (
    BackendBadResponse,
    BackendError,
    BackendUnavailable,
    GatewayError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Unsupported,
    anthropic_envelope,
    sse_error_event,
)
from gateway.exchange import Exchange
from gateway.headers import (
    RequestHeaders,
    TrustedProxies,
    response_headers,
    split_request_headers,
    valid_request_id,
)
from gateway.metrics import Metrics
from gateway.ownership import Owners, StreamSealer
from gateway.ratelimit import KeyLimits, Limiter
from gateway.replicas import AFFINITY, Group, Replica
from gateway.routes import Body, RouteSpec
from gateway.routing import Router
from gateway.settings import Settings
from gateway.upstream import UPSTREAM_ERRORS, before_response_error, mid_stream_error
from gateway.usage import TAIL_BYTES, prompt_tokens_at_start, tokens_in

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger("gateway.proxy")

JSON_HEADERS = [(b"content-type", b"application/json")]
REWRITTEN_HEADERS = frozenset({b"content-type", b"content-length", b"content-encoding"})
MAX_MODEL_NAME = 256
CLIENT_DISCONNECT = "client_disconnect"
MID_STREAM = "mid_stream"
# Routes whose answers are generated, so a token reservation counts their max_tokens.
GENERATING = frozenset({CHAT_COMPLETIONS, COMPLETIONS, RESPONSES, MESSAGES})
# Routes that name no model: a key that may use only some models uses them freely.
MODEL_FREE = (frozenset(ownership.ROUTE_KINDS) - {RESPONSES, BATCH_CREATE}) | {MODELS, MODEL}
# Answers after which a request goes to another replica, if one is left and the budget allows.
FAILOVER_STATUSES = frozenset({429, 502, 503, 504})
Rewriter = Callable[[Response, Group, list[tuple[bytes, bytes]], Send, Exchange], Awaitable[bool]]


class ProxyEndpoint:
    def __init__(
        self,
        route: RouteSpec,
        router: Router,
        auth: Authenticator,
        settings: Settings,
        metrics: Metrics,
        access_log: AccessLog | None,
        limiter: Limiter | None = None,
        key_limits: Mapping[str, KeyLimits] | None = None,
        owners: Owners | None = None,
    ) -> None:
        self.route = route
        self.router = router
        self.auth = auth
        self.settings = settings
        self.metrics = metrics
        self.access_log = access_log
        self.limiter = limiter
        self.key_limits = key_limits or {}
        self.default_limits = self.key_limits.get("", KeyLimits((), ()))
        self.default_max_tokens = settings.default_max_tokens
        # A route without parameters, asked without a query, always goes to the same path
        # on a kind of runtime.
        self.fixed_targets: dict[str, str | None] = {}
        self.max_body = settings.max_body_bytes
        self.max_read_bytes = settings.backend_max_read_bytes
        self.idle_timeout = settings.stream_idle_timeout
        self.trusted = TrustedProxies(settings.trust_forwarded)
        self.owners = owners if route.name in ownership.ROUTE_KINDS else None
        """Set on the routes of files, batches and stored responses when several keys share
        the gateway: their IDs are sealed to their owner."""
        self.management = route.name in MANAGEMENT_ROUTES
        """Model management: sent to a backend named in the body, else by model, else the
        default one; the body is put in the runtime's own shape."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = split_request_headers(scope["headers"])
        request_id = valid_request_id(headers.request_id)
        exchange = Exchange(request_id.decode(), self.route.name, scope["method"], self.router.default.name)
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
        router = self.router
        route = self.route

        body: bytes | StreamedBody | None = None
        parsed: dict[str, Any] | None = None
        try:
            path: str = scope["path"]
            if "/." in path and _has_dot_segment(path):
                raise NotFound(f"no route {path}")
            if headers.repeated is not None:
                raise InvalidRequest(
                    f"several {headers.repeated.decode()} headers: send one", code="duplicate_header"
                )
            key = self.auth.authenticate(headers.authorization, headers.x_api_key)
            exchange.key = key.name if key is not None else None
            limiter = self.limiter
            if limiter is not None:
                client = scope.get("client")
                identity = key.name if key is not None else f"ip:{client[0] if client else '-'}"
                limits = self.key_limits.get(key.name if key is not None else "", self.default_limits)
                exchange.headers_out += await limiter.admit(identity, limits, exchange.key or "anonymous")
            if key is not None and key.models is not None:
                exchange.restricted = key
            if route.name == MODEL:
                exchange.model = scope["path_params"]["model"][:MAX_MODEL_NAME]
                _check_allowed(exchange, scope["path_params"]["model"])
            if router.single:
                self._check_served(router.default)
            elif route.name in {MODELS, MODEL}:
                await self._send_model_list(send, exchange)
                return
            if route.body is Body.JSON:
                check_declared_length(headers.content_length, self.max_body)
                body, parsed = await read_json_object(receive, self.max_body)
                model = parsed.get("model")
                if isinstance(model, str):
                    exchange.model = model[:MAX_MODEL_NAME]
                if exchange.restricted is not None and route.name not in MODEL_FREE:
                    _check_allowed(exchange, model)
                for name in route.required:
                    if not isinstance(parsed.get(name), str) or not parsed[name]:
                        raise InvalidRequest(
                            f"{route.path} needs {name!r}, a non-empty string", code="missing_field"
                        )
                if limiter is not None and limits.tokens:
                    wanted = reserve.reservation(
                        len(body),
                        parsed,
                        route.name in GENERATING,
                        self.default_max_tokens,
                        prompts=route.name == COMPLETIONS,
                    )
                    reservation, held = await limiter.reserve(
                        identity, limits, wanted, exchange.key or "anonymous"
                    )
                    exchange.reservation = reservation
                    exchange.headers_out += held
            query: bytes = scope.get("query_string", b"")
            raw_path: str | None = None
            if self.owners is not None and key is not None:
                raw_path, query, changed = self.owners.inbound(
                    key.name, route.name, route.path, scope.get("path_params", {}), query, parsed
                )
                if changed:
                    body = orjson.dumps(parsed)
                    previous = parsed.get("previous_response_id") if parsed is not None else None
                    exchange.previous_id = previous if isinstance(previous, str) else None
            if route.body is Body.STREAM:
                check_declared_length(headers.content_length, self.max_body)
                body = StreamedBody(receive, self.max_body)
                checked = exchange.restricted is not None and route.name not in MODEL_FREE
                if not router.single or checked:
                    # Routed (and checked) by the form's model field when it precedes the file.
                    content_type = next((v for n, v in headers.forward if n == b"content-type"), None)
                    model = await body.peek_form_field(content_type, "model")
                    if model is not None:
                        exchange.model = model[:MAX_MODEL_NAME]
                    if checked:
                        _check_allowed(exchange, model)
            if router.single:
                groups = [router.default]
            elif self.management:
                assert parsed is not None
                groups = [await management.target_group(router, parsed)]
                self._check_served(groups[0])
            else:
                named = parsed.get("model") if parsed is not None else exchange.model
                groups = await router.groups_for(named if isinstance(named, str) else None)
                groups = [group for group in groups if self._serves(group)] or groups[:1]
                self._check_served(groups[0])
        except GatewayError as exc:
            await send_error(send, exc, exchange)
            return
        except ClientGone:
            exchange.error = CLIENT_DISCONNECT
            return

        forward = headers.forward
        if self.owners is not None or (route.name == MODELS and exchange.restricted is not None):
            # Its answer is read to rewrite it (IDs sealed, a list cut): it must come as it is.
            forward = [h for h in forward if h[0] != b"accept-encoding"]
        if isinstance(body, StreamedBody) and headers.content_length is not None:
            # A fixed-size upload stays fixed-size: some runtimes do not take chunked bodies.
            forward.append((b"content-length", headers.content_length))
        forward.append((b"x-request-id", exchange.request_id.encode()))
        client = scope.get("client")
        trusted = client is not None and self.trusted(client[0])
        if trusted:
            forward += headers.forwarding
        if client:
            chain = headers.forwarded_for if trusted else None
            peer = client[0].encode("latin-1")
            forward.append((b"x-forwarded-for", chain + b", " + peer if chain else peer))

        task = asyncio.current_task()
        assert task is not None
        # An uploaded body is still being received: its reader notices a disconnect itself.
        watcher = (
            None
            if isinstance(body, StreamedBody)
            else asyncio.ensure_future(_cancel_on_disconnect(receive, task))
        )
        try:
            if not groups[0].backend.adapter.serves(route.name):
                await self._model_from_list(groups[0], exchange, forward, send)
                return
            fixed = not query and scope["path"] == route.path
            raw_target = raw_path or ""
            if not raw_target and (not fixed or "{" in route.path):
                raw_target = scope.get("raw_path", b"").decode("latin-1") or quote(scope["path"])

            def target_for(group: Group) -> str:
                if fixed:
                    target = self._fixed_target(group)
                    if target is not None:
                        return target
                target = group.backend.path_for(route.name, raw_target)
                return target + "?" + query.decode("latin-1") if query else target

            if self.management and len(groups[0].replicas) > 1:
                assert parsed is not None
                group = groups[0]
                exchange.backend = group.name
                exchange.headers_out.append((b"x-gateway-backend", group.name.encode()))
                assert isinstance(body, bytes)
                status, answer = await management.on_every_replica(
                    group, route.name, target_for(group), forward, parsed, body, self.settings
                )
                exchange.status = status
                if status >= 300:
                    exchange.error = "backend_error"
                else:
                    await router.refresh(group, fresh=True)
                await _send_json(send, status, answer, exchange)
                return
            await self._forward(scope["method"], target_for, forward, body, parsed, groups, send, exchange)
        except asyncio.CancelledError:
            if watcher is not None and watcher.done() and not watcher.cancelled() and task.uncancel() == 0:
                exchange.error = CLIENT_DISCONNECT
                return
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    def _fixed_target(self, group: Group) -> str | None:
        kind = group.backend.adapter.name
        try:
            return self.fixed_targets[kind]
        except KeyError:
            route = self.route
            target = None if "{" in route.path else group.backend.path_for(route.name, route.path)
            self.fixed_targets[kind] = target
            return target

    def _serves(self, group: Group) -> bool:
        return group.backend.adapter.answers(self.route.name)

    def _check_served(self, group: Group) -> None:
        if not self._serves(group):
            raise Unsupported(
                f"{self.route.path} is not served by the {group.name} backend", code="unsupported_route"
            )

    async def _forward(
        self,
        method: str,
        target_for: Callable[[Group], str],
        forward: list[tuple[bytes, bytes]],
        body: bytes | StreamedBody | None,
        parsed: dict[str, Any] | None,
        groups: list[Group],
        send: Send,
        exchange: Exchange,
    ) -> None:
        """Send the request to a replica and relay its answer; before the answer's first byte
        has gone to the client, a failed attempt may go to another replica."""
        router = self.router
        router.admit()
        tried: list[Replica] = []
        key = affinity_key(forward, parsed) if groups[0].strategy == AFFINITY else None
        choice = router.choose(groups, tried, key)
        if choice is None:  # a backend found by DNS, with no address yet
            names = ", ".join(group.name for group in groups)
            await send_error(send, BackendUnavailable(f"no replica of {names} is known yet"), exchange)
            return
        deadline: float | None = None
        holding: Replica | None = None  # counted in its in_flight until the answer ends
        try:
            while True:
                group, replica = choice
                exchange.backend = group.name
                backend = group.backend
                headers = forward if backend.auth_header is None else [*forward, backend.auth_header]
                payload = body
                if self.management:
                    assert parsed is not None
                    assert isinstance(body, bytes)
                    rewrite = backend.adapter.rewrites.get(self.route.name)
                    payload = management.runtime_body(parsed, rewrite, body)
                elif parsed is not None and group.aliases:
                    model = parsed.get("model")
                    if isinstance(model, str) and model in group.aliases:
                        # The one case where the gateway re-encodes a body: an alias is renamed.
                        payload = orjson.dumps({**parsed, "model": group.aliases[model]})
                if deadline is None:
                    deadline = asyncio.get_running_loop().time() + self.settings.backend_timeout
                waited = time.perf_counter()
                replica.in_flight += 1
                holding = replica
                try:
                    response = await replica.upstream.pool.request(
                        method, target_for(group), headers, payload, deadline
                    )
                except UPSTREAM_ERRORS as exc:
                    replica.in_flight -= 1
                    holding = None
                    exchange.upstream_wait += time.perf_counter() - waited
                    if isinstance(body, StreamedBody) and body.failure is not None:
                        if isinstance(body.failure, ClientGone):
                            exchange.error = CLIENT_DISCONNECT
                            return
                        await send_error(send, body.failure, exchange)
                        return
                    if not isinstance(exc, PoolTimeout):  # the gateway's own limit, not the replica
                        router.failed(group, replica, exc)
                    tried.append(replica)
                    error = before_response_error(exc, self.settings)
                    choice = self._next_attempt(body, groups, tried, deadline, key)
                    if choice is not None:
                        self._failing_over(group, replica, error.message, exchange)
                        continue
                    logger.warning(
                        "backend request failed (request %s): %s", exchange.request_id, error.message
                    )
                    await send_error(send, error, exchange)
                    return
                exchange.upstream_wait += time.perf_counter() - waited
                status = response.status
                if status >= 500:
                    router.failed(group, replica)
                else:
                    router.succeeded(replica)
                if status in FAILOVER_STATUSES:
                    tried.append(replica)
                    choice = self._next_attempt(body, groups, tried, deadline, key)
                    if choice is not None:
                        replica.in_flight -= 1
                        holding = None
                        response.close()
                        self._failing_over(group, replica, f"it answered {status}", exchange)
                        continue
                await self._answer(response, group, send, exchange)
                return
        finally:
            if holding is not None:
                holding.in_flight -= 1

    def _next_attempt(
        self,
        body: bytes | StreamedBody | None,
        groups: list[Group],
        tried: list[Replica],
        deadline: float,
        key: int | None,
    ) -> tuple[Group, Replica] | None:
        """Another replica for a request that failed before any answer, if it may have one."""
        router = self.router
        if router.single or isinstance(body, StreamedBody):  # an upload is not held to be sent again
            return None
        if asyncio.get_running_loop().time() >= deadline or not router.has_candidate(groups, tried):
            return None
        if not router.may_retry():
            self.metrics.retry_budget_exhausted.inc()
            return None
        return router.choose(groups, tried, key)

    def _failing_over(self, group: Group, replica: Replica, why: str, exchange: Exchange) -> None:
        self.metrics.failover(group.name)
        logger.info(
            "request %s: replica %s of backend %s failed (%s); trying another",
            exchange.request_id,
            replica.url,
            group.name,
            why,
        )

    async def _answer(self, response: Response, group: Group, send: Send, exchange: Exchange) -> None:
        complete = False
        try:
            exchange.headers_out.append((b"x-gateway-backend", group.name.encode()))
            returned, streaming = response_headers(
                response.status, response.raw_headers, exchange.headers_out
            )
            exchange.status = response.status
            if self.management and 200 <= response.status < 300:
                # What was loaded or unloaded is routed (or not) from the next request on.
                await self.router.refresh(group, fresh=True)
            owners = self.owners
            sealing = owners is not None and exchange.key is not None and 200 <= response.status < 300
            rewrite = None if streaming else self._rewriter(response, group, exchange, sealing)
            if rewrite is not None:
                try:
                    complete = await rewrite(response, group, returned, send, exchange)
                except BackendError as error:  # the body broke off before anything was sent
                    exchange.error = MID_STREAM
                    await send_error(send, error, exchange)
            else:
                await send({"type": "http.response.start", "status": response.status, "headers": returned})
                sealer = None
                if streaming:
                    exchange.stream = True
                    self.metrics.stream_opened(exchange)
                    if sealing:
                        assert owners is not None
                        assert exchange.key is not None
                        sealer = StreamSealer(owners, exchange.key, exchange.previous_id, self.max_read_bytes)
                complete = await self._relay(response, send, streaming, exchange, sealer)
        finally:
            if complete:
                response.release()
            else:
                response.close()

    def _rewriter(
        self, response: Response, group: Group, exchange: Exchange, sealing: bool
    ) -> Rewriter | None:
        """How a whole (not streamed) answer is rewritten before it goes out, if it is: a
        model list cut to the key's share, IDs sealed, an error put in the envelope, a model
        list completed."""
        status = response.status
        if self.route.name == MODELS and exchange.restricted is not None and status == 200:
            return self._send_allowed_models
        if sealing and self.route.name != FILE_CONTENT:
            return self._send_sealed
        if status >= 400:
            return self._send_reshaped
        if self.route.name == MODELS and status == 200 and group.backend.adapter.normalise:
            return None if response.header(b"content-encoding") is not None else self._send_reshaped
        return None

    async def _send_reshaped(
        self,
        response: Response,
        group: Group,
        headers: list[tuple[bytes, bytes]],
        send: Send,
        exchange: Exchange,
    ) -> bool:
        """Send an error in the gateway's envelope, or a model list in the OpenAI shape, if it
        is small enough to read."""
        status = response.status
        head, whole = await self._read_whole(response, exchange)
        encoding = response.header(b"content-encoding")
        if whole and encoding is not None:
            decoded = _decoded(head, encoding, self.max_read_bytes)
            if decoded is None:  # an encoding the gateway does not read: sent as it came
                whole = False
            else:
                head = decoded
                # Now sent as it is: the length and encoding are the gateway's.
                headers = [h for h in headers if h[0] not in REWRITTEN_HEADERS]
                headers.append((b"content-length", str(len(head)).encode()))
        if whole:
            if status >= 400 and "{" not in self.route.path and normalise.route_missing(status, head):
                await send_error(send, self._unregistered(group), exchange)
                return True
            reshaped: bytes | None
            if status >= 400 and self.route.name in ANTHROPIC_ROUTES:
                reshaped = normalise.anthropic_error_body(status, head)
            elif status >= 400:
                reshaped = normalise.error_body(status, head, model=exchange.model)
            else:
                reshaped = normalise.model_list(head, group.name)
            if reshaped is not None:
                await _send_whole(send, status, headers, reshaped)
                return True
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": head, "more_body": not whole})
        if whole:
            return True
        return await self._relay(response, send, False, exchange)

    def _unregistered(self, group: Group) -> Unsupported:
        """The 501 for a route the runtime has not registered (it answered its framework's 404)."""
        adapter = group.backend.adapter
        why = adapter.unregistered.get(self.route.name, "this runtime or model does not serve it")
        return Unsupported(
            f"the {group.name} backend ({adapter.name}) has no {self.route.path} for this model: {why}",
            code="unsupported_route",
        )

    async def _send_allowed_models(
        self,
        response: Response,
        group: Group,
        headers: list[tuple[bytes, bytes]],
        send: Send,
        exchange: Exchange,
    ) -> bool:
        """A model list cut to what the key may use."""
        assert exchange.restricted is not None
        head, whole = await self._read_whole(response, exchange)
        listed = (normalise.model_list(head, group.name) or head) if whole else b""
        try:
            document = orjson.loads(listed)
            entries = document["data"]
            assert isinstance(entries, list)
        except (orjson.JSONDecodeError, KeyError, TypeError, AssertionError):
            error = BackendBadResponse("the backend's model list could not be read", code="bad_model_list")
            await send_error(send, error, exchange)
            return False
        allowed = exchange.restricted
        document["data"] = [
            e for e in entries if isinstance(e, dict) and allowed.may_use(str(e.get("id", "")))
        ]
        await _send_whole(send, 200, headers, orjson.dumps(document))
        return True

    async def _send_sealed(
        self,
        response: Response,
        group: Group,
        headers: list[tuple[bytes, bytes]],
        send: Send,
        exchange: Exchange,
    ) -> bool:
        """An object, or a list of them, with its IDs sealed to the key and a list cut to the
        key's own objects."""
        assert self.owners is not None
        assert exchange.key is not None
        head, whole = await self._read_whole(response, exchange)
        if not whole or response.header(b"content-encoding") is not None:
            if self.route.name in ownership.LISTS:
                # Unread, it cannot be cut to the key's own objects; it must not go as it is.
                error = BackendBadResponse(
                    "the backend's list is too large to check whose objects it holds: ask for fewer (limit)",
                    code="list_too_large",
                )
                await send_error(send, error, exchange)
                return False
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            await send({"type": "http.response.body", "body": head, "more_body": not whole})
            return True if whole else await self._relay(response, send, False, exchange)
        sealed = await self.owners.answer(exchange.key, self.route.name, head)
        await _send_whole(send, response.status, headers, sealed)
        return True

    async def _read_whole(self, response: Response, exchange: Exchange) -> tuple[bytes, bool]:
        """The answer's body up to the read cap, and whether that was all of it; read before
        anything was sent, so a body the backend breaks off is the gateway's error."""
        waited = time.perf_counter()
        try:
            head, whole = await response.read_up_to(self.max_read_bytes)
        except UPSTREAM_ERRORS as exc:
            raise mid_stream_error(exc, self.settings) from exc
        finally:
            exchange.upstream_wait += time.perf_counter() - waited
        exchange.ttfb = time.perf_counter() - exchange.start
        return head, whole

    async def _model_from_list(
        self,
        group: Group,
        exchange: Exchange,
        headers: list[tuple[bytes, bytes]],
        send: Send,
    ) -> None:
        """``GET /v1/models/{id}`` for a runtime without that route: the entry from its list."""
        backend = group.backend
        exchange.backend = group.name
        if backend.auth_header is not None:
            headers = [*headers, backend.auth_header]
        replica = self.router.pick(group)
        assert replica is not None
        waited = time.perf_counter()
        try:
            status, body = await replica.upstream.pool.fetch(
                "GET", "/v1/models", headers, self.settings.backend_timeout
            )
        except UPSTREAM_ERRORS as exc:
            await send_error(send, before_response_error(exc, self.settings), exchange)
            return
        finally:
            exchange.upstream_wait += time.perf_counter() - waited
        exchange.status = status
        exchange.headers_out.append((b"x-gateway-backend", group.name.encode()))
        if status != 200:
            await _send_json(send, status, normalise.error_body(status, body), exchange)
            return
        wanted = group.backend_model(exchange.model or "")
        entry = normalise.find_model(body, wanted, backend.name)
        if entry is None:
            error = NotFound(f"model {exchange.model!r} not found", code="model_not_found")
            await send_error(send, error, exchange)
            return
        await _send_json(send, 200, orjson.dumps({**entry, "id": exchange.model}), exchange)

    async def _send_model_list(self, send: Send, exchange: Exchange) -> None:
        """``GET /v1/models`` and ``/v1/models/{id}`` across several backends, from their lists:
        every model and alias, each once."""
        router = self.router
        if any(group.models is None and group.listed_at is None for group in router.groups):
            await asyncio.gather(*(router.refresh(g) for g in router.groups if g.listed_at is None))
        entries = router.all_models()
        if exchange.restricted is not None:
            entries = [e for e in entries if exchange.restricted.may_use(str(e["id"]))]
        exchange.status = 200
        if self.route.name == MODELS:
            await _send_json(send, 200, orjson.dumps({"object": "list", "data": entries}), exchange)
            return
        entry = next((e for e in entries if e["id"] == exchange.model), None)
        if entry is None:
            error = NotFound(
                f"the model {exchange.model!r} does not exist", code="model_not_found", param="model"
            )
            await send_error(send, error, exchange)
            return
        await _send_json(send, 200, orjson.dumps(entry), exchange)

    async def _relay(
        self,
        response: Response,
        send: Send,
        streaming: bool,
        exchange: Exchange,
        sealer: StreamSealer | None = None,
    ) -> bool:
        """Send the body on as it arrives (through ``sealer`` where IDs are sealed); True
        when the backend finished it."""
        response.set_read_timeout(self.idle_timeout)
        clock = time.perf_counter
        previous = last = b""
        # Anthropic's streams give the prompt's tokens at their start (message_start).
        first: bytes | None = b"" if streaming and exchange.route == MESSAGES else None
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
                if first is not None and len(first) < TAIL_BYTES:
                    first += chunk[: TAIL_BYTES - len(first)]
                done = response.at_eof()
                if sealer is not None:
                    chunk = sealer.feed(chunk) + (sealer.flush() if done else b"")
                    if not chunk and not done:
                        continue
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
            final = _final_event(error, last, exchange.route in ANTHROPIC_ROUTES)
            await send({"type": "http.response.body", "body": final, "more_body": False})
            return False
        exchange.upstream_wait += waiting
        if not done:
            rest = sealer.flush() if sealer is not None else b""
            await send({"type": "http.response.body", "body": rest, "more_body": False})
        if 200 <= exchange.status < 300:
            tail = last if len(last) >= TAIL_BYTES else previous[-TAIL_BYTES:] + last
            exchange.prompt_tokens, exchange.completion_tokens = tokens_in(tail)
            if first is not None and exchange.prompt_tokens is None:
                exchange.prompt_tokens = prompt_tokens_at_start(first)
        return True


async def _send_whole(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """An answer the gateway rewrote (reshaped, cut to a key's share, IDs sealed), whole, as JSON."""
    headers = [h for h in headers if h[0] not in REWRITTEN_HEADERS]
    headers += [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _check_allowed(exchange: Exchange, model: Any) -> None:
    """NotFound for a model the key may not use, as for one that does not exist: a key is
    not told which models others may use."""
    key = exchange.restricted
    if key is None:
        return
    if exchange.route == BATCH_CREATE:
        # A batch's lines name their models in a file the gateway does not read.
        raise PermissionDenied("this key may use only some models, so it may not create batches")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "this key may use only some models: name one in 'model'", code="missing_model", param="model"
        )
    if not key.may_use(model):
        raise NotFound(
            f"the model {model[:MAX_MODEL_NAME]!r} does not exist or this key may not use it",
            code="model_not_found",
            param="model",
        )


def _final_event(error: BackendError, last: bytes, anthropic: bool) -> bytes:
    if anthropic:
        event = b"event: error\ndata: " + anthropic_envelope(error.status, error.message) + b"\n\n"
    else:
        event = sse_error_event(error)
    # Close an event the backend left half-sent, so that ours is read on its own.
    return event if last.endswith(b"\n\n") else b"\n\n" + event


def _decoded(body: bytes, encoding: bytes, limit: int) -> bytes | None:
    """A small compressed answer (an error the gateway rewrites), decompressed within ``limit``."""
    name = encoding.strip().lower()
    if name == b"identity":
        return body
    if name not in {b"gzip", b"x-gzip", b"deflate"}:
        return None
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 32 if name != b"deflate" else zlib.MAX_WBITS)
    try:
        decoded = decompressor.decompress(body, limit)
    except zlib.error:
        return None
    if decompressor.unconsumed_tail or not decompressor.eof:
        return None
    return decoded


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
