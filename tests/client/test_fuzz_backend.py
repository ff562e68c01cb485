"""Property-based fuzzing of backend answers through the gateway.

A raw backend answers each client request with bytes hypothesis draws: odd statuses and
versions, interim answers, lying or doubled lengths, broken chunking, trailers, hostile
headers, surplus bytes of a second response, early closes, split writes. Whatever it
draws, each client gets its own backend's answer, a gateway error envelope, or a cut
connection: never bytes of another exchange, never a 500 of the gateway's own, never a
hang. After each fuzzed answer a well-behaved request (safe to repeat) must get exactly its
own answer.

``FUZZ_EXAMPLES`` sets how many answers are tried (default 150; a few thousand for a
longer hunt: ``FUZZ_EXAMPLES=3000 make test PYTEST_ARGS=tests/client/test_fuzz_backend.py``).
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import AUTH, GatewayFactory
from tests.support.raw import JSON_OK, RawBackend, Reply, Request

TAGS = re.compile(rb"fz[0-9a-f]{32}")
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
TAG = b"<TAG>"
GATEWAY_ERRORS = {"backend_error", "backend_timeout", "backend_unreachable"}

STATUSES = [200, 201, 204, 206, 304, 400, 401, 404, 413, 429, 500, 502, 503, 99, 600, 999]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTX/1.1"]
FRAMINGS = [
    "length",
    "short-length",
    "long-length",
    "double-length",
    "conflicting-lengths",
    "bad-length",
    "chunked",
    "chunked-trailers",
    "bad-chunk-size",
    "chunk-without-end",
    "chunked-and-length",
    "none",
]
HEADER_NAMES = [
    b"x-a",
    b"connection",
    b"x-request-id",
    b"content-type",
    b"set-cookie",
    b"trailer",
    b"keep-alive",
    b"transfer-encoding",
    b"content-encoding",
    b"x-ratelimit-limit-requests",
]
HEADER_VALUES = [
    b"1",
    b"close",
    b"keep-alive",
    b"x-request-id",
    b"x-a, content-type",
    b"text/event-stream",
    b"application/json",
    b"identity",
    TAG,
    b"a\x01b",
    b"a\x7fb",
    b"caf\xc3\xa9",
    b" padded ",
]
# Bytes after the answer. They carry the request's tag: where the answer's own framing
# makes them part of its body (a body delimited by the close) they are its own bytes; any
# other client that sees them has been given bytes of another exchange.
SURPLUS = [
    None,
    None,
    b"HTTP/1.1 201 Created\r\nx-evil: 1\r\ncontent-length: 38\r\n\r\nEVIL" + TAG,
    b"HTTP/1.1 200 OK\r\ncontent-length: 38\r\n\r\nEVIL" + TAG,
    b"EVIL garbage " + TAG + b"\r\n\r\n",
    b"\r\n",
]


@st.composite
def backend_answers(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """Parts of a backend's answer (with TAG where the request's tag goes), and whether it closes."""
    interim = draw(
        st.lists(
            st.sampled_from(
                [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"]
            ),
            max_size=2,
        )
    )
    version = draw(st.sampled_from(VERSIONS))
    status = draw(st.sampled_from(STATUSES))
    reason = draw(st.sampled_from([b"OK", b"", b"Odd Reason"]))
    body = TAG * draw(st.integers(0, 3)) + draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(FRAMINGS))
    headers = draw(
        st.lists(st.tuples(st.sampled_from(HEADER_NAMES), st.sampled_from(HEADER_VALUES)), max_size=4)
    )
    surplus = draw(st.sampled_from(SURPLUS))
    close = draw(st.booleans())
    split = draw(st.integers(0, 3))

    head = [version + b" %d " % status + reason]
    head += [name + b": " + value for name, value in headers]
    size = len(body)
    if framing == "length":
        head.append(b"content-length: %d" % size)
    elif framing == "short-length":
        head.append(b"content-length: %d" % max(size - 3, 0))
    elif framing == "long-length":
        head.append(b"content-length: %d" % (size + 3))
    elif framing == "double-length":
        head += [b"content-length: %d" % size] * 2
    elif framing == "conflicting-lengths":
        head += [b"content-length: %d" % size, b"content-length: %d" % (size + 1)]
    elif framing == "bad-length":
        head.append(b"content-length: 1x")
    elif framing == "chunked-and-length":
        head += [b"content-length: %d" % size, b"transfer-encoding: chunked"]
    elif framing != "none":
        head.append(b"transfer-encoding: chunked")
    if framing in {"chunked", "chunked-trailers", "chunked-and-length"}:
        payload = (b"%x\r\n%s\r\n" % (size, body) if body else b"") + b"0\r\n"
        payload += (
            b"x-injected: 1\r\nset-cookie: stolen\r\n\r\n" if framing == "chunked-trailers" else b"\r\n"
        )
    elif framing == "bad-chunk-size":
        payload = b"zz\r\n" + body + b"\r\n0\r\n\r\n"
    elif framing == "chunk-without-end":
        payload = b"%x\r\n%s\r\n" % (size, body) if body else b""
    else:
        payload = body
    whole = b"".join(interim) + b"\r\n".join(head) + b"\r\n\r\n" + payload
    if surplus is not None:
        whole += surplus
    # Split anywhere before the answer's last byte: the parser must not care where reads
    # end. The surplus comes with that last byte: surplus sent later, once the connection may
    # carry another request, is what no HTTP/1.1 client can tell from that request's answer
    # (README, Security).
    at = min(split * 17, len(whole) - len(surplus or b"") - 1)
    parts = [whole[:at], whole[at:]] if at > 0 else [whole]
    return parts, close


class Scripted:
    """Answers each client request with the answer filed under its x-request-id."""

    def __init__(self) -> None:
        self.answers: dict[bytes, tuple[list[bytes], bool]] = {}
        self.lock = threading.Lock()
        self.url = ""

    def __repr__(self) -> str:
        return "Scripted()"

    def __call__(self, request: Request) -> Reply:
        tag = request.header(b"x-request-id") or b""
        with self.lock:
            answer = self.answers.pop(tag, None)
        if request.own or answer is None:
            return Reply(JSON_OK)
        parts, close = answer
        pieces: list[bytes | float] = []
        for part in parts:
            pieces += [part.replace(TAG, tag), 0.01]
        return Reply(*pieces, close=close)


@pytest.fixture(scope="module")
def scripted() -> Iterator[Scripted]:
    script = Scripted()
    backend = RawBackend(script)
    script.url = backend.url
    yield script
    backend.close()


@pytest.fixture
def fuzz_gateway(start_gateway: GatewayFactory, scripted: Scripted) -> str:
    """The gateway's URL (a plain string: hypothesis prints it with a failing example)."""
    gateway = start_gateway(
        api_keys=["sk-test-1"],
        backend_url=scripted.url,
        backend_timeout=0.5,
        stream_idle_timeout=0.5,
        rate_limit="1000000/minute",
    )
    return gateway.url


def check_own(tag: str, answer: httpx.Response) -> None:
    """A relayed answer carries nothing of another exchange."""
    names = {name.lower() for name, _ in answer.headers.raw}
    assert b"x-evil" not in names  # a second response's head never becomes this one's
    assert b"x-injected" not in names  # nor does a trailer
    blob = answer.content + b"".join(name + b":" + value for name, value in answer.headers.raw)
    assert set(TAGS.findall(blob)) <= {tag.encode()}
    assert answer.headers.get("x-request-id") == tag


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(answer=backend_answers(), method=st.sampled_from(["POST", "GET"]))
def test_each_client_gets_its_own_answer_an_envelope_or_a_cut(
    fuzz_gateway: str, scripted: Scripted, answer: tuple[list[bytes], bool], method: str
) -> None:
    script = scripted
    tag = "fz" + uuid.uuid4().hex
    control = "fz" + uuid.uuid4().hex
    script.answers[tag.encode()] = answer
    path = "/v1/chat/completions" if method == "POST" else "/v1/models/m"
    with httpx.Client(headers=AUTH, timeout=5) as client:
        try:
            fuzzed = client.request(
                method, fuzz_gateway + path, content=b'{"model":"m"}' if method == "POST" else None,
                headers={"x-request-id": tag},
            )  # fmt: skip
        except (httpx.RemoteProtocolError, httpx.ReadError):
            pass  # a cut connection: the client knows the answer is broken
        else:
            if fuzzed.status_code in (502, 504) and fuzzed.headers.get("content-type") == "application/json":
                try:
                    kind = fuzzed.json()["error"]["type"]
                except ValueError:
                    kind = None
                if kind in GATEWAY_ERRORS:
                    assert fuzzed.headers["x-request-id"] == tag
                    kind = "gateway"
                if kind != "gateway":
                    check_own(tag, fuzzed)
            else:
                assert not (fuzzed.status_code == 500 and b"internal_error" in fuzzed.content)
                check_own(tag, fuzzed)
        script.answers.pop(tag.encode(), None)
        client.cookies.clear()  # httpx keeps what a fuzzed Set-Cookie said, and may not encode it
        # The fuzzed answer may end with the backend closing the connection just as this
        # request goes out: with an Idempotency-Key the gateway may send it again, so the
        # one right outcome is its own answer.
        following = client.post(
            fuzz_gateway + "/v1/chat/completions",
            content=b"{}",
            headers={"x-request-id": control, "idempotency-key": control},
        )
    assert following.status_code == 200
    assert following.content == b'{"ok":true}'
    assert following.headers["x-request-id"] == control
    assert not set(TAGS.findall(b"".join(v for _, v in following.headers.raw))) - {control.encode()}
