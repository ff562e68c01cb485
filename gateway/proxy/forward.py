"""Forward and answer: a request sent to a replica (to another while nothing has gone to the
client) and the backend's answer relayed as it comes, or read and rewritten."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import quote

from adapters.base import MANAGEMENT_ROUTES, Route
from gateway.client import Response, UpstreamError
from gateway.config.settings import Settings
from gateway.core.asgi import Receive, Send
from gateway.core.errors import BackendError, BackendUnavailable, Overloaded
from gateway.core.exchange import Exchange, Outcome
from gateway.core.headers import TrustedProxies, response_headers
from gateway.core.jsonbody import JsonBody
from gateway.core.tracecontext import RequestTrace, address
from gateway.edge.cycle import DISCONNECT, DisconnectWatch
from gateway.fleet.replicas import Group
from gateway.fleet.upstream import before_response_error
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import request_parameters
from gateway.proxy import listing, management
from gateway.proxy.body import ClientGone, StreamedBody
from gateway.proxy.call import Call
from gateway.proxy.relay import relay
from gateway.proxy.replies import send_error, send_json
from gateway.proxy.rewrite import Rewrites
from gateway.proxy.routes import RouteSpec
from gateway.routing.attempts import Attempt
from gateway.routing.router import Router
from gateway.tenancy.ownership import Owners, StreamSealer

logger = logging.getLogger("gateway.proxy")


class Forwarder:
    """The forward and answer phases of one route's requests."""

    def __init__(
        self, route: RouteSpec, router: Router, settings: Settings, metrics: Metrics, owners: Owners | None
    ) -> None:
        self.route = route
        self.router = router
        self.settings = settings
        self.metrics = metrics
        self.owners = owners
        """Set on the routes of files, batches and stored responses when several keys share
        the gateway: the IDs in their answers are sealed to their owner."""
        self.rewrites = Rewrites(route, settings, owners)
        self.management = route.name in MANAGEMENT_ROUTES
        self.max_read_bytes = settings.backend_max_read_bytes
        self.trusted = TrustedProxies(settings.trust_forwarded)
        # A route without parameters, asked without a query, always goes to the same path
        # on a kind of runtime.
        self.fixed_targets: dict[str, str | None] = {}

    def forward_headers(self, call: Call) -> None:
        headers, exchange = call.headers, call.exchange
        forward = call.forward
        if self.owners is not None or (self.route.name == Route.MODELS and exchange.restricted is not None):
            # Its answer is read to rewrite it (IDs sealed, a list cut): it must come as it is.
            forward = call.forward = [h for h in forward if h[0] != b"accept-encoding"]
        if isinstance(call.body, StreamedBody) and headers.content_length is not None:
            # A fixed-size upload stays fixed-size: some runtimes do not take chunked bodies.
            forward.append((b"content-length", headers.content_length))
        forward.append((b"x-request-id", exchange.request_id.encode()))
        trace = exchange.trace
        if trace is not None:
            # The runtime's parent is the gateway's CLIENT span; sampled out, it is told so.
            forward.append((b"traceparent", trace.traceparent()))
            if trace.state:
                forward.append((b"tracestate", trace.state.encode("latin-1")))
        elif headers.traceparent:
            forward.append((b"traceparent", headers.traceparent))
            if headers.tracestate is not None:
                forward.append((b"tracestate", headers.tracestate))
        client = call.scope.get("client")
        trusted = client is not None and self.trusted(client[0])
        if trusted:
            forward += headers.forwarding
        if client:
            chain = headers.forwarded_for if trusted else None
            peer = client[0].encode("latin-1")
            forward.append((b"x-forwarded-for", chain + b", " + peer if chain else peer))

    async def forward(self, call: Call) -> None:
        """Send the request and relay its answer, cancelled when the client goes. An uploaded
        body is still being received: its reader notices a disconnect itself. The gateway's
        own server says so through the scope; under another, a task waits on receive()."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None  # a request runs in a task
        watch: DisconnectWatch | None = None
        watcher: asyncio.Future[None] | None = None
        if not isinstance(call.body, StreamedBody):
            watch = call.scope.get("extensions", {}).get(DISCONNECT, {}).get("watch")
            if watch is not None:
                watch.register(task.cancel)
            else:
                watcher = asyncio.ensure_future(_cancel_on_disconnect(call.receive, task))
        try:
            group = call.groups[0]
            if not group.backend.adapter.serves(self.route.name):
                await listing.model_from_list(
                    self.router, self.settings, group, call.exchange, call.forward, call.send
                )
            elif self.management and call.parsed is not None and len(group.replicas) > 1:
                await self._on_every_replica(call, group, call.parsed)
            else:
                await self._attempts(call, loop.time() + self.settings.backend_timeout)
        except asyncio.CancelledError:
            gone = (
                watch.fired
                if watch is not None
                else (watcher is not None and watcher.done() and not watcher.cancelled())
            )
            if gone and task.uncancel() == 0:
                call.exchange.error = Outcome.CLIENT_DISCONNECT
                return
            raise
        finally:
            if watch is not None:
                watch.register(None)  # the answer is over: a close now cancels nothing
            if watcher is not None:
                watcher.cancel()

    async def _attempts(self, call: Call, deadline: float) -> None:
        """A replica, then another while a failure leaves the client nothing sent; ``deadline``
        is the loop's time by which the backend must have answered."""
        exchange, body = call.exchange, call.body
        router = self.router
        key = router.balancer(call.groups[0]).key(call.forward, call.parsed)
        # An upload is not held to be sent again.
        repeatable = not isinstance(body, StreamedBody)
        attempt = Attempt(router, call.groups, key, repeatable, deadline, exchange.request_id, call.ticket)
        if not attempt.begin():  # a backend found by DNS, with no address yet
            names = ", ".join(group.name for group in call.groups)
            await send_error(call.send, BackendUnavailable(f"no replica of {names} is known yet"), exchange)
            return
        method: str = call.scope["method"]
        trace = exchange.trace if exchange.trace is not None and exchange.trace.sampled else None
        if trace is not None:
            trace.request = request_parameters(call.parsed)
            trace.client_start = time.perf_counter()
        tries = 0
        try:
            while True:
                if attempt.waits:
                    if not await self._wait(call, attempt):
                        return
                    deadline = attempt.deadline
                group, replica = attempt.current()
                exchange.backend = group.name
                waited = time.perf_counter()
                tries += 1
                if trace is not None:
                    _traced_try(trace, waited, tries, group, replica.url)
                try:
                    response = await replica.upstream.request(
                        method, self._target(call, group), call.forward, self._payload(call, group), deadline
                    )
                except UpstreamError as exc:
                    exchange.upstream_wait += time.perf_counter() - waited
                    if isinstance(body, StreamedBody) and body.failure is not None:
                        if isinstance(body.failure, ClientGone):
                            exchange.error = Outcome.CLIENT_DISCONNECT
                        else:
                            await send_error(call.send, body.failure, exchange)
                        return
                    error = before_response_error(exc, self.settings)
                    if trace is not None:
                        _traced_failure(trace, tries, replica.url, error.type)
                    if attempt.failed(exc, error.message):
                        continue
                    logger.warning(
                        "backend request failed (request %s): %s", exchange.request_id, error.message
                    )
                    await send_error(call.send, error, exchange)
                    return
                exchange.upstream_wait += time.perf_counter() - waited
                if attempt.answered(response.status):
                    response.close()
                    if trace is not None:
                        _traced_failure(trace, tries, replica.url, str(response.status), response.status)
                    continue
                await self.answer(response, group, call.send, exchange)
                return
        finally:
            attempt.end(exchange.tokens_used())
            if trace is not None:
                trace.client_end = time.perf_counter()

    async def _wait(self, call: Call, attempt: Attempt) -> bool:
        """Wait for a replica with room (flow control); False when refused (answered here),
        its token reservation then released, as nothing was used."""
        exchange = call.exchange
        began = time.perf_counter()
        outcome = "dispatched"
        try:
            await attempt.wait()
        except Overloaded as error:
            outcome = error.code or error.type
            exchange.prompt_tokens = exchange.completion_tokens = 0
            await send_error(call.send, error, exchange)
            return False
        finally:
            now = time.perf_counter()
            exchange.queued += now - began
            if exchange.trace is not None:
                exchange.trace.event(
                    now,
                    "gateway.queue",
                    ("gateway.queue.wait_seconds", now - began),
                    ("gateway.queue.outcome", outcome),
                )
        # The backend's time starts when the request goes to it.
        attempt.deadline = asyncio.get_running_loop().time() + self.settings.backend_timeout
        return True

    async def _on_every_replica(self, call: Call, group: Group, parsed: JsonBody) -> None:
        """Model management on a backend of several replicas: each loads (or unloads) it."""
        exchange = call.exchange
        exchange.backend = group.name
        exchange.headers_out.append((b"x-gateway-backend", group.name.encode()))
        status, answer = await management.on_every_replica(
            group, self.route.name, self._target(call, group), call.forward, parsed, parsed.raw, self.settings
        )
        exchange.status = status
        if status >= 300:
            exchange.error = Outcome.BACKEND_ERROR
        else:
            await self.router.catalogue.refresh(group, fresh=True)
        await send_json(call.send, status, answer, exchange)

    def _target(self, call: Call, group: Group) -> str:
        """The path and query on ``group``'s runtime."""
        route, query = self.route, call.query
        path: str = call.scope["path"]
        if not query and path == route.path:
            target = self._fixed_target(group)
            if target is not None:
                return target
        raw = call.raw_path or call.scope.get("raw_path", b"").decode("latin-1") or quote(path)
        target = group.backend.path_for(route.name, raw)
        return target + "?" + query.decode("latin-1") if query else target

    def _fixed_target(self, group: Group) -> str | None:
        kind = group.backend.adapter.name
        try:
            return self.fixed_targets[kind]
        except KeyError:
            route = self.route
            target = None if "{" in route.path else group.backend.path_for(route.name, route.path)
            self.fixed_targets[kind] = target
            return target

    def _payload(self, call: Call, group: Group) -> bytes | StreamedBody | None:
        """The body as ``group``'s runtime takes it: in its own shape for model management,
        with an alias renamed; otherwise as the client sent it."""
        parsed, body = call.parsed, call.body
        if self.management and parsed is not None:  # management routes take JSON
            rewrite = group.backend.adapter.rewrites.get(self.route.name)
            return management.runtime_body(parsed, rewrite, parsed.raw)
        if parsed is not None and group.aliases:
            model = parsed.get("model")
            if isinstance(model, str) and model in group.aliases:
                # The one case where the gateway changes a body: an alias is renamed.
                return parsed.replaced({"model": group.aliases[model]})
        return body

    # Answer: relayed as it comes, or read and rewritten.

    async def answer(self, response: Response, group: Group, send: Send, exchange: Exchange) -> None:
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
            owners, key = self.owners, exchange.key
            sealing = owners is not None and key is not None and 200 <= response.status < 300
            rewrite = None if streaming else self.rewrites.choose(response, group, exchange, sealing)
            if rewrite is not None:
                try:
                    complete = await rewrite(response, group, returned, send, exchange)
                except BackendError as error:  # the body broke off before anything was sent
                    exchange.error = Outcome.MID_STREAM
                    await send_error(send, error, exchange)
            else:
                await send({"type": "http.response.start", "status": response.status, "headers": returned})
                sealer = None
                if streaming:
                    exchange.stream = True
                    self.metrics.stream_opened(exchange)
                    if owners is not None and key is not None and sealing:
                        sealer = StreamSealer(owners, key, exchange.previous_id, self.max_read_bytes)
                complete = await relay(response, send, streaming, exchange, self.settings, sealer)
        finally:
            if complete:
                response.release()
            else:
                response.close()


def _server(url: str) -> tuple[tuple[str, object], tuple[str, object]]:
    host, port = address(url)
    return ("server.address", host), ("server.port", port)


def _traced_try(trace: RequestTrace, at: float, tries: int, group: Group, url: str) -> None:
    trace.replica = url
    trace.provider = group.backend.adapter.name
    trace.event(at, "gateway.attempt", ("gateway.attempt", tries), *_server(url))


def _traced_failure(
    trace: RequestTrace, tries: int, url: str, error_type: str, status: int | None = None
) -> None:
    """A try that failed before its answer was relayed (another replica may take it)."""
    trace.event(
        time.perf_counter(),
        "gateway.attempt.failed",
        ("gateway.attempt", tries),
        ("error.type", error_type),
        ("http.response.status_code", status),
        *_server(url),
    )


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return
