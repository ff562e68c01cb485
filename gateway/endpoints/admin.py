"""Operators' views of the backends (admin keys): ``/admin/backends``, every backend and
replica as the gateway sees it, and ``/admin/backends/{name}/metrics``, a runtime's own
metrics (admin keys or the metrics token)."""

from __future__ import annotations

import hmac
import re

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.client import UpstreamError
from gateway.core.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    GatewayError,
    InvalidRequest,
    NotFound,
    Unsupported,
)
from gateway.core.headers import single_header
from gateway.fleet.replicas import Replica
from gateway.fleet.upstream import before_response_error
from gateway.observability.metrics import CONTENT_TYPE
from gateway.routing.router import Router
from gateway.tenancy.auth import Authenticator

JSON = "application/json"
REPLICA_INDEX = re.compile(r"[0-9]{1,6}")


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
                status, body = await replica.upstream.fetch("GET", path, self.timeout)
            except UpstreamError as exc:
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
