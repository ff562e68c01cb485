"""Liveness (``/health``) and readiness (``/ready``)."""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response

from adapters.base import Readiness
from gateway.auth import Authenticator
from gateway.client import ReadTimeout
from gateway.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    BackendUnreachable,
    GatewayError,
    InvalidRequest,
    NotFound,
    Unsupported,
)
from gateway.headers import single_header
from gateway.metrics import CONTENT_TYPE
from gateway.replicas import EJECTED, LOADING, READY, Replica
from gateway.routing import Router, health_status
from gateway.upstream import UPSTREAM_ERRORS, before_response_error

JSON = "application/json"
REPLICA_INDEX = re.compile(r"[0-9]{1,6}")
CACHE_SECONDS = 1.0
"""How old an answer to a route that needs no key (readiness, metrics) may be."""


async def health(request: Request) -> Response:
    """200 while the process serves; it says nothing about the backend."""
    return Response(b'{"status":"ok"}', media_type=JSON)


class Lifecycle:
    """Whether the process is draining: told to stop, finishing what it has."""

    def __init__(self) -> None:
        self.draining = False
        self.failed: str | None = None
        """Why the gateway stops on its own (its embedded backend cannot start)."""

    def not_ready_reason(self) -> str | None:
        if self.failed is not None:
            return f"the gateway is stopping: {self.failed}"
        return "the gateway is shutting down" if self.draining else None


class ReadyEndpoint:
    """200 when the backend answers its health probe (with several backends: when at least one
    has a ready replica); 503 in the envelope otherwise."""

    def __init__(self, router: Router, timeout: float) -> None:
        self.router = router
        self.timeout = timeout
        self.gates: list[tuple[Callable[[], str | None], str]] = []
        """(check, error code): each check says why the gateway cannot be ready (shutting
        down, an embedded backend loading), or None."""
        self._probing: asyncio.Future[GatewayError | None] | None = None
        self._probed_at = 0.0
        self._fleet_probing: asyncio.Future[None] | None = None
        self._fleet_probed_at = 0.0

    async def endpoint(self, request: Request) -> Response:
        for check, code in self.gates:
            if reason := check():
                return Response(
                    BackendUnavailable(reason, code=code).body(), status_code=503, media_type=JSON
                )
        if self.router.single:
            error = await self.readiness()
            if error is not None:
                return Response(error.body(), status_code=503, media_type=JSON)
            body = b'{"status":"ready","backend":"%s"}' % self.router.default.name.encode()
            return Response(body, media_type=JSON)
        return await self._fleet()

    async def readiness(self) -> GatewayError | None:
        """Why the one backend is not ready (None: it is), from a probe at most a second old.

        ``/ready`` needs no key, so however often it is asked, one probe is in flight at a
        time and its answer serves every caller for a second: a flood of calls is not a
        flood of probes, nor of the backend's pool.
        """
        probing = self._probing
        if probing is None or (probing.done() and time.monotonic() - self._probed_at >= CACHE_SECONDS):
            probing = self._probing = asyncio.ensure_future(self._probe_once())
        return await asyncio.shield(probing)

    async def _probe_once(self) -> GatewayError | None:
        try:
            await self.probe()
        except GatewayError as exc:
            return exc
        finally:
            self._probed_at = time.monotonic()
        return None

    async def _fleet(self) -> Response:
        """Several backends: ready while any one has a ready replica, so that one backend
        down does not take every gateway out of its Service."""
        router = self.router
        # One round of probes at a time, and at most one a second however often /ready is
        # asked (it needs no key: it must not multiply into probes of every replica).
        now = time.monotonic()
        if self._fleet_probing is None or (
            self._fleet_probing.done() and now - self._fleet_probed_at >= CACHE_SECONDS
        ):
            self._fleet_probing = asyncio.ensure_future(router.probe_all(self.timeout))
            self._fleet_probed_at = now
        await asyncio.shield(self._fleet_probing)
        now = time.monotonic()
        backends = {}
        for group in router.groups:
            states = [replica.state(now) for replica in group.replicas]
            backends[group.name] = {
                "ready": states.count(READY),
                "replicas": len(states),
                "loading": states.count(LOADING),
                "ejected": states.count(EJECTED),
            }
        if any(state["ready"] for state in backends.values()):
            return Response(orjson.dumps({"status": "ready", "backends": backends}), media_type=JSON)
        error = BackendUnavailable("no backend has a ready replica", code="no_ready_backend")
        body = orjson.dumps({**orjson.loads(error.body()), "backends": backends})
        return Response(body, status_code=503, media_type=JSON)

    async def is_ready(self) -> bool:
        return await self.readiness() is None

    async def probe(self) -> None:
        """Probe the one backend's replica, raising the reason it is not ready."""
        group = self.router.default
        backend = group.backend
        try:
            status = await health_status(backend, group.replicas[0], self.timeout)
        except UPSTREAM_ERRORS as exc:
            error = before_response_error(exc, self.router.settings)
            if isinstance(error, BackendUnreachable):
                raise error from None
            if isinstance(exc, TimeoutError | ReadTimeout):
                raise BackendUnavailable(
                    f"backend health probe got no answer within {self.timeout:g} s",
                    code="backend_timeout",
                ) from None
            raise BackendUnavailable(f"backend health probe failed: {error.message}") from None
        state = backend.adapter.readiness(status)
        if state is Readiness.LOADING:
            raise BackendUnavailable("backend loading", code="backend_loading")
        if state is Readiness.FAILING:
            raise BackendUnavailable(f"backend health probe answered {status}", code="backend_unhealthy")


class AdminBackends:
    """``GET /admin/backends`` (admin keys): every backend and replica as the gateway sees it."""

    def __init__(self, router: Router, admin: Authenticator) -> None:
        self.router = router
        self.admin = admin

    async def endpoint(self, request: Request) -> Response:
        try:
            _authenticate_admin(self.admin, request)
        except GatewayError as exc:
            return Response(exc.body(), status_code=exc.status, headers=exc.headers, media_type=JSON)
        body = {"object": "list", "data": self.router.describe()}
        return Response(orjson.dumps(body), media_type=JSON)


class RuntimeMetrics:
    """``GET /admin/backends/{name}/metrics``: a runtime's own Prometheus metrics, for
    operators (admin keys, or the metrics token), never for client keys.

    From the replica ``?replica=N`` (0 first, the order of ``/admin/backends``), else the
    first one that is not ejected. Capped at ``--backend-max-read-bytes``.
    """

    def __init__(
        self, router: Router, admin: Authenticator, metrics_token: str | None, timeout: float
    ) -> None:
        self.router = router
        self.admin = admin
        self.token = f"Bearer {metrics_token}".encode() if metrics_token else None
        self.timeout = timeout

    async def endpoint(self, request: Request) -> Response:
        try:
            self._authenticate(request)
            group = self.router.group(request.path_params["name"])
            if group is None:
                raise NotFound(
                    f"no backend named {request.path_params['name'][:256]!r}", code="backend_not_found"
                )
            path = group.backend.adapter.metrics_path
            if path is None:
                raise Unsupported(f"the {group.name} backend has no metrics route", code="unsupported_route")
            replica = self._replica(group.replicas, request.query_params.get("replica"))
            try:
                status, body = await replica.upstream.pool.fetch(
                    "GET", path, group.backend.own_headers(), self.timeout
                )
            except UPSTREAM_ERRORS as exc:
                raise before_response_error(exc, self.router.settings) from None
        except GatewayError as exc:
            return Response(exc.body(), status_code=exc.status, headers=exc.headers, media_type=JSON)
        headers = {"x-gateway-backend": group.name}
        return Response(body, status_code=status, headers=headers, media_type=CONTENT_TYPE)

    def _authenticate(self, request: Request) -> None:
        authorization = single_header(request.scope["headers"], b"authorization")
        if (
            self.token is not None
            and authorization is not None
            and hmac.compare_digest(authorization, self.token)
        ):
            return
        if not self.admin.enabled:
            raise AuthenticationFailed("this route needs the metrics token", code="invalid_metrics_token")
        _authenticate_admin(self.admin, request)

    @staticmethod
    def _replica(replicas: list[Replica], asked: str | None) -> Replica:
        if asked is not None:
            if not REPLICA_INDEX.fullmatch(asked):
                raise InvalidRequest(
                    f"replica must be a replica's index, 0 to {len(replicas) - 1}: got {asked[:32]!r}",
                    code="invalid_replica",
                    param="replica",
                )
            if int(asked) >= len(replicas):
                raise NotFound(f"no replica {asked!r}: {len(replicas)} known", code="replica_not_found")
            return replicas[int(asked)]
        for replica in replicas:
            if not replica.ejected:
                return replica
        if not replicas:
            raise BackendUnavailable("no replica of this backend is known yet")
        return replicas[0]


def _authenticate_admin(admin: Authenticator, request: Request) -> None:
    """Admin keys, read as the proxy reads client keys: one header of each kind at most."""
    raw = request.scope["headers"]
    admin.authenticate(single_header(raw, b"authorization") or None, single_header(raw, b"x-api-key") or None)
