"""Which headers go to the backend and back (gateway/core/headers.py): hop-by-hop ones dropped, the
client key swapped for the backend key, forwarding chains, request IDs, cookies.
"""

from __future__ import annotations

import json
import socket

import httpx

from tests.conftest import AUTH, Fake, Gateway, GatewayFactory
from tests.support.calls import chat, post
from tests.support.raw import Reply, raw_backend, response


def test_client_auth_is_dropped_and_backend_key_added(start_gateway: GatewayFactory, fake: Fake) -> None:
    gateway = start_gateway(api_keys=["sk-client"], backend_api_key="sk-backend")
    response = chat(
        gateway, {"model": "echo"}, headers={"Authorization": "Bearer sk-client", "x-api-key": "sk-client"}
    )
    assert response.status_code == 200
    headers = dict((k.lower(), v) for k, v in response.json()["headers"])
    assert headers["authorization"] == "Bearer sk-backend"
    assert "x-api-key" not in headers
    assert "sk-client" not in json.dumps(response.json())


def test_no_backend_key_means_no_authorization_header(gateway: Gateway) -> None:
    headers = dict((k.lower(), v) for k, v in chat(gateway, {"model": "echo"}).json()["headers"])
    assert "authorization" not in headers


def test_hop_by_hop_request_headers_are_stripped(gateway: Gateway) -> None:
    response = chat(
        gateway,
        {"model": "echo"},
        headers={
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic abc",
            "Upgrade": "h2c",
        },
    )
    names = {k.lower() for k, _ in response.json()["headers"]}
    assert not names & {"x-hop", "keep-alive", "te", "proxy-authorization", "upgrade"}


def test_hop_by_hop_response_headers_are_stripped(gateway: Gateway) -> None:
    response = chat(gateway, {"model": "hop-headers"})
    assert response.headers["x-backend-kept"] == "1"
    assert "x-backend-hop" not in response.headers
    assert "keep-alive" not in response.headers


def test_forwarded_for_is_the_peer_unless_it_is_a_trusted_proxy(
    gateway: Gateway, start_gateway: GatewayFactory
) -> None:
    sent = {"X-Forwarded-For": "203.0.113.7", "Expect": "100-continue"}
    headers = [(k.lower(), v) for k, v in chat(gateway, {"model": "echo"}, headers=sent).json()["headers"]]
    assert [v for k, v in headers if k == "x-forwarded-for"] == ["127.0.0.1"]
    assert "expect" not in {k for k, _ in headers}
    behind = start_gateway(api_keys=["sk-test-1"], trust_forwarded=["127.0.0.1"])
    headers = [(k.lower(), v) for k, v in chat(behind, {"model": "echo"}, headers=sent).json()["headers"]]
    assert [v for k, v in headers if k == "x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]


def test_request_id_is_generated_forwarded_and_returned(gateway: Gateway) -> None:
    response = chat(gateway, {"model": "echo"})
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32
    forwarded = [v for k, v in response.json()["headers"] if k.lower() == "x-request-id"]
    assert forwarded == [request_id]


def test_request_id_from_the_client_is_kept(gateway: Gateway) -> None:
    response = chat(gateway, {"model": "echo"}, headers={"x-request-id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    assert ["x-request-id", "trace-42"] in [[k.lower(), v] for k, v in response.json()["headers"]]


def test_unsafe_request_id_is_replaced(gateway: Gateway) -> None:
    response = chat(gateway, {"model": "echo"}, headers={"x-request-id": "a" * 500})
    assert response.headers["x-request-id"] != "a" * 500


def test_accept_encoding_is_not_added_by_the_gateway(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]))) as sock:
        body = b'{"model": "echo"}'
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-1\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    names = {k.lower() for k, _ in json.loads(data.split(b"\r\n\r\n", 1)[1])["headers"]}
    assert "accept-encoding" not in names
    assert "user-agent" not in names


def test_backend_cookies_are_not_kept_between_clients(gateway: Gateway, fake: Fake) -> None:
    first = httpx.get(gateway.url + "/v1/models", headers=AUTH)
    assert "session=backend-secret" in first.headers["set-cookie"]
    httpx.get(gateway.url + "/v1/models", headers=AUTH)
    assert "cookie" not in {k.lower() for k in fake.seen.requests[-1]["headers"]}


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
