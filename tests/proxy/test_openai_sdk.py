"""The official OpenAI Python SDK, sync and async, pointed at the gateway."""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Gateway, GatewayFactory
from tests.support.fakes import free_port

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def client(gateway: Gateway, key: str = "sk-test-1") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=10)


def async_client(gateway: Gateway, key: str = "sk-test-1") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=10)


def test_models(gateway: Gateway) -> None:
    with client(gateway) as sdk:
        assert [model.id for model in sdk.models.list()] == ["fake-model", "org/name-7b"]
        assert sdk.models.retrieve("org/name-7b").id == "org/name-7b"


def test_chat_completion(gateway: Gateway) -> None:
    with client(gateway) as sdk:
        completion = sdk.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello there!"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 8


def test_chat_stream(gateway: Gateway) -> None:
    with client(gateway) as sdk:
        stream = sdk.chat.completions.create(
            model="fake-model",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "Hello there, friend!"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


def test_completion_and_stream(gateway: Gateway) -> None:
    with client(gateway) as sdk:
        assert sdk.completions.create(model="fake-model", prompt="Once").choices[0].text == "Once upon a time"
        stream = sdk.completions.create(model="fake-model", prompt="Once", stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream) == "Once upon a time"


def test_embeddings(gateway: Gateway) -> None:
    with client(gateway) as sdk:
        result = sdk.embeddings.create(model="fake-model", input=["a", "b"], encoding_format="float")
    assert [item.embedding for item in result.data] == [[0.1, 0.2, 0.3]] * 2


def test_wrong_key_is_authentication_error(gateway: Gateway) -> None:
    with client(gateway, key="sk-wrong") as sdk, pytest.raises(openai.AuthenticationError) as caught:
        sdk.models.list()
    assert caught.value.status_code == 401
    assert caught.value.type == "authentication_error"


def test_backend_400_is_bad_request_error(gateway: Gateway) -> None:
    with client(gateway) as sdk, pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="error-400", messages=MESSAGES)
    assert "maximum context length" in caught.value.message


def test_unknown_model_is_not_found_error(gateway: Gateway) -> None:
    with client(gateway) as sdk, pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")


def test_unreachable_backend_is_internal_server_error(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], backend_url=f"http://127.0.0.1:{free_port()}")
    with client(gateway) as sdk, pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.type == "backend_unreachable"


def test_backend_timeout_is_api_status_error(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], backend_timeout=0.3)
    with client(gateway) as sdk, pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(model="slow", messages=MESSAGES)
    assert caught.value.status_code == 504
    assert caught.value.type == "backend_timeout"


def test_backend_dying_mid_stream_raises_in_the_sdk(gateway: Gateway) -> None:
    with client(gateway) as sdk:
        stream = sdk.chat.completions.create(model="die", messages=MESSAGES, stream=True)
        received = []

        def consume() -> None:
            for chunk in stream:
                received.append(chunk)

        with pytest.raises(openai.APIError, match="before it was complete"):
            consume()
    assert len(received) == 2


async def test_async_client_end_to_end(gateway: Gateway) -> None:
    async with async_client(gateway) as sdk:
        models = [model.id async for model in sdk.models.list()]
        assert models == ["fake-model", "org/name-7b"]
        completion = await sdk.chat.completions.create(model="fake-model", messages=MESSAGES)
        assert completion.choices[0].message.content == "Hello there!"
        stream = await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
        assert text == "Hello there, friend!"
        embeddings = await sdk.embeddings.create(model="fake-model", input="a", encoding_format="float")
        assert embeddings.data[0].embedding == [0.1, 0.2, 0.3]
        completion_text = await sdk.completions.create(model="fake-model", prompt="Once")
        assert completion_text.choices[0].text == "Once upon a time"


async def test_async_client_errors(gateway: Gateway) -> None:
    async with async_client(gateway, key="sk-wrong") as sdk:
        with pytest.raises(openai.AuthenticationError):
            await sdk.models.list()
    async with async_client(gateway) as sdk:
        with pytest.raises(openai.BadRequestError):
            await sdk.chat.completions.create(model="error-400", messages=MESSAGES)
        with pytest.raises(openai.InternalServerError):
            await sdk.chat.completions.create(model="error-500", messages=MESSAGES)
