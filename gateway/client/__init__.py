"""A small HTTP/1.1 client for the backends: keep-alive connections and streamed bodies.

The gateway sends each request to a known origin and passes bodies on as they are, so it
needs little of a general client: no cookies, redirects, decompression, proxies or header
rewriting. What it needs is to be cheap per request and per chunk. Responses are parsed by
httptools (llhttp, the parser behind uvicorn and Node.js). Measured against aiohttp's
client in the same minimal proxy, this takes a third of the CPU time per request (docs/
performance.md).

Its parts, as httpcore has them: ``errors`` (the tree, and nothing else escapes),
``models`` (origin, body, request head), ``pool`` (keep-alive connections to one origin),
``connection`` (one HTTP/1.1 connection) and ``response`` (a response as it arrives).
"""

from gateway.client.connection import Connection, State
from gateway.client.errors import (
    BadResponse,
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    HeadTimeout,
    PoolTimeout,
    ReadTimeout,
    TooLarge,
    UpstreamError,
)
from gateway.client.models import Body, Headers, Origin
from gateway.client.pool import MAX_HEAD_BYTES, MAX_HEADERS, MAX_READ_BYTES, Pool
from gateway.client.response import HIGH_WATER, Response

__all__ = [
    "HIGH_WATER",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "MAX_READ_BYTES",
    "BadResponse",
    "Body",
    "ConnectFailed",
    "ConnectTimeout",
    "Connection",
    "Disconnected",
    "HeadTimeout",
    "Headers",
    "Origin",
    "Pool",
    "PoolTimeout",
    "ReadTimeout",
    "Response",
    "State",
    "TooLarge",
    "UpstreamError",
]
