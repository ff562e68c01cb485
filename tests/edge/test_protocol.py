"""The client side of the wire (gateway/edge/protocol.py): bounded request heads, real deadlines,
malformed requests refused in the envelope, tried on raw sockets as a hostile client would.
"""

from __future__ import annotations

import contextlib
import json
import time

import pytest

from gateway.edge.protocol import LINGER_BYTES, LINGER_SECONDS
from tests.conftest import GatewayFactory
from tests.support.calls import BODY, CHAT, MiB, post, trickle, upload
from tests.support.processes import serve, stop
from tests.support.raw import (
    JSON_OK,
    RawClient,
    Reply,
    current_rss_kib,
    peak_rss_kib,
    raw_backend,
    response,
)


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
        client.sock.settimeout(0.05)
        answer = b""
        for byte in b"POST /v1/chat/completions HTTP/1.1\r\nx-slow: " + b"a" * 100:
            if not client.send(bytes([byte])) or time.monotonic() - started > 3:
                break
            with contextlib.suppress(TimeoutError):
                answer = client.sock.recv(65536)
                break
        assert time.monotonic() - started < 2
        answer += client.read_all(timeout=2)  # the refusal, then the gateway's FIN
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert answer.endswith(b"}")


def test_a_refused_client_still_sending_reads_its_refusal_then_is_closed(
    start_gateway: GatewayFactory,
) -> None:
    """Lingering close: the refusal and a FIN, not a reset, however the client goes on
    sending; what it sends is dropped, and the connection is closed within the linger."""
    gateway = start_gateway(api_keys=["sk-test-1"], client_header_timeout=0.5)
    with RawClient(gateway.url) as client:
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: a")
        started = time.monotonic()
        client.sock.settimeout(0.02)
        received = b""
        fin_at = closed_at = None
        while closed_at is None and time.monotonic() - started < LINGER_SECONDS + 5:
            if not client.send(b"a" * 100):
                closed_at = time.monotonic()
                break
            try:
                data = client.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                closed_at = time.monotonic()
                break
            if data:
                assert fin_at is None
                received += data
            else:
                fin_at = fin_at or time.monotonic()
                time.sleep(0.02)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert b"content-length: %d" % len(body) in head
        assert json.loads(body)["error"]["type"] == "request_timeout"
        assert fin_at is not None
        assert fin_at - started < 2
        assert closed_at is not None
        assert LINGER_SECONDS - 0.5 < closed_at - fin_at < LINGER_SECONDS + 3


def test_a_stopping_gateway_does_not_wait_for_a_lingering_connection(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], client_body_timeout=0.3)
    assert gateway.server is not None
    with RawClient(gateway.url) as client:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test-1\r\n"
        client.send(head + b"content-length: 100\r\n\r\n{")  # a request the app holds
        assert client.read_all(timeout=5).startswith(b"HTTP/1.1 408 ")  # and the FIN
        gateway.server.should_exit = True
        stopping = time.monotonic()
        # Dropped while the refused connection lingers; a reset once it is closed.
        while client.send(b"a") and time.monotonic() - stopping < LINGER_SECONDS + 5:
            time.sleep(0.02)
        assert time.monotonic() - stopping < LINGER_SECONDS / 2


def test_a_refused_client_flooding_is_closed_after_the_linger_bytes(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], max_header_bytes=4096)
    with RawClient(gateway.url) as client:
        client.send(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-filler: ")
        started = time.monotonic()
        sent = 0
        while client.send(b"a" * 65536) and sent < 256 * MiB:
            sent += 65536
        assert time.monotonic() - started < LINGER_SECONDS  # the bytes ran out first
        # The linger's bytes, and what the two sockets' buffers held.
        assert sent < LINGER_BYTES + 32 * MiB
        assert client.read_all(timeout=5).startswith(b"HTTP/1.1 431 ")


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
        answer = upload(gateway.url, trickle(8, every=0.2, size=100))
        assert answer.status_code == 200
        assert answer.content == b"800"


def test_an_idle_connection_is_closed_five_seconds_after_its_last_answer(
    start_gateway: GatewayFactory,
) -> None:
    """uvicorn's keep-alive timeout (5 s) counts from the last answer, not the first: the
    timer set by the first answer goes off while the connection is still wanted."""
    gateway = start_gateway()

    def ask(client: RawClient) -> None:
        assert client.send(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n")
        client.sock.settimeout(5)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            data = client.sock.recv(65536)
            assert data, "closed while wanted"
            answer += data
        assert answer.startswith(b"HTTP/1.1 200 ")

    with RawClient(gateway.url) as client:
        ask(client)
        time.sleep(3)
        ask(client)  # 3 s after the first answer: kept
        time.sleep(2.5)
        ask(client)  # 5.5 s after the first answer, 2.5 s after the last: kept
        answered = time.monotonic()
        assert client.is_closed_by_peer(timeout=10)
        assert 4.5 <= time.monotonic() - answered < 7.5


def test_an_upgrade_request_with_a_body_is_refused_and_one_without_is_answered(
    start_gateway: GatewayFactory, fake: object
) -> None:
    """llhttp ends an Upgrade request at its head (curl --http2 on http:// sends Upgrade: h2c):
    its body would never be read, and the backend would wait for it until its timeout."""
    gateway = start_gateway(api_keys=["sk-test-1"])
    head = b"host: x\r\nauthorization: Bearer sk-test-1\r\n"
    head += b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
    body = b'{"model": "fake-model"}'
    with RawClient(gateway.url) as client:
        client.send(
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + head
            + b"content-length: %d\r\n\r\n" % len(body)
            + body
        )
        answer = client.read_all(timeout=5)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"upgrade_unsupported" in answer
    with RawClient(gateway.url) as client:
        client.send(b"GET /v1/models HTTP/1.1\r\n" + head + b"\r\n")
        client.sock.settimeout(5)
        assert client.sock.recv(65536).startswith(b"HTTP/1.1 200 ")
