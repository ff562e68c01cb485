"""Property-based fuzzing of client requests, as raw bytes, into the gateway.

Hypothesis draws request heads and bodies an attacker would send: odd methods and
targets, duplicate or conflicting framing headers (the request-smuggling classics:
Content-Length with Transfer-Encoding, two lengths, obfuscated chunked), bad chunk
sizes, control bytes in headers, bodies shorter or longer than declared, pipelined
requests. Whatever it draws, the gateway answers each request with a well-formed HTTP/1.1
response that is not a 500 of its own, or closes the connection; and every request that
reaches the backend is one well-framed request, never two, never a smuggled one.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
from collections.abc import Iterator, Sequence
from typing import TypeVar

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import GatewayFactory
from tests.support.raw import JSON_OK, RawBackend, RawClient, Reply, Request

T = TypeVar("T")

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5]\d\d) [^\r\n]*\r\n")
EXAMPLE_TAGS = itertools.count()
SMUGGLED = b"GET /v1/admin-smuggled HTTP/1.1\r\nhost: x\r\n\r\n"

# Each request starts valid (POST /v1/chat/completions, HTTP/1.1, a key, a JSON body with
# its Content-Length) and hypothesis swaps in hostile variants, a few at a time, so that
# the variants are tried both alone, where they reach the backend, and together.
METHODS = [b"GET", b"HEAD", b"PUT", b"OPTIONS", b"DELETE", b"BREW", b"G\x00T", b"post"]
TARGETS = [
    b"/v1/models",
    b"/v1/embeddings",
    b"/v1/models/a%2F..%2F..%2Fadmin",
    b"/v1/models/../../admin",
    b"/v1/audio/transcriptions",
    b"*",
    b"http://evil.example/v1/models",
    b"/v1/chat/completions?x=\xff",
    b"/v1//chat/completions",
    b"/v1/chat/completions#frag",
]
VERSIONS = [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTX/1.1", b"HTTP/1.10"]
BODIES = [b"", b"[1]", b"not json", b'{"model":"m"}' + SMUGGLED, b'{"model":"m"}\r\n\r\n' + SMUGGLED]
FRAMING = [
    [],
    [b"transfer-encoding: chunked"],
    [b"content-length: {n}", b"content-length: {n}"],
    [b"content-length: {n}", b"content-length: {m}"],
    [b"content-length: {n}", b"transfer-encoding: chunked"],
    [b"transfer-encoding: chunked", b"content-length: {n}"],
    [b"transfer-encoding: chunked, identity"],
    [b"transfer-encoding: identity, chunked"],
    [b"transfer-encoding: xchunked"],
    [b"transfer-encoding:\tchunked"],
    [b"transfer-encoding : chunked"],
    [b"transfer-encoding: chunked", b"transfer-encoding: chunked"],
    [b"content-length: +{n}"],
    [b"content-length: {n}, {n}"],
    [b"content-length: {n}0000000000000000000000"],
    [b"content-length: -1"],
    [b"content-length: 0x10"],
]
CHUNKED = ["bad-size", "no-end", "smuggle", "extension", "huge-size", "lf-only"]
DECLARED = [-3, 3, 1000, 5000]
EXTRA = [
    b"x-api-key: sk-test-1",
    b"authorization: Bearer wrong",
    b"authorization: Bearer sk-test-1\r\nauthorization: Bearer wrong",
    b"content-type: multipart/form-data; boundary=b",
    b"expect: 100-continue",
    b"connection: close",
    b"connection: keep-alive, authorization",
    b"connection: content-length",
    b"x-request-id: \x01bad",
    b"x-bad\x01name: 1",
    b"x-folded: a\r\n b",
    b"host: a\r\nhost: b",
    b"x-forwarded-for: 1.2.3.4",
    b"upgrade: websocket\r\nconnection: upgrade",
    b"te: trailers",
    b"x-long: " + b"a" * 8000,
    b"\x00: nul",
    b"x-lf-only: 1\nx-smuggled: 1",
]


def sometimes(draw: st.DrawFn, usual: T, variants: Sequence[T]) -> T:
    """``usual``, or one of ``variants`` about a time in four."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(variants))
    return usual


@st.composite
def client_requests(draw: st.DrawFn) -> bytes:
    method: bytes = sometimes(draw, b"POST", METHODS)
    target: bytes = sometimes(draw, b"/v1/chat/completions", TARGETS)
    version: bytes = sometimes(draw, b"HTTP/1.1", VERSIONS)
    body: bytes = sometimes(draw, b'{"model":"m"}', BODIES)
    framing: list[bytes] = sometimes(draw, [b"content-length: {n}"], FRAMING)
    declared = len(body) + sometimes(draw, 0, DECLARED)
    chunked: str = sometimes(draw, "good", CHUNKED)
    auth = b"authorization: Bearer sk-test-1" if draw(st.integers(0, 7)) else b""
    extra = draw(st.lists(st.sampled_from(EXTRA), max_size=2)) if draw(st.integers(0, 2)) == 0 else []
    pipelined = draw(st.booleans())

    head = [method + b" " + target + b" " + version, b"host: gateway", b"content-type: application/json"]
    for line in framing:
        head.append(line.replace(b"{n}", b"%d" % max(declared, 0)).replace(b"{m}", b"%d" % (declared + 5)))
    head += [auth] if auth else []
    head += extra
    if any(b"chunked" in line for line in framing):
        sized = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        payload = {
            "good": sized + b"0\r\n\r\n",
            "bad-size": b"zz\r\n" + body + b"\r\n0\r\n\r\n",
            "no-end": sized,
            "smuggle": b"0\r\n\r\n" + SMUGGLED,
            "extension": (b"%x;a=b\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n",
            "huge-size": b"ffffffffffffffffff\r\n" + body + b"\r\n0\r\n\r\n",
            "lf-only": (b"%x\n%s\n" % (len(body), body) if body else b"") + b"0\n\n",
        }[chunked]
    else:
        payload = body
    request = b"\r\n".join(head) + b"\r\n\r\n" + payload
    if pipelined:
        request += b"GET /health HTTP/1.1\r\nhost: gateway\r\n\r\n"
    return request


class Recording:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.url = ""

    def __call__(self, request: Request) -> Reply:
        self.requests.append(request)
        return Reply(JSON_OK)

    def __repr__(self) -> str:
        return "Recording()"


@pytest.fixture(scope="module")
def recording() -> Iterator[Recording]:
    script = Recording()
    backend = RawBackend(script)
    script.url = backend.url
    yield script
    backend.close()


@pytest.fixture
def fuzz_gateway(start_gateway: GatewayFactory, recording: Recording) -> str:
    gateway = start_gateway(
        api_keys=["sk-test-1"],
        backend_url=recording.url,
        client_header_timeout=1.0,
        client_body_timeout=0.5,
        max_body_bytes=4096,
    )
    return gateway.url


def parse_answers(data: bytes, head_first: bool = False) -> tuple[list[tuple[int, bytes]], bytes]:
    """The whole answers at the start of ``data``, with their statuses and bodies, and the rest.

    ``head_first``: the first answer may be to HEAD, a head with no body whatever it declares.

    Raises AssertionError for bytes that cannot begin an HTTP/1.1 answer.
    """
    answers: list[tuple[int, bytes]] = []
    while data:
        match = STATUS_LINE.match(data)
        if not match:
            assert b"HTTP/1.1 ".startswith(data[:9]), f"not an HTTP/1.1 answer: {data[:200]!r}"
            break
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lower = head.lower()
        length = re.search(rb"\r\ncontent-length: (\d+)", lower)
        if head_first and not answers and (not rest or rest.startswith(b"HTTP/")):
            body, after = b"", rest  # (a request refused before its method was read gets a body)
        elif length:
            size = int(length.group(1))
            if len(rest) < size:
                break
            body, after = rest[:size], rest[size:]
        elif b"transfer-encoding: chunked" in lower:
            end = rest.find(b"0\r\n\r\n")
            if end == -1:
                break
            body, after = rest[:end], rest[end + 5 :]
        else:
            body, after = b"", rest  # no body (204, 304)
        answers.append((int(match.group(1)), body))
        data = after
    return answers, data


def exchange(url: str, request: bytes, half_close: bool) -> tuple[list[tuple[int, bytes]], bytes, bool]:
    """Send ``request``; read until the gateway closes, or is quiet after whole answers.

    Returns the answers, any bytes after them, and whether the connection was closed. A
    request the gateway neither answers nor closes on within its own timeouts fails.
    """
    head_first = request.startswith(b"HEAD ")
    with RawClient(url) as client:
        client.send(request)
        if half_close:
            client.sock.shutdown(socket.SHUT_WR)
        data, closed = b"", False
        while True:
            answers, rest = parse_answers(data, head_first)
            # Whole answers: wait a moment for more. Otherwise the gateway owes an answer or
            # a close within its head and body timeouts.
            client.sock.settimeout(0.2 if answers and not rest else 3.0)
            try:
                chunk = client.sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    answers, rest = parse_answers(data, head_first)
    return answers, rest, closed


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=client_requests(), half_close=st.booleans())
def test_every_request_gets_a_framed_answer_or_a_close_and_nothing_is_smuggled(
    fuzz_gateway: str, recording: Recording, request: bytes, half_close: bool
) -> None:
    tag = b"x-example: %d" % next(EXAMPLE_TAGS)
    request = request.replace(b"\r\nhost: gateway\r\n", b"\r\nhost: gateway\r\n" + tag + b"\r\n", 1)
    answers, rest, closed = exchange(fuzz_gateway, request, half_close)
    # Whole answers, then nothing, or a close (a half-closed client may be cut off).
    assert closed or (answers and not rest), f"no answer and no close: {answers}, {rest[:200]!r}"
    assert not rest or closed, rest[:200]
    assert not rest or half_close or not answers, f"a cut answer: {rest[:200]!r}"
    is_head = request.startswith(b"HEAD ")
    for status, body in answers:
        assert status != 500
        if status >= 400 and not is_head:  # the backend only says 200: this is the gateway's
            assert orjson.loads(body)["error"]["type"], body
    # At most the one request reached the backend (a pipelined /health is the gateway's
    # own), and no smuggled one, ever.
    reached = [forwarded for forwarded in recording.requests if forwarded.header(b"x-example") == tag[11:]]
    assert len(reached) <= 1
    assert not any(forwarded.target.startswith(b"/v1/admin") for forwarded in recording.requests)
    for forwarded in reached:
        assert forwarded.head.split(b" ", 1)[0] in {b"POST", b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS"}
        lower = forwarded.head.lower()
        assert lower.count(b"\r\ncontent-length:") + lower.count(b"\r\ntransfer-encoding:") <= 1
