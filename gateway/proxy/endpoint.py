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

from adapters.base import (
    BATCH_CREATE,
    CHAT_COMPLETIONS,
    COMPLETIONS,
    MANAGEMENT_ROUTES,
    MESSAGES,
    MODEL,
    MODELS,
    RESPONSES,
)
from gateway.client import Response, UpstreamError
from gateway.edge.cycle import DISCONNECT, DisconnectWatch
from gateway.errors import (
    BackendError,
    BackendUnavailable,
    GatewayError,
    InvalidRequest,
    NotFound,
    Unsupported,
)
from gateway.exchange import Exchange
from gateway.fleet.replicas import Group
from gateway.fleet.upstream import before_response_error
from gateway.observability.accesslog import AccessLog
from gateway.observability.metrics import Metrics
from gateway.proxy import listing, management
from gateway.proxy.body import ClientGone, StreamedBody, check_declared_length, read_json_object
from gateway.proxy.checks import (
    MAX_MODEL_NAME,
    check_accountable,
    check_allowed,
    has_dot_segment,
    stores_files,
)
from gateway.proxy.headers import (
    RequestHeaders,
    TrustedProxies,
    response_headers,
    split_request_headers,
    valid_request_id,
)
from gateway.proxy.jsonbody import JsonBody
from gateway.proxy.relay import MID_STREAM, relay
from gateway.proxy.replies import Send, send_error, send_json
from gateway.proxy.rewrite import Rewrites
from gateway.proxy.routes import Body, RouteSpec
from gateway.routing.attempts import Attempt
from gateway.routing.router import Router
from gateway.settings import Settings
from gateway.tenancy import ownership, reserve
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.ownership import Owners, StreamSealer
from gateway.tenancy.ratelimit import KeyLimits, Limiter

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]

logger = logging.getLogger("gateway.proxy")

CLIENT_DISCONNECT = "client_disconnect"
# Routes whose answers are generated, so a token reservation counts their max_tokens.
GENERATING = frozenset({CHAT_COMPLETIONS, COMPLETIONS, RESPONSES, MESSAGES})
# Routes that name no model: a key that may use only some models uses them freely.
MODEL_FREE = (frozenset(ownership.ROUTE_KINDS) - {RESPONSES, BATCH_CREATE}) | {MODELS, MODEL}


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
        self.max_json = min(settings.max_json_bytes, settings.max_body_bytes)
        self.max_read_bytes = settings.backend_max_read_bytes
        self.idle_timeout = settings.stream_idle_timeout
        self.trusted = TrustedProxies(settings.trust_forwarded)
        self.owners = owners if route.name in ownership.ROUTE_KINDS else None
        self.file_refs = owners if route.name in GENERATING else None
        """Set on the generating routes when IDs are sealed: the files a prompt names (a
        chat's file part, a Responses input_file) are unsealed for their owner too."""
        """Set on the routes of files, batches and stored responses when several keys share
        the gateway: their IDs are sealed to their owner."""
        self.rewrites = Rewrites(route, settings, self.owners)
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
                await self.limiter.settle(exchange.reservation, exchange.tokens_charged())
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
        parsed: JsonBody | None = None
        try:
            path: str = scope["path"]
            if "/." in path and has_dot_segment(path):
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
                label = exchange.key or "anonymous"
                admitted = limiter.admit_now(identity, limits, label)
                exchange.headers_out += (
                    admitted if admitted is not None else await limiter.admit(identity, limits, label)
                )
            if key is not None and key.models is not None:
                exchange.restricted = key
            if route.name == MODEL:
                exchange.model = scope["path_params"]["model"][:MAX_MODEL_NAME]
                check_allowed(exchange, scope["path_params"]["model"])
            by_model = router.catalogue.by_model
            if not by_model:
                self._check_served(router.default)
            elif route.name in {MODELS, MODEL}:
                await listing.send_model_list(self.router, route.name, send, exchange)
                return
            if route.body is Body.JSON:
                check_declared_length(headers.content_length, self.max_json)
                parsed = await read_json_object(receive, self.max_json)
                body = parsed.raw
                model = parsed.get("model")
                if isinstance(model, str):
                    exchange.model = model[:MAX_MODEL_NAME]
                if exchange.restricted is not None and route.name not in MODEL_FREE:
                    check_allowed(exchange, model)
                for name in route.required:
                    value = parsed.get(name)
                    if not isinstance(value, str) or not value:
                        raise InvalidRequest(
                            f"{route.path} needs {name!r}, a non-empty string", code="missing_field"
                        )
                if limiter is not None and limits.tokens:
                    check_accountable(route.name, parsed)
                    wanted = reserve.reservation(
                        len(body),
                        parsed,
                        route.name in GENERATING,
                        self.default_max_tokens,
                        prompts=route.name == COMPLETIONS,
                    )
                    reservation, held = await limiter.reserve(
                        identity, limits, wanted, label, prompt=len(body) // 4
                    )
                    exchange.reservation = reservation
                    exchange.headers_out += held
            query: bytes = scope.get("query_string", b"")
            raw_path: str | None = None
            if self.owners is not None and key is not None:
                raw_path, query, changes = self.owners.inbound(
                    key.name, route.name, route.path, scope.get("path_params", {}), query, parsed
                )
                if changes and parsed is not None:
                    body = parsed.replaced(changes)
                    parsed = JsonBody(body)
                    exchange.previous_id = changes.get("previous_response_id")
            if route.body is Body.STREAM:
                check_declared_length(headers.content_length, self.max_body)
                body = StreamedBody(receive, self.max_body)
                checked = exchange.restricted is not None and route.name not in MODEL_FREE
                if by_model or checked:
                    # Routed (and checked) by the form's model field when it precedes the file.
                    content_type = next((v for n, v in headers.forward if n == b"content-type"), None)
                    model = await body.peek_form_field(content_type, "model")
                    if model is not None:
                        exchange.model = model[:MAX_MODEL_NAME]
                    if checked:
                        check_allowed(exchange, model)
                        body.watch_form_field(content_type, "model")
            if not by_model:
                groups = [router.default]
                if exchange.restricted is not None and route.name not in MODEL_FREE:
                    # A name the key's patterns allow is still one the runtime must serve.
                    await router.catalogue.check_listed(exchange.model)
            elif self.management:
                assert parsed is not None
                groups = [await management.target_group(router, parsed)]
                self._check_served(groups[0])
            else:
                named = parsed.get("model") if parsed is not None else exchange.model
                groups = await router.catalogue.groups_for(named if isinstance(named, str) else None)
                groups = [group for group in groups if self._serves(group)] or groups[:1]
                self._check_served(groups[0])
            if self.file_refs is not None and key is not None and parsed is not None and stores_files(groups):
                unsealed = self.file_refs.unseal_file_refs(key.name, parsed.raw)
                if unsealed is not None:
                    parsed = JsonBody(unsealed)
                    body = unsealed
            if self.management and parsed is not None:
                allowed = self.settings.allow_remote_model_sources
                management.check_sources(groups[0], route.name, parsed, allowed)
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

        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        # A client that goes cancels its request (and so the backend's). An uploaded body is
        # still being received: its reader notices a disconnect itself. The gateway's own
        # server says so through the scope; under another, a task waits on receive().
        watch: DisconnectWatch | None = None
        watcher: asyncio.Future[None] | None = None
        if not isinstance(body, StreamedBody):
            watch = scope.get("extensions", {}).get(DISCONNECT, {}).get("watch")
            if watch is not None:
                watch.register(task.cancel)
            else:
                watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, task))
        try:
            if not groups[0].backend.adapter.serves(route.name):
                await listing.model_from_list(self.router, self.settings, groups[0], exchange, forward, send)
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
                    await router.catalogue.refresh(group, fresh=True)
                await send_json(send, status, answer, exchange)
                return
            deadline = loop.time() + self.settings.backend_timeout
            await self._forward(
                scope["method"], target_for, forward, body, parsed, groups, deadline, send, exchange
            )
        except asyncio.CancelledError:
            gone = (
                watch.fired
                if watch is not None
                else (watcher is not None and watcher.done() and not watcher.cancelled())
            )
            if gone and task.uncancel() == 0:
                exchange.error = CLIENT_DISCONNECT
                return
            raise
        finally:
            if watch is not None:
                watch.register(None)  # the answer is over: a close now cancels nothing
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
        parsed: JsonBody | None,
        groups: list[Group],
        deadline: float,
        send: Send,
        exchange: Exchange,
    ) -> None:
        """Send the request to a replica and relay its answer; before the answer's first byte
        has gone to the client, a failed attempt may go to another replica. ``deadline`` is
        the loop's time by which the backend must have answered."""
        router = self.router
        key = router.balancer(groups[0]).key(forward, parsed)
        # An upload is not held to be sent again.
        repeatable = not isinstance(body, StreamedBody)
        attempt = Attempt(router, groups, key, repeatable, deadline, exchange.request_id)
        if not attempt.begin():  # a backend found by DNS, with no address yet
            names = ", ".join(group.name for group in groups)
            await send_error(send, BackendUnavailable(f"no replica of {names} is known yet"), exchange)
            return
        try:
            while True:
                group, replica = attempt.group, attempt.replica
                assert group is not None
                assert replica is not None
                exchange.backend = group.name
                payload = self._payload(group, body, parsed)
                waited = time.perf_counter()
                try:
                    response = await replica.upstream.request(
                        method, target_for(group), forward, payload, deadline
                    )
                except UpstreamError as exc:
                    exchange.upstream_wait += time.perf_counter() - waited
                    if isinstance(body, StreamedBody) and body.failure is not None:
                        if isinstance(body.failure, ClientGone):
                            exchange.error = CLIENT_DISCONNECT
                            return
                        await send_error(send, body.failure, exchange)
                        return
                    error = before_response_error(exc, self.settings)
                    if attempt.failed(exc, error.message):
                        continue
                    logger.warning(
                        "backend request failed (request %s): %s", exchange.request_id, error.message
                    )
                    await send_error(send, error, exchange)
                    return
                exchange.upstream_wait += time.perf_counter() - waited
                if attempt.answered(response.status):
                    response.close()
                    continue
                await self._answer(response, group, send, exchange)
                return
        finally:
            attempt.end()

    def _payload(
        self, group: Group, body: bytes | StreamedBody | None, parsed: JsonBody | None
    ) -> bytes | StreamedBody | None:
        """The body as ``group``'s runtime takes it: in its own shape for model management,
        with an alias renamed; otherwise as the client sent it."""
        if self.management:
            assert parsed is not None
            assert isinstance(body, bytes)
            rewrite = group.backend.adapter.rewrites.get(self.route.name)
            return management.runtime_body(parsed, rewrite, body)
        if parsed is not None and group.aliases:
            model = parsed.get("model")
            if isinstance(model, str) and model in group.aliases:
                # The one case where the gateway changes a body: an alias is renamed.
                return parsed.replaced({"model": group.aliases[model]})
        return body

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
                await self.router.catalogue.refresh(group, fresh=True)
            owners = self.owners
            sealing = owners is not None and exchange.key is not None and 200 <= response.status < 300
            rewrite = None if streaming else self.rewrites.choose(response, group, exchange, sealing)
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
                complete = await relay(response, send, streaming, exchange, self.settings, sealer)
        finally:
            if complete:
                response.release()
            else:
                response.close()


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return
