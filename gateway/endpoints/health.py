"""Liveness (``/health``) and readiness (``/ready``); the operators' views are in
``gateway.endpoints.admin``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response

from adapters.base import Readiness
from gateway.client import ReadTimeout, UpstreamError
from gateway.core.errors import (
    BackendUnavailable,
    BackendUnreachable,
    GatewayError,
)
from gateway.fleet.replicas import EJECTED, LOADING, READY
from gateway.fleet.upstream import before_response_error
from gateway.routing.router import Router

JSON = "application/json"
CACHE_SECONDS = 1.0
"""How old an answer to a route that needs no key (readiness, metrics) may be."""


async def health(request: Request) -> Response:
    """200 while the process serves; it says nothing about the backend."""
    return Response(b'{"status":"ok"}', media_type=JSON)


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
        router = self.router
        if len(router.groups) == 1 and not router.default.probe_interval:
            # One backend that nothing probes in the background: asked here, at most once a second.
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
            self._fleet_probing = asyncio.ensure_future(router.health.probe_all(router.groups, self.timeout))
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
            adapter = backend.adapter
            status = await group.replicas[0].upstream.health(
                adapter.health_path, adapter.health_fallback_path, self.timeout
            )
        except UpstreamError as exc:
            error = before_response_error(exc, self.router.settings)
            if isinstance(error, BackendUnreachable):
                raise error from None
            if isinstance(exc, ReadTimeout):
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
