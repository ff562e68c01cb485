"""A gateway with no keys on loopback serves only its own machine's browser and programs: a
request must name a loopback host, and without CORS come from no other origin (a page on a
domain that resolves to 127.0.0.1, DNS rebinding, must not drive it)."""

from __future__ import annotations

import re

from gateway.core.asgi import Scope
from gateway.core.errors import GatewayError, MisdirectedRequest, PermissionDenied

LOOPBACK_HOST = re.compile(rb"(localhost|127(\.[0-9]{1,3}){3}|\[::1\])(:[0-9]{1,5})?", re.IGNORECASE)


def not_local(scope: Scope, check_origin: bool) -> GatewayError | None:
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
