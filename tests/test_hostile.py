"""The gateway tried as a hostile client and as a broken or hostile backend would try it.

Raw sockets on both sides (tests/raw.py). Each probe states the guarantee it checks: one
message per backend response, bounded heads and bodies, real deadlines, safe retries.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import AUTH, GatewayFactory
from tests.processes import serve, stop
from tests.raw import (
    JSON_OK,
    RawClient,
    Reply,
    Request,
    current_rss_kib,
    peak_rss_kib,
    raw_backend,
    response,
)

MiB = 1024 * 1024
CHAT = "/v1/chat/completions"
BODY = b'{"model":"m","messages":[]}'


def post(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> httpx.Response:
    return httpx.post(url + CHAT, content=BODY, headers={**AUTH, **(headers or {})}, timeout=timeout)


def error_type(answer: httpx.Response) -> str:
    assert answer.headers["content-type"] == "application/json"
    return str(answer.json()["error"]["type"])


# Backend side: framing


@pytest.mark.parametrize(
    "first",
    [
        response(200, b"hi"),
        response(204, b"", reason="No Content"),
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    ],
    ids=["sized", "204", "chunked"],
)
def test_a_second_response_in_the_same_write_never_reaches_a_client(
    start_gateway: GatewayFactory, first: bytes
) -> None:
    evil = response(201, b"EVIL!", (("x-evil", "1"),), reason="Created")
    answered: list[Request] = []

    def script(request: Request) -> Reply:
        if request.own:
            return Reply(JSON_OK)
        answered.append(request)
        return Reply(first + evil) if len(answered) == 1 else Reply(JSON_OK)

    with raw_backend(script) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        with httpx.Client(headers=AUTH) as client:
            answer = client.post(gateway.url + CHAT, content=BODY)
            assert answer.status_code == (204 if b" 204 " in first else 200)
            assert answer.content == (b"" if b" 204 " in first else b"hi")
            assert "x-evil" not in answer.headers
            assert answer.headers.get_list("content-length") in ([], [str(len(answer.content))])
            # The poisoned connection was closed, not pooled: the next request gets its own answer.
            following = client.post(gateway.url + CHAT, content=BODY)
        assert following.status_code == 200
        assert following.json() == {"ok": True}
        assert answered[1].connection != answered[0].connection


def test_bytes_after_a_complete_response_in_a_later_read_poison_the_connection(
    start_gateway: GatewayFactory,
) -> None:
    answered: list[Request] = []

    def script(request: Request) -> Reply:
        if request.own:
            return Reply(JSON_OK)
        answered.append(request)
        if len(answered) == 1:
            return Reply(response(200, b"hi"), 0.2, response(201, b"EVIL!"))
        return Reply(JSON_OK)

    with raw_backend(script) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        assert post(gateway.url).content == b"hi"
        time.sleep(0.4)  # the surplus bytes arrive while the connection is idle in the pool
        following = post(gateway.url)
        assert following.json() == {"ok": True}
        assert answered[1].connection != answered[0].connection


def test_chunked_trailers_are_not_promoted_to_headers(start_gateway: GatewayFactory) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
        b"trailer: x-injected, set-cookie\r\n\r\n"
        b'b\r\n{"ok":true}\r\n0\r\nx-injected: 1\r\nset-cookie: session=stolen\r\n\r\n'
    )
    with raw_backend(lambda request: Reply(chunked)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        with httpx.Client(headers=AUTH) as client:
            answer = client.post(gateway.url + CHAT, content=BODY)
            assert answer.json() == {"ok": True}
            assert "x-injected" not in answer.headers
            assert "set-cookie" not in answer.headers
            assert "trailer" not in answer.headers
            # The connection stays usable: trailers are part of a well-framed message.
            assert client.post(gateway.url + CHAT, content=BODY).json() == {"ok": True}
        clients = [request for request in backend.requests if not request.own]
        assert clients[0].connection == clients[1].connection


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_answer_with_a_content_length_reaches_the_client_framed(
    start_gateway: GatewayFactory, status: int
) -> None:
    lying = f"HTTP/1.1 {status} X\r\ncontent-length: 5\r\nx-kept: yes\r\n\r\n".encode()
    with raw_backend(lambda request: Reply(lying)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        with httpx.Client(headers=AUTH) as client:
            for _ in range(2):  # the client's connection stays usable
                answer = client.post(gateway.url + CHAT, content=BODY)
                assert answer.status_code == status
                assert answer.content == b""
                assert answer.headers["x-kept"] == "yes"
                assert "content-length" not in answer.headers


@pytest.mark.parametrize("status", ["600", "099", "999", "000"])
def test_a_status_outside_100_to_599_is_a_502(start_gateway: GatewayFactory, status: str) -> None:
    odd = f"HTTP/1.1 {status} Odd\r\ncontent-length: 2\r\n\r\nhi".encode()
    with raw_backend(lambda request: Reply(odd)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        answer = post(gateway.url)
        assert answer.status_code == 502
        assert error_type(answer) == "backend_error"


def test_the_backends_connection_header_cannot_remove_the_gateways_headers(
    start_gateway: GatewayFactory,
) -> None:
    sneaky = response(200, b"{}", (("connection", "x-request-id, x-backend-own"), ("x-backend-own", "1")))
    with raw_backend(lambda request: Reply(sneaky)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url, rate_limit="100/minute")
        answer = post(gateway.url, {"x-request-id": "req-123"})
        assert answer.status_code == 200
        assert answer.headers["x-request-id"] == "req-123"
        assert "x-ratelimit-limit-requests" in answer.headers
        assert "x-backend-own" not in answer.headers


def test_an_interim_answer_is_not_relayed_and_the_final_one_is(start_gateway: GatewayFactory) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nlink: </x>; rel=preload\r\n\r\n"
    with raw_backend(lambda request: Reply(early, early, JSON_OK)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        answer = post(gateway.url)
        assert answer.status_code == 200
        assert answer.json() == {"ok": True}
        assert "link" not in answer.headers


# Backend side: limits


def test_a_huge_backend_head_is_a_502_in_bounded_memory() -> None:
    def script(request: Request) -> Reply:
        line = b"x-filler: " + b"a" * 1000 + b"\r\n"
        return Reply(b"HTTP/1.1 200 OK\r\n", *([line * 1000] * 48), b"\r\n", close=True)

    with raw_backend(script) as backend:
        process, url = serve("--backend-url", backend.url, "--api-key", "sk-test-1")
        try:
            before = current_rss_kib(process.pid)
            answer = post(url, timeout=30)
            assert answer.status_code == 502
            assert error_type(answer) == "backend_error"
            assert "head" in answer.json()["error"]["message"]
            assert peak_rss_kib(process.pid) - before < 24 * 1024
        finally:
            stop(process)


def test_too_many_backend_headers_is_a_502(start_gateway: GatewayFactory) -> None:
    many = response(200, b"{}", tuple((f"x-h{i}", "1") for i in range(200)))
    with raw_backend(lambda request: Reply(many)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        answer = post(gateway.url)
        assert answer.status_code == 502
        assert "headers" in answer.json()["error"]["message"]


def test_bodies_the_gateway_reads_for_itself_are_capped() -> None:
    """96 MiB from the health route (through /ready, which needs no key), the model list and
    an error body: memory stays bounded; the error body is relayed as the backend sent it."""
    chunk = b"x" * MiB

    def script(request: Request) -> Reply:
        head = b"HTTP/1.1 %s\r\ncontent-length: %d\r\ncontent-type: application/json\r\n\r\n"
        status = b"500 Oops" if request.target.startswith(b"/v1/chat") else b"200 OK"
        return Reply(head % (status, 96 * MiB), *([chunk] * 96), close=True)

    with raw_backend(script) as backend:
        # vLLM has no /v1/models/{id}: the gateway answers it from the model list.
        process, url = serve("--backend", "vllm", "--backend-url", backend.url, "--api-key", "sk-test-1")
        try:
            before = current_rss_kib(process.pid)
            ready = httpx.get(url + "/ready", timeout=30)
            assert ready.status_code == 503
            assert "larger than" in ready.json()["error"]["message"]
            models = httpx.get(url + "/v1/models/some-model", headers=AUTH, timeout=30)
            assert models.status_code == 502
            with httpx.stream("POST", url + CHAT, content=BODY, headers=AUTH, timeout=30) as error:
                assert error.status_code == 500
                size = sum(len(part) for part in error.iter_raw())
            assert size == 96 * MiB
            assert peak_rss_kib(process.pid) - before < 32 * 1024
        finally:
            stop(process)


# Backend side: deadlines


def test_an_upload_longer_than_the_backend_timeout_is_not_cut(start_gateway: GatewayFactory) -> None:
    with raw_backend(lambda request: Reply(response(200, b"%d" % len(request.body)))) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url, backend_timeout=0.5)

        def slow_upload() -> Iterator[bytes]:
            for _ in range(6):
                time.sleep(0.25)
                yield b"x" * 1000

        answer = httpx.post(
            gateway.url + "/v1/audio/transcriptions",
            content=slow_upload(),
            headers={**AUTH, "content-type": "multipart/form-data; boundary=b"},
            timeout=10,
        )
        assert answer.status_code == 200
        assert answer.content == b"6000"


def test_early_hints_do_not_extend_the_deadline(start_gateway: GatewayFactory) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\n\r\n"
    hints = [part for _ in range(20) for part in (early, 0.1)]
    with raw_backend(lambda request: Reply(*hints, JSON_OK, close=True)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url, backend_timeout=0.5)
        started = time.monotonic()
        answer = post(gateway.url)
        assert answer.status_code == 504
        assert error_type(answer) == "backend_timeout"
        assert time.monotonic() - started < 1.5


def test_a_trickled_head_does_not_extend_the_deadline(start_gateway: GatewayFactory) -> None:
    trickle = [part for byte in b"HTTP/1.1 200 OK\r\nx-slow: " + b"a" * 30 for part in (bytes([byte]), 0.05)]
    with raw_backend(lambda request: Reply(*trickle, close=True)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url, backend_timeout=0.5)
        started = time.monotonic()
        answer = post(gateway.url)
        assert answer.status_code == 504
        assert time.monotonic() - started < 1.5


def test_the_wait_for_a_free_backend_connection_is_bounded(start_gateway: GatewayFactory) -> None:
    def script(request: Request) -> Reply:
        if request.header(b"x-hold"):  # a long stream holds the one connection
            chunks = [part for _ in range(15) for part in (0.2, b"1\r\nx\r\n")]
            return Reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", *chunks, b"0\r\n\r\n")
        return Reply(JSON_OK)

    with raw_backend(script) as backend:
        gateway = start_gateway(
            api_keys=["sk-test-1"], backend_url=backend.url, backend_timeout=0.5, backend_max_connections=1
        )
        holder = threading.Thread(target=post, args=(gateway.url, {"x-hold": "1"}))
        holder.start()
        time.sleep(0.2)
        started = time.monotonic()
        answer = post(gateway.url)
        assert answer.status_code == 504
        assert "free" in answer.json()["error"]["message"]
        assert time.monotonic() - started < 1.5
        holder.join()


# Backend side: retries


class DiesOnReuse:
    """A backend whose keep-alive connection dies just as a client's second request goes out."""

    def __init__(self) -> None:
        self.served: set[int] = set()

    def __call__(self, request: Request) -> Reply:
        if request.own:
            return Reply(JSON_OK, close=True)  # keep the gateway's own calls off the pool
        if request.connection in self.served:
            return Reply(close=True)
        self.served.add(request.connection)
        return Reply(JSON_OK)


@pytest.mark.parametrize(
    ("method", "headers", "retried"),
    [
        ("GET", {}, True),
        ("POST", {"idempotency-key": "k-1"}, True),
        ("POST", {}, False),
    ],
)
def test_a_reused_connection_that_dies_unanswered_is_retried_when_safe(
    start_gateway: GatewayFactory, method: str, headers: dict[str, str], retried: bool
) -> None:
    with raw_backend(DiesOnReuse()) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        path = "/v1/models/m" if method == "GET" else CHAT
        with httpx.Client(headers=AUTH) as client:
            first = client.request(method, gateway.url + path, content=None if method == "GET" else BODY)
            assert first.status_code == 200
            second = client.request(
                method, gateway.url + path, content=None if method == "GET" else BODY, headers=headers
            )
        metrics = httpx.get(gateway.url + "/metrics").text
        if retried:
            assert second.status_code == 200
            assert 'gateway_backend_retries_total{backend="openai"} 1.0' in metrics
        else:
            assert second.status_code == 502
            assert error_type(second) == "backend_error"
            assert 'gateway_backend_retries_total{backend="openai"} 0.0' in metrics


# Client side: limits


def test_a_huge_request_head_without_a_key_is_a_431_in_flat_memory() -> None:
    with raw_backend(lambda request: Reply(JSON_OK)) as backend:
        process, url = serve("--backend-url", backend.url, "--api-key", "sk-test-1")
        try:
            before = current_rss_kib(process.pid)
            with RawClient(url) as client:
                client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
                line = b"x-filler: " + b"a" * 1000 + b"\r\n"
                sent = 0
                while sent < 48 * MiB and client.send(line * 100):
                    sent += len(line) * 100
                answer = client.read_all(timeout=10)
                assert answer.startswith(b"HTTP/1.1 431 ")
                assert b'"request_too_large"' in answer
                assert sent < 48 * MiB  # the gateway stopped reading and closed
                assert peak_rss_kib(process.pid) - before < 16 * 1024
                assert [r for r in backend.requests if not r.own] == []
        finally:
            stop(process)


def test_a_large_head_with_a_valid_key_is_refused_not_forwarded(start_gateway: GatewayFactory) -> None:
    with raw_backend(lambda request: Reply(JSON_OK)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        filler = {f"x-filler-{i}": "a" * 1000 for i in range(90)}  # 90 KB in 90 headers
        answer = post(gateway.url, filler)
        assert answer.status_code == 431
        assert answer.json()["error"]["code"] == "headers_too_large"
        assert answer.headers["connection"] == "close"
        many = post(gateway.url, {f"x-h{i}": "1" for i in range(150)})
        assert many.status_code == 431
        assert many.json()["error"]["code"] == "too_many_headers"
        assert [r for r in backend.requests if not r.own] == []
        assert post(gateway.url).status_code == 200  # the gateway is fine


def test_a_long_request_line_is_a_431(start_gateway: GatewayFactory) -> None:
    with raw_backend(lambda request: Reply(JSON_OK)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        with RawClient(gateway.url) as client:
            client.send(b"GET /v1/models?" + b"a" * 100_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n")
            assert client.read_all().startswith(b"HTTP/1.1 431 ")
            assert [r for r in backend.requests if not r.own] == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",  # CL.TE smuggling
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"G\x00T /v1/models HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nx-bad\x01name: 1\r\n\r\n",
        b"GET /v1/models HTTX/1.1\r\n\r\n",
    ],
    ids=["cl-te", "two-lengths", "bad-chunk-size", "nul-method", "control-byte-name", "bad-version"],
)
def test_a_request_that_is_not_http_is_a_400_envelope_then_closed(
    start_gateway: GatewayFactory, request_bytes: bytes
) -> None:
    with raw_backend(lambda request: Reply(JSON_OK)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        with RawClient(gateway.url) as client:
            client.send(
                request_bytes.replace(b"host: x\r\n", b"host: x\r\nauthorization: Bearer sk-test-1\r\n")
            )
            answer = client.read_all(timeout=5)  # read_all returns at the close
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ")
        assert b"\r\nconnection: close" in head
        assert json.loads(body)["error"]["type"] == "invalid_request"
        assert [r for r in backend.requests if not r.own] == []


@pytest.mark.parametrize(
    ("bad", "status"),
    [
        (b"GET /v1/models HTTX/1.1\r\n\r\n", b"400"),
        (b"GET /v1/models HTTP/1.1\r\nx: " + b"a" * 400_000, b"431"),
    ],
    ids=["not-http", "head-too-large"],
)
def test_a_bad_request_pipelined_behind_a_stream_does_not_cut_into_it(
    start_gateway: GatewayFactory, bad: bytes, status: bytes
) -> None:
    chunks = [b'data: {"n":%d}\n\n' % i for i in range(5)]
    stream = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    with raw_backend(lambda request: Reply(head, 0.3, stream)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        with RawClient(gateway.url) as client:
            client.send(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test-1\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s%s" % (len(BODY), BODY, bad)
            )
            answer = client.read_all(timeout=5)
        # The stream arrives whole, then the bad request's refusal, then the close.
        stream_answer, _, after = answer.partition(b"\r\n0\r\n\r\n")
        assert stream_answer.startswith(b"HTTP/1.1 200 ")
        for chunk in chunks:
            assert chunk in stream_answer
        refusal, _, body = after.partition(b"\r\n\r\n")
        assert refusal.startswith(b"HTTP/1.1 %s " % status)
        assert json.loads(body)["error"]["type"] in {"invalid_request", "request_too_large"}
        assert len([r for r in backend.requests if not r.own]) == 1


# Client side: deadlines


@pytest.mark.parametrize(
    "partial",
    [
        b"",  # connected, never a byte
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n",  # a head that never ends
    ],
    ids=["silent", "partial-head"],
)
def test_a_slow_head_is_cut_at_the_header_timeout(start_gateway: GatewayFactory, partial: bytes) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], client_header_timeout=0.5)
    with RawClient(gateway.url) as client:
        started = time.monotonic()
        client.send(partial)
        answer = client.read_all(timeout=5)
        assert time.monotonic() - started < 2
        if partial:
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert b'"request_timeout"' in answer
        else:
            assert answer == b""


def test_a_slowloris_head_sending_a_byte_at_a_time_is_cut(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], client_header_timeout=0.5)
    with RawClient(gateway.url) as client:
        started = time.monotonic()
        for byte in b"POST /v1/chat/completions HTTP/1.1\r\nx-slow: " + b"a" * 100:
            if not client.send(bytes([byte])) or time.monotonic() - started > 3:
                break
            time.sleep(0.05)
        assert time.monotonic() - started < 2
        assert client.read_all(timeout=2).startswith(b"HTTP/1.1 408 ")


def test_a_body_that_stops_is_cut_at_the_body_timeout(start_gateway: GatewayFactory, fake: object) -> None:
    with raw_backend(lambda request: Reply(JSON_OK)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url, client_body_timeout=0.5)
        for path in (CHAT, "/v1/audio/transcriptions"):  # read whole, and streamed upstream
            with RawClient(gateway.url) as client:
                started = time.monotonic()
                client.send(
                    b"POST %s HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test-1\r\n"
                    b"content-type: multipart/form-data; boundary=b\r\ncontent-length: 1000\r\n\r\n"
                    b"0123456789" % path.encode()
                )
                answer = client.read_all(timeout=5)
                assert time.monotonic() - started < 2
                if path == CHAT:
                    assert answer.startswith(b"HTTP/1.1 408 ")
                    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_timeout"
                else:
                    # The upload had begun reaching the backend: the gateway's answer is a 408 or a cut.
                    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")


def test_a_slow_but_steady_body_is_not_cut(start_gateway: GatewayFactory) -> None:
    with raw_backend(lambda request: Reply(response(200, b"%d" % len(request.body)))) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url, client_body_timeout=0.5)

        def steady() -> Iterator[bytes]:
            for _ in range(8):
                time.sleep(0.2)
                yield b"x" * 100

        answer = httpx.post(
            gateway.url + "/v1/audio/transcriptions",
            content=steady(),
            headers={**AUTH, "content-type": "multipart/form-data; boundary=b"},
            timeout=10,
        )
        assert answer.status_code == 200
        assert answer.content == b"800"
