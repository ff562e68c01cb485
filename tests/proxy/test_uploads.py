"""Multipart uploads (audio transcriptions) stream through without being held whole."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import httpx
import openai

from tests.conftest import AUTH, Fake, Gateway, GatewayFactory

MB = 1024 * 1024
BOUNDARY = "gatewayboundary"


def multipart(total: int, fake: Fake | None = None) -> Iterator[bytes]:
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="talk.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    sent = 0
    piece = os.urandom(MB)
    while sent < total:
        yield piece
        sent += len(piece)
        if fake is not None and sent == total // 2:
            # Half the file is sent: a gateway that holds uploads whole has passed nothing on yet.
            assert fake.seen.upload_started.wait(10), "the backend received nothing before the upload ended"
            assert sum(size for _, size in fake.seen.received_chunks) < total
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_20mb_upload_reaches_the_backend_while_it_is_still_being_sent(gateway: Gateway, fake: Fake) -> None:
    total = 20 * MB
    response = httpx.post(
        gateway.url + "/v1/audio/transcriptions",
        content=multipart(total, fake),
        headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        timeout=60,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["complete"]
    assert body["bytes"] > total
    assert len(fake.seen.received_chunks) > 20


def test_fixed_length_upload_keeps_its_length(gateway: Gateway, fake: Fake) -> None:
    data = b"".join(multipart(2 * MB))
    response = httpx.post(
        gateway.url + "/v1/audio/transcriptions",
        content=data,
        headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert response.json() == {
        "text": "hello from the fake",
        "bytes": len(data),
        "complete": True,
        "chunked": False,
    }


def test_upload_over_the_limit_is_413(start_gateway: GatewayFactory, fake: Fake) -> None:
    gateway = start_gateway(max_body_bytes=3 * MB)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    declared = httpx.post(
        gateway.url + "/v1/audio/transcriptions", content=b"".join(multipart(4 * MB)), headers=headers
    )
    assert declared.status_code == 413
    streamed = httpx.post(
        gateway.url + "/v1/audio/transcriptions", content=multipart(4 * MB), headers=headers
    )
    assert streamed.status_code == 413
    assert streamed.json()["error"]["type"] == "request_too_large"


def test_transcription_with_the_sdk(gateway: Gateway) -> None:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-test-1", max_retries=0) as sdk:
        audio = io.BytesIO(b"RIFF" + os.urandom(50_000))
        audio.name = "talk.wav"
        result = sdk.audio.transcriptions.create(model="whisper-1", file=audio)
    assert result.text == "hello from the fake"
