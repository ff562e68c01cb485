"""Errors the gateway answers with, and the one envelope they are rendered to.

Every error a client sees from the gateway itself is a ``GatewayError`` rendered as
``{"error": {"type": ..., "message": ..., "code": ..., "param": ...}}``::

    GatewayError
    ├── InvalidRequest        400 invalid_request
    ├── AuthenticationFailed  401 authentication_error
    ├── PermissionDenied      403 permission_denied
    ├── NotFound              404 not_found
    ├── MethodNotAllowed      405 method_not_allowed
    ├── RequestTimeout        408 request_timeout (the connection is closed)
    ├── RequestTooLarge       413 request_too_large
    │   └── RequestHeadTooLarge   431 request_too_large (the connection is closed)
    ├── MisdirectedRequest    421 misdirected_request
    ├── RateLimited           429 rate_limit_exceeded (retry-after)
    ├── RateLimitUnavailable  503 rate_limit_unavailable (the limits' storage is down)
    ├── Overloaded            503 overloaded (retry-after: the fleet is full, the wait too long)
    ├── Unsupported           501 unsupported (x-should-retry: false)
    ├── BackendError
    │   ├── BackendUnreachable    502 backend_unreachable
    │   ├── BackendBadResponse    502 backend_error
    │   ├── BackendTimeout        504 backend_timeout
    │   └── BackendUnavailable    503 backend_unavailable
    └── InternalError         500 internal_error

Errors a backend answers with are not GatewayErrors: their status is kept and their body put
in the same envelope (``adapters.normalise.error_body``). On Anthropic's routes
(``/v1/messages``) both are rendered in Anthropic's envelope instead,
``{"type": "error", "error": {"type": ..., "message": ...}}``, with Anthropic's types.
"""

from __future__ import annotations

from typing import ClassVar

import orjson

from adapters.normalise import anthropic_type


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    default_headers: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.headers = {**self.default_headers, **(headers or {})}

    def body(self) -> bytes:
        return envelope(self.type, self.message, code=self.code, param=self.param)

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """Headers for an error answered before any byte of a response was sent."""
        headers = [(b"content-type", b"application/json")]
        headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items())
        return headers


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    type = "request_timeout"


class RequestTooLarge(GatewayError):
    status = 413
    type = "request_too_large"


class RequestHeadTooLarge(RequestTooLarge):
    status = 431


class MisdirectedRequest(GatewayError):
    status = 421
    type = "misdirected_request"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_exceeded"


class RateLimitUnavailable(GatewayError):
    status = 503
    type = "rate_limit_unavailable"


class Overloaded(GatewayError):
    """Flow control refused the request: its backend's queue was full, or it waited longer
    than the queue's timeout (``code`` says which). Retry-After says when to come back."""

    status = 503
    type = "overloaded"


class Unsupported(GatewayError):
    status = 501
    type = "unsupported"
    # The OpenAI SDKs retry 5xx answers unless told not to; a 501 never heals.
    default_headers: ClassVar[dict[str, str]] = {"x-should-retry": "false"}


class InternalError(GatewayError):
    status = 500
    type = "internal_error"


class BackendError(GatewayError):
    """The backend could not be used; raised before or during a response."""

    status = 502
    type = "backend_error"


class BackendUnreachable(BackendError):
    status = 502
    type = "backend_unreachable"


class BackendBadResponse(BackendError):
    status = 502
    type = "backend_error"


class BackendTimeout(BackendError):
    status = 504
    type = "backend_timeout"


class BackendUnavailable(BackendError):
    status = 503
    type = "backend_unavailable"


def envelope(type_: str, message: str, *, code: str | None = None, param: str | None = None) -> bytes:
    error: dict[str, str | None] = {"type": type_, "message": message, "code": code, "param": param}
    return orjson.dumps({"error": error})


def anthropic_envelope(status: int, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": anthropic_type(status), "message": message}})


def sse_error_event(error: GatewayError) -> bytes:
    """The final event of a stream the backend broke off after its first byte."""
    return b"data: " + error.body() + b"\n\n"
