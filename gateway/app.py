"""``create_app(settings)``: the route table, the lifespan that owns resources, error rendering."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
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
from starlette.types import ASGIApp, Receive, Scope, Send

from adapters import llamacpp, vllm
from gateway.edge.cors import Cors
from gateway.embedded.supervisor import Launch, Supervisor, plan_launch
from gateway.endpoints import openapi
from gateway.endpoints.admin import AdminBackends, RuntimeMetrics
from gateway.endpoints.health import Lifecycle, ReadyEndpoint, health
from gateway.errors import (
    GatewayError,
    InternalError,
    MethodNotAllowed,
    MisdirectedRequest,
    NotFound,
    PermissionDenied,
    envelope,
)
from gateway.fleet.backend import Backend
from gateway.fleet.config import load_backends_file
from gateway.observability.accesslog import AccessLog
from gateway.observability.metrics import FleetCollector, KnownModels, Metrics, multiprocess_dir
from gateway.observability.page import MetricsEndpoint, Page
from gateway.proxy.endpoint import ProxyEndpoint
from gateway.proxy.routes import ROUTES
from gateway.routing.router import Router
from gateway.settings import Settings, is_loopback
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
    preflight.check(settings)
    launch: Launch | None = None
    if backend is None and settings.backend_url is None and settings.backends is None:
        launch = plan_launch(settings)
        backend = Backend(
            adapter=EMBEDDED_ADAPTERS[launch.runtime], url=launch.url, auth_header=launch.auth_header
        )
    router = Router.for_backend(backend, settings) if backend is not None else Router.from_settings(settings)
    file_keys = load_keys_file(settings.keys_file) if settings.keys_file else []
    auth = Authenticator.from_plain_keys((key.get_secret_value() for key in settings.api_keys), file_keys)
    ready = ReadyEndpoint(router, settings.ready_timeout)
    lifecycle = Lifecycle()
    ready.gates.append((lifecycle.not_ready_reason, "shutting_down"))
    supervisor: Supervisor | None = None
    if launch is not None:
        health_path = EMBEDDED_ADAPTERS[launch.runtime].health_path

        def give_up(reason: str) -> None:
            # The gateway cannot serve without it: it stops, and says why in its exit status.
            lifecycle.failed = reason
            os.kill(os.getpid(), signal.SIGTERM)

        supervisor = Supervisor(
            launch.argv,
            ready.is_ready,
            name=launch.runtime,
            env=launch.env,
            pass_fds=[launch.listener.fileno()] if launch.listener is not None else [],
            waiting_for=f"GET {health_path} at {launch.url}",
            on_give_up=give_up,
        )
        ready.gates.append((supervisor.not_ready_reason, "backend_loading"))

    admin = Authenticator.from_plain_keys(
        (key.get_secret_value() for key in settings.admin_api_keys), prefix="admin:"
    )
    known_models = KnownModels(settings.metrics_models)
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
    access_log = AccessLog() if settings.access_log else None
    default_limits = KeyLimits(parse_limits(settings.rate_limit), parse_limits(settings.token_limit))
    limits_by_key = {"": default_limits} | {
        key.name: key_limits(default_limits, key.rate_limit, key.token_limit) for key in file_keys
    }
    limiter: Limiter | None = None
    if settings.global_rate_limit or any(lim.requests or lim.tokens for lim in limits_by_key.values()):
        limiter = Limiter(
            settings.rate_limit_storage,
            settings.rate_limit_strategy,
            settings.global_rate_limit,
            settings.rate_limit_fail_closed,
            metrics.rate_limit_failures,
            metrics.rate_limited,
        )

    owners: Owners | None = None
    if auth.size > 1 and settings.object_secret is not None:  # preflight.check: set with several
        secret = settings.object_secret.get_secret_value().encode()
        owners = Owners(secret, records_for(settings.rate_limit_storage))
    endpoints = {
        spec: ProxyEndpoint(
            spec,
            router,
            admin if spec.admin else auth,
            settings,
            metrics,
            access_log,
            None if spec.admin else limiter,
            limits_by_key,
            owners,
        )
        for spec in ROUTES
        # Runtime admin routes exist only for admin keys; with none configured they are 404.
        if not spec.admin or admin.enabled
    }
    routes: list[BaseRoute] = [
        Route(spec.path, endpoint, methods=list(spec.methods)) for spec, endpoint in endpoints.items()
    ]
    # Without admin keys an admin route is 404 like any unknown one, not the 405 of a route
    # whose path it shares (POST /v1/models/load against GET /v1/models/{model}).
    routes += [
        Route(spec.path, _no_route, methods=list(spec.methods)) for spec in ROUTES if spec not in endpoints
    ]
    routes.append(Route("/health", health, methods=["GET"]))
    routes.append(Route("/ready", ready.endpoint, methods=["GET"]))
    if admin.enabled:
        routes.append(Route("/admin/backends", AdminBackends(router, admin).endpoint, methods=["GET"]))
    if admin.enabled or settings.metrics_token is not None:
        token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
        runtime_metrics = RuntimeMetrics(router, admin, token, settings.ready_timeout)
        routes.append(Route("/admin/backends/{name}/metrics", runtime_metrics.endpoint, methods=["GET"]))
    page = Page(metrics.render, settings.metrics_token)
    if settings.metrics_port is None:
        closed = auth.enabled and not settings.metrics_public
        routes.append(Route("/metrics", MetricsEndpoint(page, admin, closed).endpoint, methods=["GET"]))
        if closed and settings.metrics_token is None and not admin.enabled:
            logger.warning(
                "/metrics answers no one: with client keys it needs --metrics-token or an admin key "
                "(or --metrics-port, or --metrics-public to open it)"
            )
    if settings.docs:
        served = [
            spec
            for spec in endpoints
            if any(group.backend.adapter.answers(spec.name) for group in router.groups)
        ]
        document = openapi.document(
            served,
            auth=auth.enabled,
            admin=admin.enabled,
            metrics=settings.metrics_port is None,
        )
        docs = openapi.Docs(document)
        routes.append(Route("/openapi.json", docs.openapi, methods=["GET"]))
        routes.append(Route("/docs", docs.page, methods=["GET"]))
        routes.append(Route("/docs/{name}", docs.asset, methods=["GET"]))
        routes.append(Route("/redoc", docs.elsewhere, methods=["GET"]))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await router.open()
        if not auth.enabled:
            logger.warning("no API keys configured: the gateway is open to anyone who can reach it")
        if supervisor is not None:
            await supervisor.start()
        tasks = [asyncio.create_task(loop) for loop in router.loops()]
        reloading = _reload_on_sighup(router, settings)
        for group in router.groups:
            urls = ", ".join(replica.url for replica in group.replicas)
            logger.info(
                "forwarding to the %s backend (%s) at %s", group.name, group.backend.adapter.name, urls
            )
        try:
            yield
        finally:
            if reloading:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            for task in tasks:
                task.cancel()
            metrics.close()
            if access_log is not None:
                access_log.flush()
            if supervisor is not None:
                await supervisor.stop()
            if launch is not None and launch.listener is not None:
                launch.listener.close()
            await router.close()
            if owners is not None:
                await owners.records.close()

    app = GatewayApp(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception, Exception: _unhandled},
    )
    # The hot routes skip Starlette's middleware and route matching: a dict lookup instead.
    for spec, endpoint in endpoints.items():
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
    app.local_only = not auth.enabled and is_loopback(settings.host)
    app.state.settings = settings
    app.state.router = router
    app.state.backend = router.default.backend
    app.state.upstream = router.default.replicas[0].upstream if router.default.replicas else None
    app.state.supervisor = supervisor
    app.state.metrics = metrics
    app.state.metrics_page = page
    app.state.limiter = limiter
    app.state.owners = owners
    app.state.lifecycle = lifecycle
    return app


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
            if self.local_only and (refusal := _not_local(scope, self.cors is None)) is not None:
                await _render(refusal)(scope, receive, send)
                return
            if self.cors is not None:
                origin = requested = None
                preflight = False
                for name, value in scope["headers"]:
                    if name == b"origin":
                        origin = value
                    elif name == b"access-control-request-method":
                        preflight = True
                    elif name == b"access-control-request-headers":
                        requested = value
                if origin is not None:
                    if preflight and scope["method"] == "OPTIONS":
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


LOOPBACK_HOST = re.compile(rb"(localhost|127(\.[0-9]{1,3}){3}|\[::1\])(:[0-9]{1,5})?", re.IGNORECASE)


def _not_local(scope: Scope, check_origin: bool) -> GatewayError | None:
    """Why a request to an open gateway on loopback is refused, if it is."""
    host = origin = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
        elif name == b"origin":
            origin = value
    if host is None or not LOOPBACK_HOST.fullmatch(host):
        return MisdirectedRequest(
            "this gateway has no API keys and serves only requests to localhost, 127.0.0.1 or [::1]",
            code="not_loopback_host",
        )
    if check_origin and origin is not None:
        scheme = scope.get("scheme", "http").encode()
        if origin.lower() != scheme + b"://" + host.lower():
            return PermissionDenied(
                "cross-origin requests are refused: this gateway has no API keys and no --cors-origin",
                code="cross_origin",
            )
    return None


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
    assert isinstance(exc, HTTPException)
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
