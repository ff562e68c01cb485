"""The gateway tried as a broken or hostile backend would try it (the client side is
test_protocol.py).

Raw sockets on both sides (tests/support/raw.py). Each probe states the guarantee it checks: one
message per backend response, bounded heads and bodies, real deadlines, safe retries.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.conftest import AUTH, GatewayFactory
from tests.support.calls import BODY, CHAT, MiB, error_type, post, trickle, upload
from tests.support.processes import serve, stop
from tests.support.raw import (
    JSON_OK,
    Reply,
    Request,
    current_rss_kib,
    peak_rss_kib,
    raw_backend,
    response,
)

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
        answer = upload(gateway.url, trickle(6, every=0.25, size=1000))
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
