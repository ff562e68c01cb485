"""The proxy on a real socket in front of a fake backend on a real socket."""

from __future__ import annotations

import gzip
import json
import socket

import httpx
import pytest

from tests.conftest import AUTH, Fake, Gateway, GatewayFactory
from tests.support.calls import chat, error_of
from tests.support.fakes import chat_completion, wait_until
from tests.support.raw import Reply, Request, raw_backend, response

# Forwarding


def test_request_is_forwarded_byte_for_byte(gateway: Gateway, fake: Fake) -> None:
    body = b'{"model": "echo",   "messages": [{"role": "user", "content": "h\\u00e9llo \xc3\xa9"}]}\n'
    response = httpx.post(
        gateway.url + "/v1/chat/completions?api-version=2024-10-01&x=%20a%2Fb",
        content=body,
        headers={
            **AUTH,
            "content-type": "application/json",
            "x-custom": "kept",
            "user-agent": "OpenAI/Python",
        },
    )
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/v1/chat/completions?api-version=2024-10-01&x=%20a%2Fb"
    assert echoed["body"].encode() == body
    headers = {k.lower(): v for k, v in echoed["headers"]}
    assert headers["x-custom"] == "kept"
    assert headers["user-agent"] == "OpenAI/Python"
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(body))


def test_get_routes_and_model_ids_with_slashes(gateway: Gateway) -> None:
    models = httpx.get(gateway.url + "/v1/models", headers=AUTH)
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == ["fake-model", "org/name-7b"]
    model = httpx.get(gateway.url + "/v1/models/org/name-7b", headers=AUTH)
    assert model.status_code == 200
    assert model.json()["id"] == "org/name-7b"


# Responses


def test_response_bytes_and_headers_pass_through(gateway: Gateway, fake: Fake) -> None:
    response = chat(gateway, {"model": "fake-model"})
    assert response.status_code == 200
    assert response.content == json.dumps(chat_completion("fake-model")).encode()
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers["content-length"] == str(len(response.content))


def test_compressed_body_is_not_decoded_or_re_encoded(gateway: Gateway) -> None:
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json={"model": "gzip"}, headers=AUTH
    ) as response:
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw)) == chat_completion("gzip")


def test_backend_errors_keep_their_status_and_message_in_the_gateways_envelope(gateway: Gateway) -> None:
    for model, status, type_, code in (
        ("error-400", 400, "invalid_request", "context_length_exceeded"),
        ("error-500", 500, "backend_error", None),
    ):
        response = chat(gateway, {"model": model})
        assert response.status_code == status
        error = response.json()["error"]
        assert error["type"] == type_
        assert error["code"] == code
        assert error["backend_type"] in {"invalid_request_error", "internal_error"}
        assert error["message"] in {"This model's maximum context length is 8 tokens", "engine crashed"}


def test_an_empty_backend_error_body_is_said_so_in_the_envelope(gateway: Gateway) -> None:
    response = httpx.get(gateway.url + "/v1/models?fail=401", headers=AUTH)
    assert response.status_code == 401
    assert response.json()["error"] == {
        "type": "authentication_error",
        "message": "the backend answered 401 with an empty body",
        "param": None,
        "code": None,
    }


# Streaming


def test_stream_is_relayed_with_sse_headers(gateway: Gateway) -> None:
    response = chat(gateway, {"model": "fake-model", "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    events = [line for line in response.text.split("\n\n") if line]
    assert len(events) == 6
    assert events[-1] == "data: [DONE]"


def test_stream_chunks_arrive_before_the_stream_ends(gateway: Gateway, fake: Fake) -> None:
    # The backend never ends this stream: a buffering proxy would deliver nothing.
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={"model": "endless", "stream": True},
        headers=AUTH,
        timeout=5,
    ) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        second = next(line for line in lines if line)
    assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["content"] == "Hello"
    assert json.loads(second.removeprefix("data: "))["choices"][0]["delta"]["content"] == " there"


def test_client_disconnect_mid_stream_closes_the_backend_stream(gateway: Gateway, fake: Fake) -> None:
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json={"model": "endless", "stream": True}, headers=AUTH
    ) as response:
        next(response.iter_lines())
    assert wait_until(fake.seen.stream_closed.is_set, timeout=2.0)


def test_client_disconnect_before_the_answer_cancels_the_backend_request(
    gateway: Gateway, fake: Fake
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        chat(gateway, {"model": "slow"}, timeout=httpx.Timeout(5, read=0.3))
    assert wait_until(fake.seen.cancelled.is_set, timeout=2.0)


def test_backend_dying_mid_stream_ends_with_an_error_event(gateway: Gateway) -> None:
    response = chat(gateway, {"model": "die", "stream": True})
    assert response.status_code == 200
    events = [event for event in response.text.split("\n\n") if event]
    assert len(events) == 3
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["type"] == "backend_error"
    assert "[DONE]" not in response.text


def test_backend_stalling_mid_stream_ends_with_a_timeout_event(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], stream_idle_timeout=0.5)
    response = chat(gateway, {"model": "stall", "stream": True}, timeout=10)
    events = [event for event in response.text.split("\n\n") if event]
    assert len(events) == 3
    assert json.loads(events[-1].removeprefix("data: "))["error"]["type"] == "backend_timeout"


def test_backend_dying_mid_body_cuts_the_client_connection(gateway: Gateway) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        chat(gateway, {"model": "die-json"})


# Errors the gateway answers itself


def test_unknown_route_is_404_and_never_forwarded(gateway: Gateway, fake: Fake) -> None:
    for path in ("/v1/unknown", "/secret/admin", "/health/../secret/admin", "/v1/vector_stores"):
        response = httpx.get(gateway.url + path, headers=AUTH)
        assert response.status_code == 404, path
        assert error_of(response)["type"] == "not_found"
    assert fake.seen.requests == []


def test_dot_segments_cannot_escape_the_model_route(gateway: Gateway, fake: Fake) -> None:
    port = int(gateway.url.rsplit(":", 1)[1])
    for raw in (b"/v1/models/../../secret/admin", b"/v1/models/%2e%2e/%2e%2e/secret/admin"):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"GET " + raw + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-1\r\n"
                b"Connection: close\r\n\r\n"
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 404"), data
    assert fake.seen.requests == []


def test_wrong_method_is_405(gateway: Gateway) -> None:
    response = httpx.get(gateway.url + "/v1/chat/completions", headers=AUTH)
    assert response.status_code == 405
    assert error_of(response)["type"] == "method_not_allowed"
    assert "POST" in response.headers["allow"]


def test_one_bad_request_does_not_disturb_others(gateway: Gateway) -> None:
    with httpx.Client(headers=AUTH) as client:
        for _ in range(3):
            assert client.post(gateway.url + "/v1/chat/completions", content=b"nope").status_code == 400
            response = client.post(gateway.url + "/v1/chat/completions", json={"model": "fake-model"})
            assert response.json() == chat_completion("fake-model")


# Auth


def test_missing_or_wrong_key_is_401(gateway: Gateway, fake: Fake) -> None:
    missing = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "x"})
    assert missing.status_code == 401
    assert error_of(missing)["type"] == "authentication_error"
    wrong = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": "x"}, headers={"x-api-key": "nope"}
    )
    assert wrong.status_code == 401
    assert (
        httpx.get(gateway.url + "/v1/models", headers={"Authorization": "Basic sk-test-1"}).status_code == 401
    )
    assert fake.seen.requests == []


def test_either_key_header_and_any_configured_key(gateway: Gateway) -> None:
    for headers in (
        {"Authorization": "Bearer sk-test-2"},
        {"x-api-key": "sk-test-1"},
        {"authorization": "bearer sk-test-1"},
    ):
        assert httpx.get(gateway.url + "/v1/models", headers=headers).status_code == 200


def test_open_gateway_without_keys(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    assert httpx.get(gateway.url + "/v1/models").status_code == 200


# Errors rewritten


def test_a_compressed_error_is_read_and_put_in_the_envelope(start_gateway: GatewayFactory) -> None:
    error = b'{"error": {"message": "too long", "type": "BadRequestError", "code": 400}}'
    gzipped = gzip.compress(error)

    def script(request: Request) -> Reply:
        if request.own:
            return Reply(response(200, b'{"object":"list","data":[]}'))
        encoding = (("content-type", "application/json"), ("content-encoding", "gzip"))
        if b"brotli" in request.body:  # an encoding the gateway does not read: as it came
            encoding = (("content-type", "application/json"), ("content-encoding", "br"))
        return Reply(response(400, gzipped, encoding))

    with raw_backend(script) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url, backend="vllm")
        answer = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "m"}, headers=AUTH)
        assert answer.status_code == 400
        assert "content-encoding" not in answer.headers
        assert answer.json()["error"]["type"] == "invalid_request"
        assert answer.json()["error"]["backend_type"] == "BadRequestError"
        raw = httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "brotli"},
            headers={**AUTH, "accept-encoding": "br"},
        )
        assert raw.status_code == 400
        assert raw.headers["content-encoding"] == "br"
