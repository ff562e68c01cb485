"""Request bodies (gateway/proxy/body.py): JSON routes read whole and checked, within the size limit."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import AUTH, Fake, Gateway, GatewayFactory
from tests.support.calls import chat, error_of


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'"a string"', b"", b'{"model": "x"', b"\xff\xfe"],
    ids=["text", "array", "string", "empty", "truncated", "binary"],
)
def test_body_that_is_not_a_json_object_is_refused(gateway: Gateway, fake: Fake, body: bytes) -> None:
    response = httpx.post(gateway.url + "/v1/chat/completions", content=body, headers=AUTH)
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request"
    assert fake.seen.requests == []


def test_body_over_the_limit_is_refused(start_gateway: GatewayFactory, fake: Fake) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], max_body_bytes=1000)
    big = {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 2000}]}
    response = chat(gateway, big)
    assert response.status_code == 413
    assert error_of(response)["type"] == "request_too_large"

    def chunked() -> Iterator[bytes]:
        yield b'{"model": "fake-model", "pad": "'
        for _ in range(10):
            yield b"x" * 200
        yield b'"}'

    response = httpx.post(gateway.url + "/v1/chat/completions", content=chunked(), headers=AUTH)
    assert response.status_code == 413
    assert fake.seen.requests == []
    # A body at the limit still goes through.
    assert chat(gateway, {"model": "fake-model"}).status_code == 200
