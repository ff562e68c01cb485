"""Requests the tests make to a gateway, and how they read its errors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx

from tests.conftest import AUTH, Gateway

MiB = 1024 * 1024
CHAT = "/v1/chat/completions"
BODY = b'{"model":"m","messages":[]}'


def chat(
    gateway: Gateway, body: object, headers: dict[str, str] | None = None, **kwargs: Any
) -> httpx.Response:
    """A chat completion with ``body`` as JSON, with the tests' key."""
    return httpx.post(gateway.url + CHAT, json=body, headers={**AUTH, **(headers or {})}, **kwargs)


def post(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> httpx.Response:
    """A small chat completion to the gateway at ``url``, with the tests' key."""
    return httpx.post(url + CHAT, content=BODY, headers={**AUTH, **(headers or {})}, timeout=timeout)


def error_of(response: httpx.Response) -> dict[str, object]:
    """The error in the gateway's envelope, checked for its shape."""
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error["type"], str)
    assert isinstance(error["message"], str)
    assert error["message"]
    return dict(error)


def error_type(answer: httpx.Response) -> str:
    assert answer.headers["content-type"] == "application/json"
    return str(answer.json()["error"]["type"])


def trickle(pieces: int, every: float, size: int) -> Iterator[bytes]:
    """An upload's body: ``pieces`` of ``size`` bytes, one every ``every`` seconds."""
    for _ in range(pieces):
        time.sleep(every)
        yield b"x" * size


def upload(url: str, content: Iterator[bytes]) -> httpx.Response:
    """A streamed multipart upload (a transcription) to the gateway at ``url``."""
    return httpx.post(
        url + "/v1/audio/transcriptions",
        content=content,
        headers={**AUTH, "content-type": "multipart/form-data; boundary=b"},
        timeout=10,
    )
