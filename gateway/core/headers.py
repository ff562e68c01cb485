"""Which headers cross the gateway, in each direction."""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.core.errors import InvalidRequest

# RFC 9110 7.6.1, plus Proxy-Connection which some clients still send.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers the gateway consumes or sets itself. Expect is answered by the server in
# front of the app; the backend is sent the body without waiting.
NOT_FORWARDED = HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"x-api-key",
    b"content-length",
    b"x-request-id",
    b"x-forwarded-for",
    b"expect",
    # A client's cookies are for the gateway's origin, not the backend's.
    b"cookie",
    # W3C Trace Context: passed on as sent, unless the gateway's own trace replaces it.
    b"traceparent",
    b"tracestate",
}
# What a proxy says of the client and the request it received: forwarded only from proxies
# the gateway trusts (--trust-forwarded), else replaced by the gateway's own view.
FORWARDING = frozenset(
    {
        b"forwarded",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-real-ip",
    }
)
NOT_FORWARDED = NOT_FORWARDED | FORWARDING
# The gateway's own: a backend's (another gateway's, or a forged one) never stands beside them.
NOT_RETURNED = HOP_BY_HOP | {b"x-request-id", b"x-gateway-backend"}
# Statuses whose answers never have a body (RFC 9110 6.4.1): their framing headers go too.
BODILESS = frozenset({204, 304})
NOT_RETURNED_BODILESS = NOT_RETURNED | {b"content-length"}

SSE = b"text/event-stream"
# Tell nginx-style proxies in front of the gateway not to buffer a stream either.
SSE_HEADERS = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))
SSE_HEADER_NAMES = frozenset(name for name, _ in SSE_HEADERS)
REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")


@dataclass(slots=True)
class RequestHeaders:
    """A client's headers, split into what is forwarded and what the gateway reads."""

    forward: list[tuple[bytes, bytes]] = field(default_factory=list)
    authorization: bytes | None = None
    x_api_key: bytes | None = None
    request_id: bytes | None = None
    content_length: bytes | None = None
    forwarded_for: bytes | None = None
    forwarding: list[tuple[bytes, bytes]] = field(default_factory=list)
    """What a proxy in front said of the client (``FORWARDING``), kept aside."""
    repeated: bytes | None = None
    """A credentials header sent more than once (the request is refused)."""
    traceparent: bytes | None = None
    """W3C Trace Context: passed on as sent, or replaced where the gateway traces. Sent more
    than once, it is invalid (empty)."""
    tracestate: bytes | None = None


def split_request_headers(raw: Iterable[tuple[bytes, bytes]]) -> RequestHeaders:
    """One pass over the ASGI headers (names already lower-case)."""
    headers = RequestHeaders()
    forward = headers.forward
    connection: list[bytes] = []
    for name, value in raw:
        if name not in NOT_FORWARDED:
            forward.append((name, value))
        elif name == b"authorization":
            if headers.authorization is not None:
                headers.repeated = name
            headers.authorization = value
        elif name == b"x-api-key":
            if headers.x_api_key is not None:
                headers.repeated = name
            headers.x_api_key = value
        elif name == b"x-request-id":
            headers.request_id = value
        elif name == b"content-length":
            headers.content_length = value
        elif name == b"x-forwarded-for":
            previous = headers.forwarded_for
            headers.forwarded_for = value if previous is None else previous + b", " + value
        elif name == b"connection":
            connection.extend(value.split(b","))
        elif name == b"traceparent":
            headers.traceparent = value if headers.traceparent is None else b""
        elif name == b"tracestate":
            previous = headers.tracestate
            headers.tracestate = value if previous is None else previous + b"," + value
        elif name in FORWARDING:
            headers.forwarding.append((name, value))
    if connection and (drop := connection_listed(connection) - NOT_FORWARDED):
        headers.forward = [(k, v) for k, v in forward if k not in drop]
    return headers


def response_headers(
    status: int, raw: Iterable[tuple[bytes, bytes]], added: list[tuple[bytes, bytes]]
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The backend's headers as they go to the client, with ``added``, and whether the body is SSE.

    The backend's Connection header names only the backend's own headers, never one the
    gateway adds. A 204 or 304 answer goes without framing headers: it has no body.
    """
    headers: list[tuple[bytes, bytes]] = []
    streaming = False
    connection: list[bytes] = []
    skip = NOT_RETURNED if status not in BODILESS else NOT_RETURNED_BODILESS
    for name, value in raw:
        name = name.lower()
        if name in skip:
            if name == b"connection":
                connection.extend(value.split(b","))
            continue
        if name == b"content-type" and value.startswith(SSE):
            streaming = True
        headers.append((name, value))
    # Connection: keep-alive (or close) names nothing left to drop.
    if connection and (drop := connection_listed(connection) - skip):
        headers = [h for h in headers if h[0] not in drop]
    if streaming:
        headers = [h for h in headers if h[0] not in SSE_HEADER_NAMES]
        headers.extend(SSE_HEADERS)
    return added + headers, streaming


def connection_listed(tokens: list[bytes]) -> set[bytes]:
    """Header names a Connection header declares hop-by-hop (RFC 9110 7.6.1)."""
    return {token.strip().lower() for token in tokens}


class TrustedProxies:
    """The proxies in front (``--trust-forwarded``) whose forwarding headers are believed."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(network, strict=False) for network in networks]

    def __call__(self, peer: str) -> bool:
        if not self.networks:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.networks)


def single_header(raw: Iterable[tuple[bytes, bytes]], wanted: bytes) -> bytes | None:
    """The one value of a header that must not be repeated (credentials): InvalidRequest when
    it is, so that no two readers of a request can see different keys."""
    found: bytes | None = None
    for name, value in raw:
        if name == wanted:
            if found is not None:
                raise InvalidRequest(f"several {wanted.decode()} headers: send one", code="duplicate_header")
            found = value
    return found


def valid_request_id(value: bytes | None) -> bytes:
    if value and REQUEST_ID.fullmatch(value):
        return value
    # Unique, not secret: the generator Python reseeds in a forked child, with no system call.
    return b"%032x" % random.getrandbits(128)
