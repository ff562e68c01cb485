"""Contract tests: each adapter in front of a fake answering as its runtime does, driven
through the gateway with the OpenAI SDK."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from adapters import normalise
from tests.conftest import Gateway, GatewayFactory
from tests.support.fakes import LoopThread, start_fake
from tests.support.runtime_fakes import FLAVOURS, MODEL, RuntimeFake

KEY = "sk-contract"
ADMIN = "sk-admin"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@dataclass
class Runtime:
    fake: RuntimeFake
    gateway: Gateway

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=10)

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.post(self.gateway.url + path, headers={"Authorization": f"Bearer {KEY}"}, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=FLAVOURS)
def runtime(
    request: pytest.FixtureRequest, loop_thread: LoopThread, start_gateway: GatewayFactory
) -> Iterator[Runtime]:
    fake = RuntimeFake(request.param)
    runner, port = loop_thread.run(start_fake(fake))  # type: ignore[arg-type]
    gateway = start_gateway(
        backend=request.param, backend_url=f"http://127.0.0.1:{port}", api_keys=[KEY], admin_api_keys=[ADMIN]
    )
    yield Runtime(fake, gateway)
    loop_thread.run(runner.cleanup())


def test_model_list_has_the_openai_shape(runtime: Runtime) -> None:
    response = httpx.get(runtime.gateway.url + "/v1/models", headers={"x-api-key": KEY})
    body = response.json()
    assert body["object"] == "list"
    (entry,) = body["data"]
    assert entry["id"] == MODEL
    assert entry["object"] == "model"
    assert isinstance(entry["created"], int)
    assert entry["owned_by"]
    if runtime.fake.flavour == "llamacpp":
        assert body["models"][0]["name"] == MODEL  # extra fields are kept
        assert entry["meta"] == {"n_ctx_train": 4096}
    with runtime.sdk() as sdk:
        assert [model.id for model in sdk.models.list()] == [MODEL]


def test_model_by_id_everywhere(runtime: Runtime) -> None:
    with runtime.sdk() as sdk:
        model = sdk.models.retrieve(MODEL)
        assert model.id == MODEL
        assert model.owned_by
        with pytest.raises(openai.NotFoundError):
            sdk.models.retrieve("missing/model")


def test_chat_and_stream(runtime: Runtime) -> None:
    with runtime.sdk() as sdk:
        completion = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert completion.choices[0].message.content == "Hi there"
        stream = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hi there"


def test_context_error_keeps_status_and_message(runtime: Runtime) -> None:
    expected = openai.UnprocessableEntityError if runtime.fake.flavour == "tgi" else openai.BadRequestError
    with runtime.sdk() as sdk, pytest.raises(expected) as caught:
        sdk.chat.completions.create(model="too-long", messages=MESSAGES)
    assert "maximum context length is 4096 tokens" in caught.value.message
    body = caught.value.body
    assert isinstance(body, dict)
    assert isinstance(body["message"], str)


def test_unknown_model_is_not_found(runtime: Runtime) -> None:
    with runtime.sdk() as sdk, pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="nope", messages=MESSAGES)
    assert '"nope" not found' in caught.value.message


def test_embeddings_or_501(runtime: Runtime) -> None:
    runtime.fake.paths.clear()
    with runtime.sdk() as sdk:
        if runtime.fake.flavour == "tgi":
            with pytest.raises(openai.APIStatusError) as caught:
                sdk.embeddings.create(model=MODEL, input="x")
            assert caught.value.status_code == 501
            assert caught.value.response.headers["x-should-retry"] == "false"
            assert "not served by the tgi backend" in caught.value.message
            assert runtime.fake.paths == []
        else:
            result = sdk.embeddings.create(model=MODEL, input="x", encoding_format="float")
            assert result.data[0].embedding == [0.5, 0.25]


def test_mid_stream_error_reaches_the_sdk(runtime: Runtime) -> None:
    with runtime.sdk() as sdk:
        stream = sdk.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            extra_body={"fail_mid_stream": True},
        )
        with pytest.raises(openai.APIError):
            list(stream)


def test_readiness(runtime: Runtime) -> None:
    url = runtime.gateway.url + "/ready"
    assert httpx.get(url).status_code == 200
    runtime.fake.loading = True
    time.sleep(1.1)  # /ready answers from a probe at most a second old
    response = httpx.get(url)
    if runtime.fake.flavour in {"llamacpp", "sglang", "localai"}:
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "backend_loading"
        assert response.json()["error"]["message"] == "backend loading"
    elif runtime.fake.flavour in {"vllm", "tgi"}:
        # They refuse connections while loading; a 503 from /health means a dead engine.
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "backend_unhealthy"
    else:
        assert response.status_code == 200  # Ollama loads models lazily, on first use


def test_dangerous_runtime_routes_are_unreachable(runtime: Runtime) -> None:
    runtime.fake.paths.clear()
    for method, path in [
        ("POST", "/sleep"),
        ("POST", "/collective_rpc"),
        ("POST", "/reset_prefix_cache"),
        ("POST", "/v1/reset_prefix_cache"),
        ("POST", "/api/pull"),
        ("DELETE", "/api/delete"),
        ("GET", "/slots"),
        ("POST", "/flush_cache"),
    ]:
        response = httpx.request(method, runtime.gateway.url + path, headers={"x-api-key": ADMIN})
        assert response.status_code == 404, path
    # /metrics is the gateway's own; the runtime's is not reachable.
    assert b"gateway_requests_total" in httpx.get(runtime.gateway.url + "/metrics").content
    assert runtime.fake.paths == []


def test_tokenize_goes_to_the_runtime_path(runtime: Runtime) -> None:
    runtime.fake.paths.clear()
    response = runtime.post("/v1/tokenize", json={"model": MODEL, "prompt": "hi"})
    flavour = runtime.fake.flavour
    if flavour == "ollama":
        assert response.status_code == 501
        assert runtime.fake.paths == []
        return
    assert response.status_code == 200
    assert response.json()["tokens"] == [1, 2, 3]
    expected = "/v1/tokenize" if flavour in {"sglang", "localai"} else "/tokenize"
    assert runtime.fake.paths == [expected]


def test_lora_admin_routes_need_the_admin_key(runtime: Runtime) -> None:
    body = {"lora_name": "sql", "lora_path": "/loras/sql"}
    url = runtime.gateway.url + "/v1/load_lora_adapter"
    assert httpx.post(url, json=body, headers={"x-api-key": KEY}).status_code == 401
    runtime.fake.paths.clear()
    response = httpx.post(url, json=body, headers={"x-api-key": ADMIN})
    if runtime.fake.flavour in {"vllm", "sglang"}:
        assert response.status_code == 200
        assert runtime.fake.paths == [
            "/v1/load_lora_adapter" if runtime.fake.flavour == "vllm" else "/load_lora_adapter"
        ]
    else:
        assert response.status_code == 501
        assert runtime.fake.paths == []


def test_admin_routes_do_not_exist_without_admin_keys(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(backend="vllm", api_keys=[KEY])
    response = httpx.post(gateway.url + "/v1/load_lora_adapter", json={}, headers={"x-api-key": KEY})
    assert response.status_code == 404


def test_routes_only_some_runtimes_serve(runtime: Runtime) -> None:
    served = {
        "/v1/images/generations": {"localai"},
        "/v1/audio/speech": {"localai"},
        "/v1/moderations": {"localai"},
        "/v1/score": {"vllm", "sglang"},
        "/v1/audio/translations": {"vllm"},
    }
    for path, runtimes in served.items():
        runtime.fake.paths.clear()
        response = runtime.post(path, json={"model": MODEL, "input": "x", "prompt": "x"})
        if runtime.fake.flavour in runtimes:
            assert runtime.fake.paths == [path], path
        else:
            assert response.status_code == 501, path
            assert runtime.fake.paths == []


# Normalisation, unit level


@pytest.mark.parametrize(
    ("status", "body", "type_", "message", "code", "backend_type"),
    [
        (422, b'{"error": "Input validation error: too long", "error_type": "validation"}',
         "invalid_request", "Input validation error: too long", None, "validation"),
        (429, b'{"error": "Model is overloaded", "error_type": "overloaded"}',
         "rate_limit_exceeded", "Model is overloaded", None, "overloaded"),
        (400, b'{"object": "error", "message": "bad", "type": "BadRequestError", "param": null, "code": 400}',
         "invalid_request", "bad", None, "BadRequestError"),
        # vLLM's own errors: its exception names as type, the status as an integer code.
        (404, b'{"error": {"message": "The model `x` does not exist.", "type": "NotFoundError",'
              b' "param": "model", "code": 404}}',
         "not_found", "The model `x` does not exist.", "model_not_found", "NotFoundError"),
        (400, b'{"error": {"message": "1 validation error", "type": "Bad Request", "param": "body.messages",'
              b' "code": 400}}', "invalid_request", "1 validation error", None, "Bad Request"),
        (400, b'{"error": {"message": "max_tokens=5000 cannot be greater than max_model_len=2048.",'
              b' "type": "BadRequestError", "param": "max_tokens", "code": 400}}',
         "invalid_request", "max_tokens=5000 cannot be greater than max_model_len=2048.",
         "context_length_exceeded", "BadRequestError"),
        # llama.cpp's: its own type names, integer codes.
        (400, b'{"error": {"code": 400, "message": "the request exceeds the available context size",'
              b' "type": "exceed_context_size_error", "n_prompt_tokens": 9000, "n_ctx": 4096}}',
         "invalid_request", "the request exceeds the available context size", "context_length_exceeded",
         "exceed_context_size_error"),
        (503, b'{"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}',
         "backend_unavailable", "Loading model", None, "unavailable_error"),
        # Hosted APIs' string codes are kept.
        (429, b'{"error": {"message": "slow down", "type": "requests", "param": null, "code": "rate_limit"}}',
         "rate_limit_exceeded", "slow down", "rate_limit", "requests"),
        (404, b'{"detail": "Not Found"}', "not_found", "Not Found", None, None),
        (422, b'{"detail": [{"loc": ["body", "messages"], "msg": "field required", "type": "missing"}]}',
         "invalid_request", "body.messages: field required", None, None),
        (401, b"", "authentication_error", "the backend answered 401 with an empty body", None, None),
        (502, b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
         "backend_error", "the backend answered 502 with a body that is not JSON: 502 Bad Gateway",
         None, None),
        (500, b"[1, 2]", "backend_error", "the backend answered 500: [1,2]", None, None),
    ],
)  # fmt: skip
def test_every_error_shape_gets_one_envelope(
    status: int, body: bytes, type_: str, message: str, code: object, backend_type: str | None
) -> None:
    error = json.loads(normalise.error_body(status, body, model="x"))["error"]
    assert error["type"] == type_
    assert error["message"] == message
    assert error["code"] == code
    assert error.get("backend_type") == backend_type
    assert set(error) >= {"type", "message", "param", "code"}


def test_a_runtimes_other_error_fields_are_kept() -> None:
    body = b'{"error": {"code": 400, "message": "m", "type": "exceed_context_size_error", "n_ctx": 4096}}'
    assert json.loads(normalise.error_body(400, body))["error"]["n_ctx"] == 4096


@pytest.mark.parametrize(
    ("status", "body", "missing"),
    [
        (404, b'{"detail":"Not Found"}', True),  # FastAPI: vLLM, SGLang, llama-cpp-python
        (405, b'{"detail":"Method Not Allowed"}', True),
        (404, b"404 page not found", True),  # Go: Ollama
        (404, b"", True),  # axum: TGI
        (404, b'{"error": {"message": "The model `x` does not exist.", "type": "NotFoundError"}}', False),
        (404, b'{"detail":"File not found"}', False),
        (400, b'{"detail":"Not Found"}', False),
    ],
)
def test_an_unregistered_route_is_told_from_a_missing_model(status: int, body: bytes, missing: bool) -> None:
    assert normalise.route_missing(status, body) is missing


def test_anthropic_errors_get_anthropics_types() -> None:
    vllm = b'{"type":"error","error":{"type":"NotFoundError","message":"The model `x` does not exist."}}'
    assert json.loads(normalise.anthropic_error_body(404, vllm)) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "The model `x` does not exist."},
    }
    openai_shaped = b'{"error":{"message":"bad","type":"Bad Request","param":null,"code":400}}'
    assert json.loads(normalise.anthropic_error_body(400, openai_shaped))["error"] == {
        "type": "invalid_request_error",
        "message": "bad",
    }
    assert json.loads(normalise.anthropic_error_body(503, b"busy"))["error"]["type"] == "overloaded_error"


def test_complete_model_list_is_left_as_sent() -> None:
    body = b'{"object":"list","data":[{"id":"m","object":"model","created":1,"owned_by":"me"}]}'
    assert normalise.model_list(body, "vllm") is None
