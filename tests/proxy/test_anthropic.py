"""Anthropic's Messages API through the gateway, with what a real server cannot be made to do:
a runtime without it, a stream broken off, the gateway's own refusals in Anthropic's envelope.
The real thing (vLLM's) is in test_vllm_e2e."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import pytest
from aiohttp import web

from tests.conftest import Gateway, GatewayFactory
from tests.support.fakes import LoopThread

KEY = "sk-test-1"
HELLO = [{"role": "user", "content": "Hello"}]


class MessagesRuntime:
    """Answers /v1/messages as vLLM does; ``model: "break"`` streams two events and drops
    the connection."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/messages", self.messages)
        self.app.router.add_post("/v1/messages/count_tokens", self.count)
        self.app.router.add_get("/v1/models", self.models)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def count(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        return web.json_response({"input_tokens": 7})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.bodies.append(body)
        data = json.loads(body)
        if data["model"] == "missing":
            error = {
                "type": "error",
                "error": {"type": "NotFoundError", "message": "The model `missing` does not exist."},
            }
            return web.json_response(error, status=404)
        if not data.get("stream"):
            return web.json_response(
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": "m",
                    "content": [{"type": "text", "text": "Hi"}],
                    "stop_reason": "end_turn",
                    "usage": {"input_tokens": 11, "output_tokens": 2},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        start = {
            "type": "message_start",
            "message": {"id": "msg_2", "type": "message", "role": "assistant", "model": "m", "content": [],
                        "stop_reason": None, "usage": {"input_tokens": 13, "output_tokens": 0}},
        }  # fmt: skip
        await response.write(b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n")
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        await response.write(b"event: content_block_start\ndata: " + json.dumps(block).encode() + b"\n\n")
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}
        await response.write(b"event: content_block_delta\ndata: " + json.dumps(delta).encode() + b"\n\n")
        if data["model"] == "break":
            assert request.transport is not None
            request.transport.abort()
            return response
        ending = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 5},
        }
        for name, event in (
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", ending),
            ("message_stop", {"type": "message_stop"}),
        ):
            await response.write(f"event: {name}\ndata: ".encode() + json.dumps(event).encode() + b"\n\n")
        await response.write_eof()
        return response


@pytest.fixture
def runtime(loop_thread: LoopThread) -> Iterator[tuple[MessagesRuntime, str]]:
    fake = MessagesRuntime()

    async def start() -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(fake.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    runner, port = loop_thread.run(start())
    yield fake, f"http://127.0.0.1:{port}"
    loop_thread.run(runner.cleanup())


@pytest.fixture
def through(start_gateway: GatewayFactory, runtime: tuple[MessagesRuntime, str]) -> Callable[..., Gateway]:
    """A gateway with one key in front of the fake (as vLLM unless told otherwise)."""

    def start(backend: str = "vllm", **settings: Any) -> Gateway:
        return start_gateway(backend=backend, backend_url=runtime[1], api_keys=[KEY], **settings)

    return start


@pytest.fixture
def client() -> Iterator[Callable[..., anthropic.Anthropic]]:
    made: list[anthropic.Anthropic] = []

    def make(url: str, key: str = KEY) -> anthropic.Anthropic:
        made.append(anthropic.Anthropic(base_url=url, api_key=key, max_retries=2, timeout=10))
        return made[-1]

    yield make
    for one in made:
        one.close()


def test_messages_are_forwarded_byte_for_byte_and_charged_from_their_usage(
    through: Callable[..., Gateway],
    runtime: tuple[MessagesRuntime, str],
    client: Callable[..., anthropic.Anthropic],
) -> None:
    fake = runtime[0]
    gateway = through(token_limit="1000/minute")
    sent = b'{"model": "m",  "max_tokens": 8, "messages": [{"role":"user","content":"Hello"}]}'
    answer = httpx.post(gateway.url + "/v1/messages", content=sent, headers={"x-api-key": KEY})
    assert answer.status_code == 200
    assert fake.bodies == [sent]
    assert client(gateway.url).messages.count_tokens(model="m", messages=HELLO).input_tokens == 7  # type: ignore[arg-type]
    with client(gateway.url).messages.stream(model="m", max_tokens=8, messages=HELLO) as stream:  # type: ignore[arg-type]
        assert "".join(stream.text_stream) == "Hi"
    page = httpx.get(gateway.url + "/metrics").text
    tokens = {
        line.split('kind="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith("gateway_tokens_total{") and 'route="messages"' in line
    }
    # 11 + 2 from the answer's usage; 13 from the stream's message_start, 5 from its message_delta.
    assert tokens == {"prompt": 24.0, "completion": 7.0}
    # count_tokens generates nothing and is charged nothing.
    assert not [
        line for line in page.splitlines() if "messages_count_tokens" in line and "tokens_total" in line
    ]


def test_a_runtime_without_messages_answers_501_in_anthropics_envelope(
    through: Callable[..., Gateway], client: Callable[..., anthropic.Anthropic]
) -> None:
    gateway = through("tgi")
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        answer = httpx.post(
            gateway.url + path,
            json={"model": "m", "max_tokens": 8, "messages": HELLO},
            headers={"x-api-key": KEY},
        )
        assert answer.status_code == 501
        assert answer.headers["x-should-retry"] == "false"
        assert answer.json()["type"] == "error"
        assert answer.json()["error"]["type"] == "api_error"
    with pytest.raises(anthropic.InternalServerError) as raised:
        client(gateway.url).messages.create(model="m", max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    assert raised.value.status_code == 501


def test_the_gateways_own_refusals_are_anthropic_errors(
    through: Callable[..., Gateway], client: Callable[..., anthropic.Anthropic]
) -> None:
    gateway = through(rate_limit="1/minute")
    with pytest.raises(anthropic.AuthenticationError) as refused:
        client(gateway.url, key="wrong").messages.create(model="m", max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid API key"},
    }
    client(gateway.url).messages.create(model="m", max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    limited = httpx.post(
        gateway.url + "/v1/messages",
        json={"model": "m", "max_tokens": 8, "messages": HELLO},
        headers={"x-api-key": KEY},
    )
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_error"


def test_a_backends_error_on_messages_is_in_anthropics_envelope_with_anthropics_type(
    through: Callable[..., Gateway], client: Callable[..., anthropic.Anthropic]
) -> None:
    gateway = through()
    with pytest.raises(anthropic.NotFoundError) as raised:
        client(gateway.url).messages.create(model="missing", max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    assert raised.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "The model `missing` does not exist."},
    }


def test_a_stream_broken_off_ends_with_an_anthropic_error_event(
    through: Callable[..., Gateway], client: Callable[..., anthropic.Anthropic]
) -> None:
    gateway = through()
    answer = httpx.post(
        gateway.url + "/v1/messages",
        json={"model": "break", "max_tokens": 8, "messages": HELLO, "stream": True},
        headers={"x-api-key": KEY},
    )
    events = [event for event in answer.text.split("\n\n") if event]
    name, data = events[-1].split("\n")
    assert name == "event: error"
    error = json.loads(data.removeprefix("data: "))
    assert error["type"] == "error"
    assert error["error"]["type"] == "api_error"
    # The Anthropic SDK raises it as an API error.
    with (
        pytest.raises(anthropic.APIStatusError),
        client(gateway.url).messages.stream(model="break", max_tokens=8, messages=HELLO) as stream,  # type: ignore[arg-type]
    ):
        "".join(stream.text_stream)
