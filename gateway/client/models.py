"""Where requests go and what they carry: the origin, the body, the request head."""

from __future__ import annotations

import re
from collections.abc import AsyncIterable
from dataclasses import dataclass
from urllib.parse import urlsplit

# What a request target must not hold; bytes above 0x7f pass as the client sent them.
BREAKS_REQUEST_LINE = re.compile(r"[\x00-\x20\x7f]")
# Methods whose requests carry a body: an empty one is sent with Content-Length: 0.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Requests that may be sent again when a reused connection fails before any answer byte
# (RFC 9110 9.2.2, and Go's net/http rule: an Idempotency-Key header makes any method so).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
IDEMPOTENCY_KEY = b"idempotency-key"

Body = bytes | AsyncIterable[bytes] | None
Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: scheme, host, port and a path prefix taken from a base URL."""

    host: str
    port: int
    tls: bool
    prefix: str
    host_header: bytes

    @classmethod
    def from_url(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"backend URL must be http:// or https:// with a host: {url!r}")
        tls = parts.scheme == "https"
        default = 443 if tls else 80
        port = parts.port or default
        host = parts.hostname
        shown = host if host.isascii() else host.encode("idna").decode("ascii")
        shown = f"[{shown}]" if ":" in shown else shown
        host_header = shown if port == default else f"{shown}:{port}"
        return cls(host, port, tls, parts.path.rstrip("/"), host_header.encode("ascii"))


def repeatable(method: str, headers: Headers, body: Body) -> bool:
    """Whether a request that got no answer may be sent again."""
    if not (body is None or isinstance(body, bytes)):
        return False  # a streamed body is gone once sent
    return method in IDEMPOTENT_METHODS or any(name.lower() == IDEMPOTENCY_KEY for name, _ in headers)


def request_head(
    method: str, origin: Origin, target: str, headers: Headers, body: Body
) -> tuple[bytes, bool]:
    """The request line and headers, and whether the body goes chunked.

    Host comes first, then ``headers`` as they are, then the framing header this adds: the
    length of a bytes body (or 0 for a body method without one), chunked for an iterable
    body unless ``headers`` give a Content-Length.
    """
    start = f"{method} {origin.prefix}{target} HTTP/1.1\r\n".encode("latin-1")
    lines = [start, b"host: %s\r\n" % origin.host_header]
    has_length = False
    for name, value in headers:
        if name == b"content-length":
            has_length = True
        lines.append(b"%s: %s\r\n" % (name, value))
    chunked = False
    if isinstance(body, bytes):
        if not has_length:
            lines.append(b"content-length: %d\r\n" % len(body))
    elif body is None:
        if method in BODY_METHODS and not has_length:
            lines.append(b"content-length: 0\r\n")
    elif not has_length:
        chunked = True
        lines.append(b"transfer-encoding: chunked\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), chunked
