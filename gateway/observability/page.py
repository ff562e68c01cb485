"""``/metrics`` as served: the page rendered at most once a second, and the main port's
endpoint with who may read it."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import Response

from gateway.core.errors import AuthenticationFailed, GatewayError
from gateway.core.headers import single_header
from gateway.observability.metrics import CONTENT_TYPE
from gateway.tenancy.auth import Authenticator


class Page:
    """The rendered metrics, made at most once a second however often they are asked for:
    a render holds the event loop for milliseconds, and ``/metrics`` may need no key."""

    def __init__(self, render: Callable[[], bytes], token: SecretStr | None, max_age: float = 1.0) -> None:
        self.render = render
        self.expected = f"Bearer {token.get_secret_value()}".encode() if token else None
        self.max_age = max_age
        self._body = b""
        self._rendered_at = -max_age

    def body(self) -> bytes:
        now = time.monotonic()
        if now - self._rendered_at >= self.max_age:
            self._body = self.render()
            self._rendered_at = time.monotonic()
        return self._body

    def allowed(self, authorization: bytes | None) -> bool:
        return self.expected is None or (
            authorization is not None and hmac.compare_digest(authorization, self.expected)
        )


DENIED = AuthenticationFailed("/metrics needs the metrics token", code="invalid_metrics_token")
DENIED_CLOSED = AuthenticationFailed(
    "/metrics needs the metrics token or an admin key", code="invalid_metrics_token"
)


class MetricsEndpoint:
    """``GET /metrics`` on the main port: behind its bearer token when one is set; else, when
    ``closed`` (client keys are configured: it names their keys, models, token totals and
    replica URLs), behind an admin key; else open. An admin key opens it either way."""

    def __init__(self, page: Page, admin: Authenticator | None = None, closed: bool = False) -> None:
        self.page = page
        self.admin = admin if admin is not None and admin.enabled else None
        self.closed = closed and page.expected is None

    async def endpoint(self, request: Request) -> Response:
        try:
            authorization = single_header(request.scope["headers"], b"authorization")
            x_api_key = single_header(request.scope["headers"], b"x-api-key")  # refused when repeated
        except GatewayError as exc:
            return Response(exc.body(), status_code=exc.status, media_type="application/json")
        if (self.closed or not self.page.allowed(authorization)) and not self._admin(
            authorization, x_api_key
        ):
            denied = DENIED_CLOSED if self.closed or self.admin is not None else DENIED
            return Response(denied.body(), status_code=401, media_type="application/json")
        return Response(self.page.body(), media_type=CONTENT_TYPE)

    def _admin(self, authorization: bytes | None, x_api_key: bytes | None) -> bool:
        if self.admin is None:
            return False
        try:
            return self.admin.authenticate(authorization, x_api_key) is not None
        except AuthenticationFailed:
            return False
