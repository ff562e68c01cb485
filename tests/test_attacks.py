"""What one tenant could do to the pod and to the others, each tried as an attacker would: a body
whose shape costs memory, a body that never ends, a body sent after a refusal."""

from __future__ import annotations

import time

import httpx

from tests.conftest import AUTH, GatewayFactory
from tests.support.calls import CHAT, MiB
from tests.support.processes import serve, stop
from tests.support.raw import RawClient, Reply, current_rss_kib, peak_rss_kib, raw_backend, response


def _nested_body(size: int) -> bytes:
    """A chat body padded to ``size`` bytes with empty arrays: the shape that costs a general
    decoder about thirty times its bytes in objects."""
    head, tail = b'{"model": "m", "messages": [], "pad": [', b"[]]}"
    return head + b"[]," * ((size - len(head) - len(tail)) // 3) + tail


def test_a_json_body_costs_its_bytes_whatever_its_shape() -> None:
    body = _nested_body(15 * MiB)
    with raw_backend(lambda request: Reply(response(200, b'{"ok": true}'), close=True)) as backend:
        process, url = serve("--backend-url", backend.url, "--api-key", "sk-test-1")
        try:
            before = current_rss_kib(process.pid)
            headers = {**AUTH, "content-type": "application/json"}
            answer = httpx.post(url + CHAT, content=body, headers=headers, timeout=60)
            assert answer.status_code == 200
            # The body is held (read, then forwarded); the document is never built (it was
            # ~30 times the body, 450 MiB here).
            assert peak_rss_kib(process.pid) - before < 4 * 15 * 1024
        finally:
            stop(process)


def test_json_bodies_have_a_cap_below_the_uploads(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], max_json_bytes=1000)
    answer = httpx.post(gateway.url + CHAT, content=_nested_body(2000), headers=AUTH)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "request_too_large"


def test_invalid_utf8_in_a_skipped_field_is_still_refused(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"])
    answer = httpx.post(gateway.url + CHAT, content=b'{"model": "m", "pad": "\xff\xfe"}', headers=AUTH)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_json"


def _trickle(client: RawClient, every: float, until: float) -> bool:
    """One byte every ``every`` seconds; True if the gateway closed before ``until``."""
    while time.monotonic() < until:
        if not client.send(b" ") or client.is_closed_by_peer(every):
            return True
    return False


def test_a_body_trickled_byte_by_byte_is_cut_at_the_body_deadline(start_gateway: GatewayFactory) -> None:
    with raw_backend(lambda request: Reply(response(200, b"{}"))) as backend:
        gateway = start_gateway(
            api_keys=["sk-test-1"], backend_url=backend.url, client_body_timeout=1, client_body_deadline=2
        )
        with RawClient(gateway.url) as client:
            head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test-1\r\n"
            client.send(head + b"content-length: 100000\r\n\r\n{")
            started = time.monotonic()
            # Each byte comes well within the body timeout; the whole body never does.
            client.sock.settimeout(0.3)
            chunks = []
            while time.monotonic() - started < 8:
                if not client.send(b" "):
                    break
                try:
                    data = client.sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                chunks.append(data)
            answer = b"".join(chunks)
            assert time.monotonic() - started < 4
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert b"within 2 s" in answer


def test_the_rest_of_a_refused_body_has_a_body_timeout_in_all(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], client_body_timeout=1)
    with RawClient(gateway.url) as client:
        # No key: 401 at once, with most of the declared body still to come.
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n{")
        client.sock.settimeout(5)
        assert client.sock.recv(65536).startswith(b"HTTP/1.1 401 ")
        answered = time.monotonic()
        assert _trickle(client, 0.2, answered + 6)
        assert time.monotonic() - answered < 2.5


# Tokens that escaped the limits


def _stream_without_usage(events: int) -> bytes:
    """A chat stream as vLLM sends it when no usage is asked for: an event a token, no usage."""
    chunk = (
        b'data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
    )
    return chunk * events + b"data: [DONE]\n\n"


def _sse(body: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
    return head % len(body) + body


STREAM = {"model": "m", "messages": [{"role": "user", "content": "go on"}], "stream": True}


def test_a_stream_without_usage_is_charged_what_it_generated(start_gateway: GatewayFactory) -> None:
    with raw_backend(lambda request: Reply(_sse(_stream_without_usage(3000)))) as backend:
        gateway = start_gateway(
            api_keys=["sk-test-1"],
            backend_url=backend.url,
            token_limit="10000/minute",
            default_max_tokens=100,
        )
        statuses = [httpx.post(gateway.url + CHAT, json=STREAM, headers=AUTH).status_code for _ in range(5)]
        # 3,000 tokens each: after four, no room is left (held at ~120 each, all five went).
        assert statuses == [200, 200, 200, 200, 429]


def test_an_overdraft_is_carried_into_the_next_window(start_gateway: GatewayFactory) -> None:
    with raw_backend(lambda request: Reply(_sse(_stream_without_usage(5000)))) as backend:
        gateway = start_gateway(
            api_keys=["sk-test-1"],
            backend_url=backend.url,
            token_limit="2000/3 seconds",
            default_max_tokens=100,
        )
        assert httpx.post(gateway.url + CHAT, json=STREAM, headers=AUTH).status_code == 200
        time.sleep(3.5)
        # 5,000 generated against 2,000 a window: the next window begins 3,000 down.
        refused = httpx.post(gateway.url + CHAT, json=STREAM, headers=AUTH)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "tokens"


def test_every_output_limit_a_runtime_reads_is_reserved(start_gateway: GatewayFactory) -> None:
    with raw_backend(lambda request: Reply(response(200, b"{}"))) as backend:
        gateway = start_gateway(
            api_keys=["sk-test-1"], backend_url=backend.url, backend="llamacpp", token_limit="2000/minute"
        )
        body = {"model": "m", "max_tokens": 1, "n_predict": 9000}
        answer = httpx.post(gateway.url + CHAT, json=body, headers=AUTH)
        assert answer.status_code == 429
        assert "9" in answer.json()["error"]["message"]
        assert [r for r in backend.requests if not r.own] == []


def test_work_out_of_the_gateways_sight_is_refused_to_a_token_limited_key(
    start_gateway: GatewayFactory,
) -> None:
    with raw_backend(lambda request: Reply(response(200, b"{}"))) as backend:
        gateway = start_gateway(
            api_keys=["sk-test-1"], backend_url=backend.url, backend="basert", token_limit="2000/minute"
        )
        batch = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        answer = httpx.post(gateway.url + "/v1/batches", json=batch, headers=AUTH)
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "tokens_unaccountable"
        background = {"model": "m", "input": "hi", "background": True, "max_output_tokens": 10}
        answer = httpx.post(gateway.url + "/v1/responses", json=background, headers=AUTH)
        assert answer.status_code == 403
        assert "background" in answer.json()["error"]["message"]
        assert [r for r in backend.requests if not r.own] == []
