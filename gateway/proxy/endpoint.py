"""Request in, bytes out: the one hot path.

Each forwarded route is a ``ProxyEndpoint``, a raw ASGI app mounted by the router. A request
goes through its phases around one ``Call`` (see ``ProxyEndpoint``). Everything that can go
wrong before the backend's status line becomes an error envelope; after it, a stream that
breaks gets a final SSE error event and any other body is cut off, never ended cleanly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from adapters.base import MANAGEMENT_ROUTES, Route
from gateway.config.settings import Settings
from gateway.core.asgi import Receive, Scope, Send
from gateway.core.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    Unsupported,
)
from gateway.core.exchange import Exchange, Outcome
from gateway.core.headers import (
    split_request_headers,
    valid_request_id,
)
from gateway.core.jsonbody import JsonBody
from gateway.fleet.replicas import Group
from gateway.observability.accesslog import AccessLog
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import OPERATIONS, Tracer
from gateway.proxy import listing, management
from gateway.proxy.body import ClientGone, StreamedBody, check_declared_length, read_json_object
from gateway.proxy.call import Call
from gateway.proxy.checks import (
    MAX_MODEL_NAME,
    check_accountable,
    check_allowed,
    has_dot_segment,
    stores_files,
)
from gateway.proxy.forward import Forwarder
from gateway.proxy.replies import send_error
from gateway.proxy.routes import Body, RouteSpec
from gateway.routing.flow import Ticket
from gateway.routing.router import Router
from gateway.tenancy import ownership, reserve
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.ownership import Owners
from gateway.tenancy.ratelimit import Allowance, KeyLimits, Limiter

logger = logging.getLogger("gateway.proxy")

# Routes whose answers are generated, so a token reservation counts their max_tokens.
GENERATING = frozenset({Route.CHAT_COMPLETIONS, Route.COMPLETIONS, Route.RESPONSES, Route.MESSAGES})
# Routes that name no model: a key that may use only some models uses them freely.
MODEL_FREE = (frozenset(ownership.ROUTE_KINDS) - {Route.RESPONSES, Route.BATCH_CREATE}) | {
    Route.MODELS,
    Route.MODEL,
}


class ProxyEndpoint:
    """One forwarded route. A request goes through named phases around one ``Call``:

    - admit: the path, the headers, the key, its request limits (``count`` where they are
      kept in a shared store);
    - permit: the model a path names, the route served by the backend;
    - read: the body, the model it names, the tokens it may use (``reserve``);
    - unseal: the IDs of the key's objects in the path, the query and the body;
    - choose: the backends that may answer (``choose_by_model`` where a list is read);
    - forward and answer (``Forwarder``): to a replica, to another before the answer's
      first byte, and the answer relayed or rewritten;
    - record: the limits settled, the metrics, the access log.

    A phase that never waits is a plain function: only reading the body, counting in a
    shared store, reading a backend's model list and the backend itself are awaited.
    """

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
        tracer: Tracer | None = None,
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
        self.max_body = settings.max_body_bytes
        self.max_json = min(settings.max_json_bytes, settings.max_body_bytes)
        self.owners = owners if route.name in ownership.ROUTE_KINDS else None
        """Set on the routes of files, batches and stored responses when several keys share
        the gateway: their IDs are sealed to their owner."""
        self.file_refs = owners if route.name in GENERATING else None
        """Set on the generating routes when IDs are sealed: the files a prompt names (a
        chat's file part, a Responses input_file) are unsealed for their owner too."""
        self.forwarder = Forwarder(route, router, settings, metrics, self.owners)
        self.management = route.name in MANAGEMENT_ROUTES
        """Model management: sent to a backend named in the body, else by model, else the
        default one; the body is put in the runtime's own shape."""
        self.model_free = route.name in MODEL_FREE
        self.generating = route.name in GENERATING
        self.lists = route.name in {Route.MODELS, Route.MODEL}
        self.tracer = tracer
        self.operation = OPERATIONS.get(route.name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = split_request_headers(scope["headers"])
        request_id = valid_request_id(headers.request_id)
        exchange = Exchange(request_id.decode(), self.route.name, scope["method"], self.router.default.name)
        self.metrics.started(exchange)
        if self.tracer is not None:
            trace = exchange.trace = self.tracer.start(
                f"{exchange.method} {self.route.path}", headers.traceparent, headers.tracestate
            )
            trace.operation = self.operation
        try:
            exchange.headers_out.append((b"x-request-id", request_id))
            await self._handle(Call(scope, receive, send, headers, exchange))
        finally:
            exchange.duration = time.perf_counter() - exchange.start
            if exchange.reservation is not None and self.limiter is not None:
                await self.limiter.settle(exchange.reservation, exchange.tokens_charged())
            self.record(exchange)

    async def _handle(self, call: Call) -> None:
        exchange = call.exchange
        try:
            if (pending := self.admit(call)) is not None:
                await self.count(call, pending)
            self.permit(call)
            if self.lists and self.router.catalogue.by_model:
                await listing.send_model_list(self.router, self.route.name, call.send, exchange)
                return
            if self.route.body is Body.JSON:
                check_declared_length(call.headers.content_length, self.max_json)
                parsed = await read_json_object(call.receive, self.max_json)
                self.read_json(call, parsed)
                allowance = call.allowance
                if allowance is not None and allowance.limits.tokens:
                    await self.reserve(call, allowance, parsed)
            self.unseal(call)
            if self.route.body is Body.STREAM:
                await self.read_upload(call)
            if not self.choose(call):
                await self.choose_by_model(call)
            if call.groups[0].limited:
                call.ticket = self.ticket(call)
            self.unseal_file_refs(call)
        except GatewayError as exc:
            await send_error(call.send, exc, exchange)
            return
        except ClientGone:
            exchange.error = Outcome.CLIENT_DISCONNECT
            return
        forwarder = self.forwarder
        forwarder.forward_headers(call)
        await forwarder.forward(call)

    # Admit: the path, the headers, the key and its request limits.

    def admit(self, call: Call) -> Allowance | None:
        """The allowance still to count in a shared store (``count``), or None."""
        path: str = call.scope["path"]
        if "/." in path and has_dot_segment(path):
            raise NotFound(f"no route {path}")
        headers = call.headers
        if headers.repeated is not None:
            raise InvalidRequest(
                f"several {headers.repeated.decode()} headers: send one", code="duplicate_header"
            )
        exchange = call.exchange
        key = call.key = self.auth.authenticate(headers.authorization, headers.x_api_key)
        exchange.key = key.name if key is not None else None
        limiter = self.limiter
        if limiter is None:
            return None
        if key is not None:
            allowance = Allowance(
                limiter, key.name, self.key_limits.get(key.name, self.default_limits), key.name
            )
        else:
            client = call.scope.get("client")
            identity = f"ip:{client[0] if client else '-'}"
            allowance = Allowance(limiter, identity, self.default_limits, "anonymous")
        call.allowance = allowance
        admitted = limiter.admit_now(allowance.identity, allowance.limits, allowance.label)
        if admitted is None:
            return allowance
        exchange.headers_out += admitted
        return None

    async def count(self, call: Call, allowance: Allowance) -> None:
        """The request limit counted in a shared store."""
        limiter = allowance.limiter
        call.exchange.headers_out += await limiter.admit(
            allowance.identity, allowance.limits, allowance.label
        )

    def permit(self, call: Call) -> None:
        """What the key may ask: the model a path names, a route its backend serves."""
        exchange, key = call.exchange, call.key
        if key is not None and key.models is not None:
            exchange.restricted = key
        if self.route.name == Route.MODEL:
            model = call.scope["path_params"]["model"]
            exchange.model = model[:MAX_MODEL_NAME]
            check_allowed(exchange, model)
        if not self.router.catalogue.by_model:
            self._check_served(self.router.default)

    # Read: the body, the model it names, what it may cost.

    def read_json(self, call: Call, parsed: JsonBody) -> None:
        exchange = call.exchange
        call.parsed = parsed
        call.body = parsed.raw
        model = parsed.get("model")
        if isinstance(model, str):
            exchange.model = model[:MAX_MODEL_NAME]
        if exchange.restricted is not None and not self.model_free:
            check_allowed(exchange, model)
        for name in self.route.required:
            value = parsed.get(name)
            if not isinstance(value, str) or not value:
                raise InvalidRequest(
                    f"{self.route.path} needs {name!r}, a non-empty string", code="missing_field"
                )

    async def reserve(self, call: Call, allowance: Allowance, parsed: JsonBody) -> None:
        """Hold the tokens the request may use against the key's token limits."""
        size = len(parsed.raw)
        check_accountable(self.route.name, parsed)
        wanted = reserve.reservation(
            size,
            parsed,
            self.generating,
            self.default_max_tokens,
            prompts=self.route.name == Route.COMPLETIONS,
        )
        reservation, held = await allowance.limiter.reserve(
            allowance.identity, allowance.limits, wanted, allowance.label, prompt=size // 4
        )
        call.exchange.reservation = reservation
        call.exchange.headers_out += held

    async def read_upload(self, call: Call) -> None:
        """An upload streams through; its form's ``model`` is read when it precedes the file."""
        headers, exchange = call.headers, call.exchange
        check_declared_length(headers.content_length, self.max_body)
        body = call.body = StreamedBody(call.receive, self.max_body)
        checked = exchange.restricted is not None and not self.model_free
        if self.router.catalogue.by_model or checked:
            content_type = next((v for n, v in headers.forward if n == b"content-type"), None)
            model = await body.peek_form_field(content_type, "model")
            if model is not None:
                exchange.model = model[:MAX_MODEL_NAME]
            if checked:
                check_allowed(exchange, model)
                body.watch_form_field(content_type, "model")

    # Unseal: the IDs of a key's objects, in the path, the query and the body.

    def unseal(self, call: Call) -> None:
        if self.owners is None or call.key is None:
            return
        route, parsed = self.route, call.parsed
        call.raw_path, call.query, changes = self.owners.inbound(
            call.key.name, route.name, route.path, call.scope.get("path_params", {}), call.query, parsed
        )
        if changes and parsed is not None:
            call.body = parsed.replaced(changes)
            call.parsed = JsonBody(call.body)
            call.exchange.previous_id = changes.get("previous_response_id")

    def unseal_file_refs(self, call: Call) -> None:
        """The files a prompt names, where the runtime chosen stores them; and the model
        sources a management request names, checked for the backend chosen."""
        parsed = call.parsed
        if parsed is None:
            return
        if self.file_refs is not None and call.key is not None and stores_files(call.groups):
            unsealed = self.file_refs.unseal_file_refs(call.key.name, parsed.raw)
            if unsealed is not None:
                call.parsed = parsed = JsonBody(unsealed)
                call.body = unsealed
        if self.management:
            allowed = self.settings.allow_remote_model_sources
            management.check_sources(call.groups[0], self.route.name, parsed, allowed)

    # Choose: the backends that may answer.

    def choose(self, call: Call) -> bool:
        """The one backend, where nothing need be read to know it; else False."""
        router = self.router
        if router.catalogue.by_model:
            return False
        if call.exchange.restricted is not None and not self.model_free:
            return False  # a name the key's patterns allow must still be one the runtime serves
        call.groups = [router.default]
        return True

    async def choose_by_model(self, call: Call) -> None:
        router = self.router
        if not router.catalogue.by_model:
            await router.catalogue.check_listed(call.exchange.model)
            call.groups = [router.default]
            return
        if self.management and call.parsed is not None:  # management routes take JSON
            groups = [await management.target_group(router, call.parsed)]
        else:
            named = call.parsed.get("model") if call.parsed is not None else call.exchange.model
            groups = await router.catalogue.groups_for(named if isinstance(named, str) else None)
            groups = [group for group in groups if self._serves(group)] or groups[:1]
        self._check_served(groups[0])
        call.groups = groups

    def ticket(self, call: Call) -> Ticket:
        """What flow control weighs a request by: its key (the client's address without one),
        its key's priority (``x-gateway-priority`` may lower it, never raise it), its key's
        weight, and the tokens it may use."""
        key, exchange = call.key, call.exchange
        priority = key.priority if key is not None else 0
        asked = next((v for n, v in call.headers.forward if n == b"x-gateway-priority"), None)
        if asked is not None:
            try:
                priority = min(priority, int(asked))
            except ValueError:
                raise InvalidRequest(
                    "x-gateway-priority must be a whole number", code="invalid_priority"
                ) from None
        if exchange.reservation is not None:
            cost = float(exchange.reservation.amount)
        elif call.parsed is not None:
            size = len(call.parsed.raw)
            cost = reserve.reservation(
                size,
                call.parsed,
                self.generating,
                self.default_max_tokens,
                prompts=self.route.name == Route.COMPLETIONS,
            )
        else:
            cost = 1.0
        if key is not None:
            return Ticket(key.name, priority, key.weight, cost)
        client = call.scope.get("client")
        return Ticket(f"ip:{client[0] if client else '-'}", priority, 1.0, cost)

    def _serves(self, group: Group) -> bool:
        return group.backend.adapter.answers(self.route.name)

    def _check_served(self, group: Group) -> None:
        if not self._serves(group):
            raise Unsupported(
                f"{self.route.path} is not served by the {group.name} backend", code="unsupported_route"
            )

    # Record: the metrics and the access log.

    def record(self, exchange: Exchange) -> None:
        """The metrics and the access log, once the limits are settled (in ``__call__``)."""
        if exchange.error == Outcome.CLIENT_DISCONNECT and not exchange.status:
            exchange.status = 499  # nginx's "client closed request"
        self.metrics.finished(exchange)
        if self.access_log is not None:
            self.access_log.write(exchange)
        if self.tracer is not None:
            self.tracer.finish(exchange)
