"""The app: a ``Gateway`` (what one process owns, opened and closed with the app) and the ASGI
app that dispatches to it, with the error rendering of the routes Starlette matches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from adapters import llamacpp, vllm
from gateway.config.backends import load_backends_file
from gateway.config.settings import Settings, is_loopback
from gateway.core.asgi import ASGIApp, Receive, Scope, Send
from gateway.core.errors import GatewayError, InternalError, MethodNotAllowed, NotFound, envelope
from gateway.edge.cors import Cors
from gateway.edge.local import not_local
from gateway.edge.server import Lifecycle
from gateway.embedded.supervisor import Launch, Supervisor, plan_launch
from gateway.endpoints import openapi
from gateway.endpoints.admin import AdminBackends, RuntimeMetrics
from gateway.endpoints.health import ReadyEndpoint, health
from gateway.fleet.backend import Backend
from gateway.observability.accesslog import AccessLog
from gateway.observability.metrics import FleetCollector, KnownModels, Metrics, multiprocess_dir
from gateway.observability.page import MetricsEndpoint, Page
from gateway.observability.tracing import create_tracer
from gateway.proxy.endpoint import ProxyEndpoint
from gateway.proxy.routes import ROUTES, RouteSpec
from gateway.routing.router import Router
from gateway.tenancy import preflight
from gateway.tenancy.auth import Authenticator, load_keys_file
from gateway.tenancy.ownership import Owners, records_for
from gateway.tenancy.ratelimit import KeyLimits, Limiter, key_limits, parse_limits

logger = logging.getLogger("gateway")

EMBEDDED_ADAPTERS = {"llamacpp": llamacpp.PYTHON, "vllm": vllm.ADAPTER}


def create_app(settings: Settings, backend: Backend | None = None) -> GatewayApp:
    """The gateway as an ASGI app.

    ``backend`` defaults to the one the settings describe; with no backend URL configured,
    that is an embedded runtime the app starts and supervises for its lifetime.
    """
    gateway = Gateway(settings, backend)
    app = GatewayApp(
        routes=gateway.routes(),
        lifespan=gateway.lifespan,
        exception_handlers={HTTPException: _http_exception, Exception: _unhandled},
    )
    # The hot routes skip Starlette's middleware and route matching: a dict lookup instead.
    for spec, endpoint in gateway.endpoints.items():
        if "{" not in spec.path:
            methods = app.fast_routes.setdefault(spec.path, {})
            for method in (*spec.methods, "HEAD") if "GET" in spec.methods else spec.methods:
                methods[method] = endpoint
    # A trailing slash is not a redirect built from the client's Host: it is no route.
    app.router.redirect_slashes = False
    if settings.cors_origins:
        app.cors = Cors(settings.cors_origins, settings.cors_credentials)
    # With no keys on loopback, a page on a domain that resolves to 127.0.0.1 (DNS rebinding),
    # or a page of any other origin, must not drive the gateway through a developer's browser.
    app.local_only = not gateway.auth.enabled and is_loopback(settings.host)
    app.state.gateway = gateway
    app.state.settings = settings
    app.state.router = gateway.router
    app.state.backend = gateway.router.default.backend
    replicas = gateway.router.default.replicas
    app.state.upstream = replicas[0].upstream if replicas else None
    app.state.supervisor = gateway.supervisor
    app.state.metrics = gateway.metrics
    app.state.metrics_page = gateway.page
    app.state.limiter = gateway.limiter
    app.state.owners = gateway.owners
    app.state.lifecycle = gateway.lifecycle
    return app


class Gateway:
    """What one gateway process owns, made from its settings: the router and its fleet, the
    keys and their limits, sealed objects, metrics and the access log, and an embedded
    runtime where no backend is configured. ``open`` and ``close`` start and stop what runs
    (as uvicorn's ``Server.startup`` and ``shutdown``); the app's lifespan is the two."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        preflight.check(settings)
        self.settings = settings
        self.launch: Launch | None = None
        if backend is None and settings.backend_url is None and settings.backends is None:
            self.launch = launch = plan_launch(settings)
            adapter = EMBEDDED_ADAPTERS[launch.runtime]
            backend = Backend(adapter=adapter, url=launch.url, auth_header=launch.auth_header)
        self.router = router = (
            Router.for_backend(backend, settings) if backend is not None else Router.from_settings(settings)
        )
        self.file_keys = load_keys_file(settings.keys_file) if settings.keys_file else []
        self.auth = Authenticator.from_plain_keys(
            (key.get_secret_value() for key in settings.api_keys), self.file_keys
        )
        self.admin = Authenticator.from_plain_keys(
            (key.get_secret_value() for key in settings.admin_api_keys), prefix="admin:"
        )
        self.ready = ReadyEndpoint(router, settings.ready_timeout)
        self.lifecycle = Lifecycle()
        self.ready.gates.append((self.lifecycle.not_ready_reason, "shutting_down"))
        self.lifecycle.on_close.append(self.router.flow.close)
        self.supervisor = self._supervisor()
        self.metrics = self._metrics()
        self.page = Page(self.metrics.render, settings.metrics_token)
        self.access_log = AccessLog() if settings.access_log else None
        self.tracer = create_tracer(settings, self.metrics.registry)
        self.limits_by_key, self.limiter = self._limits()
        self.owners: Owners | None = None
        if self.auth.size > 1 and settings.object_secret is not None:  # preflight: set with several
            secret = settings.object_secret.get_secret_value().encode()
            self.owners = Owners(secret, records_for(settings.rate_limit_storage))
        self.endpoints = {
            spec: self._endpoint(spec)
            for spec in ROUTES
            # Runtime admin routes exist only for admin keys; with none configured they are 404.
            if not spec.admin or self.admin.enabled
        }
        self._tasks: list[asyncio.Task[None]] = []
        self._reloading = False

    def _supervisor(self) -> Supervisor | None:
        """The embedded runtime's supervisor, where the gateway starts one."""
        launch = self.launch
        if launch is None:
            return None
        lifecycle = self.lifecycle

        def give_up(reason: str) -> None:
            # The gateway cannot serve without it: it stops, and says why in its exit status.
            lifecycle.failed = reason
            os.kill(os.getpid(), signal.SIGTERM)

        supervisor = Supervisor(
            launch.argv,
            self.ready.is_ready,
            name=launch.runtime,
            env=launch.env,
            pass_fds=[launch.listener.fileno()] if launch.listener is not None else [],
            waiting_for=f"GET {EMBEDDED_ADAPTERS[launch.runtime].health_path} at {launch.url}",
            on_give_up=give_up,
        )
        self.ready.gates.append((supervisor.not_ready_reason, "backend_loading"))
        return supervisor

    def _metrics(self) -> Metrics:
        router = self.router
        known_models = KnownModels(self.settings.metrics_models)
        metrics = Metrics(known_models)
        router.on_retry = lambda name: metrics.retries.labels(name).inc()
        router.on_failover = metrics.failover
        router.on_budget_exhausted = metrics.retry_budget_exhausted.inc
        for group in router.groups:  # shown at 0 from the start
            metrics.retries.labels(group.name)
            metrics.failovers.labels(group.name)
        metrics.fleet = FleetCollector(router)
        metrics.registry.register(metrics.fleet)
        if not multiprocess_dir():
            # The process's own figures (CPU, memory, descriptors, the garbage collector), as
            # prometheus_client's default registry has them; workers' shared files cannot sum them.
            ProcessCollector(registry=metrics.registry)
            PlatformCollector(registry=metrics.registry)
            GCCollector(registry=metrics.registry)
        router.catalogue.on_models = known_models.update
        router.flow.on_wait = lambda group, ticket, waited, outcome: metrics.waited(
            group.name, waited, outcome
        )
        return metrics

    def _limits(self) -> tuple[dict[str, KeyLimits], Limiter | None]:
        """Each key's limits (the default under ""), and the limiter where any is set."""
        settings = self.settings
        default = KeyLimits(parse_limits(settings.rate_limit), parse_limits(settings.token_limit))
        by_key = {"": default} | {
            key.name: key_limits(default, key.rate_limit, key.token_limit) for key in self.file_keys
        }
        if not settings.global_rate_limit and not any(lim.requests or lim.tokens for lim in by_key.values()):
            return by_key, None
        limiter = Limiter(
            settings.rate_limit_storage,
            settings.rate_limit_strategy,
            settings.global_rate_limit,
            settings.rate_limit_fail_closed,
            self.metrics.rate_limit_failures,
            self.metrics.rate_limited,
        )
        return by_key, limiter

    def _endpoint(self, spec: RouteSpec) -> ProxyEndpoint:
        return ProxyEndpoint(
            spec,
            self.router,
            self.admin if spec.admin else self.auth,
            self.settings,
            self.metrics,
            self.access_log,
            None if spec.admin else self.limiter,
            self.limits_by_key,
            self.owners,
            self.tracer,
        )

    def routes(self) -> list[BaseRoute]:
        """The forwarded routes, then the gateway's own: health, readiness, the operators'
        views, metrics and the API's documents."""
        routes: list[BaseRoute] = [
            Route(spec.path, endpoint, methods=list(spec.methods))
            for spec, endpoint in self.endpoints.items()
        ]
        # Without admin keys an admin route is 404 like any unknown one, not the 405 of a route
        # whose path it shares (POST /v1/models/load against GET /v1/models/{model}).
        routes += [
            Route(spec.path, _no_route, methods=list(spec.methods))
            for spec in ROUTES
            if spec not in self.endpoints
        ]
        routes.append(Route("/health", health, methods=["GET"]))
        routes.append(Route("/ready", self.ready.endpoint, methods=["GET"]))
        routes += self._operator_routes()
        if self.settings.docs:
            routes += self._document_routes()
        return routes

    def _operator_routes(self) -> list[BaseRoute]:
        settings, admin = self.settings, self.admin
        routes: list[BaseRoute] = []
        if admin.enabled:
            routes.append(
                Route("/admin/backends", AdminBackends(self.router, admin).endpoint, methods=["GET"])
            )
        if admin.enabled or settings.metrics_token is not None:
            token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
            runtime_metrics = RuntimeMetrics(self.router, admin, token, settings.ready_timeout)
            routes.append(Route("/admin/backends/{name}/metrics", runtime_metrics.endpoint, methods=["GET"]))
        if settings.metrics_port is None:
            closed = self.auth.enabled and not settings.metrics_public
            page = MetricsEndpoint(self.page, admin, closed)
            routes.append(Route("/metrics", page.endpoint, methods=["GET"]))
            if closed and settings.metrics_token is None and not admin.enabled:
                logger.warning(
                    "/metrics answers no one: with client keys it needs --metrics-token or an admin "
                    "key (or --metrics-port, or --metrics-public to open it)"
                )
        return routes

    def _document_routes(self) -> list[BaseRoute]:
        served = [
            spec
            for spec in self.endpoints
            if any(group.backend.adapter.answers(spec.name) for group in self.router.groups)
        ]
        document = openapi.document(
            served,
            auth=self.auth.enabled,
            admin=self.admin.enabled,
            metrics=self.settings.metrics_port is None,
        )
        docs = openapi.Docs(document)
        return [
            Route("/openapi.json", docs.openapi, methods=["GET"]),
            Route("/docs", docs.page, methods=["GET"]),
            Route("/docs/{name}", docs.asset, methods=["GET"]),
            Route("/redoc", docs.elsewhere, methods=["GET"]),
        ]

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.open()
        try:
            yield
        finally:
            await self.close()

    async def open(self) -> None:
        """The fleet's connections and loops, the embedded runtime, SIGHUP's reload."""
        router = self.router
        await router.open()
        if self.tracer is not None:
            self.tracer.exporter.start()
        if not self.auth.enabled:
            logger.warning("no API keys configured: the gateway is open to anyone who can reach it")
        if self.supervisor is not None:
            await self.supervisor.start()
        self._tasks = [asyncio.create_task(loop) for loop in router.loops()]
        self._reloading = _reload_on_sighup(router, self.settings)
        for group in router.groups:
            urls = ", ".join(replica.url for replica in group.replicas)
            logger.info(
                "forwarding to the %s backend (%s) at %s", group.name, group.backend.adapter.name, urls
            )

    async def close(self) -> None:
        """What ``open`` started, stopped; what was held, written or closed."""
        if self._reloading:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in self._tasks:
            task.cancel()
        self.metrics.close()
        if self.access_log is not None:
            self.access_log.flush()
        if self.tracer is not None:  # the spans of the last requests, sent (a thread may wait)
            await asyncio.to_thread(self.tracer.close)
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.launch is not None and self.launch.listener is not None:
            self.launch.listener.close()
        await self.router.close()
        if self.owners is not None:
            await self.owners.records.close()


def _reload_on_sighup(router: Router, settings: Settings) -> bool:
    """Read the backends file again on SIGHUP (in the main thread of a process that has one)."""
    path = settings.backends_file
    if path is None or threading.current_thread() is not threading.main_thread():
        return False

    async def reload() -> None:
        try:
            configs = load_backends_file(path)
        except ValueError as exc:
            logger.error("SIGHUP: %s; the backends stay as they were", exc)
            return
        await router.reload(configs)

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))
    return True


class GatewayApp(Starlette):
    """Starlette, with the proxy's fixed paths dispatched before its middleware stack.

    Everything else (path parameters, wrong methods, unknown paths, health, metrics,
    lifespan) goes through Starlette's routing and error handling as usual.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast_routes: dict[str, dict[str, ASGIApp]] = {}
        """Path, then method, to the endpoint (GET /v1/files and POST /v1/files differ)."""
        self.cors: Cors | None = None
        self.local_only = False
        """Serve only requests to a loopback host name, and no cross-origin ones without CORS."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self.local_only and (refusal := not_local(scope, self.cors is None)) is not None:
                await _render(refusal)(scope, receive, send)
                return
            if self.cors is not None:
                origin, requested, preflight = self.cors.scan(scope)
                if origin is not None:
                    if preflight:
                        await self.cors.preflight(origin, requested, send)
                        return
                    send = self.cors.wrap(send, origin)
            methods = self.fast_routes.get(scope["path"])
            endpoint = methods.get(scope["method"]) if methods is not None else None
            if endpoint is not None:
                scope["app"] = self
                try:
                    await endpoint(scope, receive, send)
                except Exception:
                    logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
                    error = InternalError("the gateway failed to handle this request")
                    with contextlib.suppress(RuntimeError):  # the answer had already started
                        await _render(error)(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _render(error: GatewayError, headers: dict[str, str] | None = None) -> Response:
    return Response(
        error.body(),
        status_code=error.status,
        headers={**error.headers, **(headers or {})},
        media_type="application/json",
    )


async def _no_route(request: Request) -> Response:
    return _render(
        NotFound(f"no route {request.url.path}: the gateway forwards only the OpenAI API routes it lists")
    )


async def _http_exception(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        raise exc
    if exc.status_code == 405:
        error: GatewayError = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    elif exc.status_code == 404:
        error = NotFound(
            f"no route {request.url.path}: the gateway forwards only the OpenAI API routes it lists"
        )
    else:
        body = envelope("http_error", str(exc.detail))
        return Response(body, status_code=exc.status_code, headers=exc.headers, media_type="application/json")
    return _render(error, dict(exc.headers or {}))


async def _unhandled(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _render(InternalError("the gateway failed to handle this request"))
