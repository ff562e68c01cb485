"""Liveness (``/health``) and readiness (``/ready``)."""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from adapters.base import Readiness
from gateway.backend import Backend
from gateway.client import ReadTimeout
from gateway.errors import BackendUnavailable, BackendUnreachable, GatewayError
from gateway.upstream import UPSTREAM_ERRORS, Upstream, before_response_error

JSON = "application/json"


async def health(request: Request) -> Response:
    """200 while the process serves; it says nothing about the backend."""
    return Response(b'{"status":"ok"}', media_type=JSON)


class Lifecycle:
    """Whether the process is draining: told to stop, finishing what it has."""

    def __init__(self) -> None:
        self.draining = False

    def not_ready_reason(self) -> str | None:
        return "the gateway is shutting down" if self.draining else None


class ReadyEndpoint:
    """200 only when the backend answers its health probe; 503 in the envelope otherwise."""

    def __init__(self, backend: Backend, upstream: Upstream, timeout: float) -> None:
        self.backend = backend
        self.upstream = upstream
        self.timeout = timeout
        self.gates: list[tuple[Callable[[], str | None], str]] = []
        """(check, error code): each check says why the gateway cannot be ready (shutting
        down, an embedded backend loading), or None."""

    async def endpoint(self, request: Request) -> Response:
        try:
            for check, code in self.gates:
                if reason := check():
                    raise BackendUnavailable(reason, code=code)
            await self.probe()
        except GatewayError as exc:
            return Response(exc.body(), status_code=503, media_type=JSON)
        return Response(b'{"status":"ready","backend":"%s"}' % self.backend.name.encode(), media_type=JSON)

    async def is_ready(self) -> bool:
        try:
            await self.probe()
        except GatewayError:
            return False
        return True

    async def probe(self) -> None:
        backend = self.backend
        headers = backend.own_headers()
        pool = self.upstream.pool
        try:
            status, _ = await pool.fetch("GET", backend.adapter.health_path, headers, self.timeout)
            fallback = backend.adapter.health_fallback_path
            if status == 404 and fallback is not None:
                status, _ = await pool.fetch("GET", fallback, headers, self.timeout)
        except UPSTREAM_ERRORS as exc:
            error = before_response_error(exc, self.upstream.settings)
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
