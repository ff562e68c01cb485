"""CORS, for web apps that call the gateway from a browser; off unless origins are configured.

With ``--cors-origin`` set, a preflight (``OPTIONS`` with ``Access-Control-Request-Method``)
from an allowed origin is answered by the gateway itself, without a key: browsers send
preflights without credentials. Every other answer to an allowed origin carries
``Access-Control-Allow-Origin`` and exposes the headers a client reads (``x-request-id``,
the rate-limit headers, ``x-gateway-backend``). A backend's own ``Access-Control-*``
headers are dropped: two sets would make the browser refuse the answer. An origin not
allowed gets no CORS headers at all (its preflight a 403), so its browser blocks the call.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from gateway.core.asgi import Message, Scope, Send

METHODS = b"GET, POST, HEAD, OPTIONS"
EXPOSED = (
    b"x-request-id, x-gateway-backend, retry-after, retry-after-ms, x-should-retry, "
    b"x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, "
    b"x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens"
)
MAX_AGE = b"600"
# A header list as browsers send it: tokens separated by commas (RFC 9110 field names).
HEADER_LIST = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:\s*,\s*[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*$")


class Cors:
    def __init__(self, origins: Iterable[str], credentials: bool = False) -> None:
        allowed = {origin.rstrip("/") for origin in origins}
        self.any = "*" in allowed
        self.origins = {origin.encode("latin-1") for origin in allowed - {"*"}}
        self.credentials = credentials

    def allows(self, origin: bytes) -> bool:
        return self.any or origin in self.origins

    def _origin_headers(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        if self.any and not self.credentials:
            headers = [(b"access-control-allow-origin", b"*")]
        else:
            headers = [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
        if self.credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers

    def scan(self, scope: Scope) -> tuple[bytes | None, bytes | None, bool]:
        """A request's ``Origin``, its ``Access-Control-Request-Headers``, and whether it is a
        preflight (``OPTIONS`` with ``Access-Control-Request-Method``)."""
        origin = requested = None
        preflight = False
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                preflight = True
            elif name == b"access-control-request-headers":
                requested = value
        return origin, requested, preflight and scope["method"] == "OPTIONS"

    async def preflight(self, origin: bytes, requested: bytes | None, send: Send) -> None:
        """Answer a preflight: 204 with what may be sent, or 403 for an origin not allowed."""
        if not self.allows(origin):
            body = b'{"error":{"type":"forbidden","message":"this origin may not call the gateway"}}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body)),
                        (b"vary", b"Origin"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        headers = self._origin_headers(origin)
        headers += [(b"access-control-allow-methods", METHODS), (b"access-control-max-age", MAX_AGE)]
        if requested and HEADER_LIST.match(requested.strip()):
            # Whatever the client library sends (the OpenAI SDKs add x-stainless-* headers).
            headers.append((b"access-control-allow-headers", requested.strip()))
        headers.append((b"content-length", b"0"))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    def wrap(self, send: Send, origin: bytes) -> Send:
        """``send`` with the CORS headers added to the answer's start (allowed origins only)."""
        if not self.allows(origin):
            return send
        added = [*self._origin_headers(origin), (b"access-control-expose-headers", EXPOSED)]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if not h[0].startswith(b"access-control-")]
                message["headers"] = headers + added
            await send(message)

        return send_with_cors
