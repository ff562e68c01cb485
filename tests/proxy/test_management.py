"""Operators' routes and the seed servers' own: model management mapped to each runtime's
way (or 501), text-generation-webui's internal routes, Files and Batches through the OpenAI
SDK, and a runtime's own metrics behind admin keys."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, GatewayFactory
from tests.support.fakes import LoopThread, free_port, start_fake
from tests.support.runtime_fakes import FLAVOURS, MODEL, SEED_FLAVOURS, RuntimeFake

KEY = "sk-client"
ADMIN = "sk-admin"
TOKEN = "metrics-secret"


@dataclass
class Runtime:
    fake: RuntimeFake
    gateway: Gateway

    def post(self, path: str, key: str = ADMIN, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.gateway.url + path, headers={"x-api-key": key}, **kwargs)

    def sent(self) -> list[tuple[str, str, Any]]:
        """What reached the runtime: method, path and the JSON body (None when empty)."""
        return [(m, p, json.loads(b) if b else None) for m, p, b in self.fake.requests]


def start_runtime(loop_thread: LoopThread, start_gateway: GatewayFactory, flavour: str) -> Iterator[Runtime]:
    fake = RuntimeFake(flavour)
    runner, port = loop_thread.run(start_fake(fake))  # type: ignore[arg-type]
    gateway = start_gateway(
        backend=flavour,
        backend_url=f"http://127.0.0.1:{port}",
        api_keys=[KEY],
        admin_api_keys=[ADMIN],
        metrics_token=TOKEN,
    )
    yield Runtime(fake, gateway)
    loop_thread.run(runner.cleanup())


@pytest.fixture(params=FLAVOURS + SEED_FLAVOURS)
def runtime(
    request: pytest.FixtureRequest, loop_thread: LoopThread, start_gateway: GatewayFactory
) -> Iterator[Runtime]:
    yield from start_runtime(loop_thread, start_gateway, request.param)


@pytest.fixture(params=["basert", "openai"])
def files_runtime(
    request: pytest.FixtureRequest, loop_thread: LoopThread, start_gateway: GatewayFactory
) -> Iterator[Runtime]:
    yield from start_runtime(loop_thread, start_gateway, request.param)


# What each runtime receives for the gateway's four management requests; absent: 501.
LOAD = {"model": "llama3", "keep_alive": "10m"}
LORA = {"lora_name": "sql", "lora_path": "/loras/sql"}
EXPECTED: dict[str, dict[str, tuple[str, Any]]] = {
    "/v1/models/load": {
        "ollama": ("/api/generate", {"model": "llama3", "stream": False, "keep_alive": "10m"}),
        "localai": ("/models/apply", {"id": "llama3", "keep_alive": "10m"}),
        "textgen": ("/v1/internal/model/load", {"model_name": "llama3", "args": {}, "settings": {}}),
        "basert": ("/v1/models/load", LOAD),
    },
    "/v1/models/unload": {
        "ollama": ("/api/generate", {"model": "llama3", "keep_alive": 0, "stream": False}),
        "localai": ("/backend/shutdown", {"model": "llama3"}),
        "textgen": ("/v1/internal/model/unload", None),
        "basert": ("/v1/models/unload", LOAD),
    },
    "/v1/lora/load": {
        "vllm": ("/v1/load_lora_adapter", LORA),
        "sglang": ("/load_lora_adapter", LORA),
        "textgen": ("/v1/internal/lora/load", {"lora_names": ["sql"]}),
        "basert": ("/v1/lora/load", LORA),
    },
    "/v1/lora/unload": {
        "vllm": ("/v1/unload_lora_adapter", LORA),
        "sglang": ("/unload_lora_adapter", LORA),
        "textgen": ("/v1/internal/lora/unload", None),
        "basert": ("/v1/lora/unload", LORA),
    },
}


@pytest.mark.parametrize("runtime", ["basert", "openai"], indirect=True)
def test_management_bodies_reach_runtimes_that_take_them_as_they_are_byte_for_byte(
    runtime: Runtime,
) -> None:
    # Spacing, key order, a float's spelling and a field the gateway does not know: all kept.
    body = b'{ "lora_path":"/loras/sql",  "lora_name" : "sql", "scale": 1.50, "x-extra": [1,2] }'
    for path in ("/v1/lora/load", "/v1/models/load"):
        runtime.fake.requests.clear()
        sent = body if path == "/v1/lora/load" else b'{"model": "llama3" , "keep_alive": "10m"}'
        response = httpx.post(
            runtime.gateway.url + path,
            content=sent,
            headers={"x-api-key": ADMIN, "content-type": "application/json"},
        )
        assert response.status_code == 200, response.text
        assert runtime.fake.requests == [("POST", path, sent)]


@pytest.mark.parametrize("runtime", ["vllm"], indirect=True)
def test_lora_routes_vllm_has_not_registered_are_501_saying_how_to_turn_them_on(runtime: Runtime) -> None:
    runtime.fake.lora_updating = False
    for path in ("/v1/lora/load", "/v1/lora/unload"):
        response = runtime.post(path, json=LORA)
        assert response.status_code == 501
        assert response.headers["x-should-retry"] == "false"
        error = response.json()["error"]
        assert error["type"] == "unsupported"
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in error["message"]
        assert "--enable-lora" in error["message"]


@pytest.mark.parametrize("path", list(EXPECTED))
def test_model_management_reaches_each_runtime_its_own_way(runtime: Runtime, path: str) -> None:
    body = LOAD if path.startswith("/v1/models") else LORA
    runtime.fake.requests.clear()
    response = runtime.post(path, json=body)
    expected = EXPECTED[path].get(runtime.fake.flavour)
    if expected is None:
        assert response.status_code == 501, response.text
        assert response.json()["error"]["type"] == "unsupported"
        assert runtime.fake.requests == []
        return
    assert response.status_code == 200, response.text
    assert runtime.sent() == [("POST", *expected)]


def test_model_management_needs_an_admin_key_and_its_fields(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(backend="basert", api_keys=[KEY], admin_api_keys=[ADMIN])
    url = gateway.url + "/v1/models/load"
    assert httpx.post(url, json=LOAD, headers={"x-api-key": KEY}).status_code == 401
    response = httpx.post(url, json={"model": ""}, headers={"x-api-key": ADMIN})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "missing_field"
    response = httpx.post(
        gateway.url + "/v1/lora/load", json={"lora_path": "x"}, headers={"x-api-key": ADMIN}
    )
    assert response.status_code == 400
    # Without admin keys the routes do not exist (404, not the 405 of GET /v1/models/{id}).
    open_gateway = start_gateway(backend="basert", api_keys=[KEY])
    for path in ("/v1/models/load", "/v1/models/unload", "/v1/lora/load", "/v1/internal/model/load"):
        response = httpx.post(open_gateway.url + path, json=LOAD, headers={"x-api-key": KEY})
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "not_found"


@pytest.fixture
def textgen(loop_thread: LoopThread, start_gateway: GatewayFactory) -> Iterator[Runtime]:
    yield from start_runtime(loop_thread, start_gateway, "textgen")


def test_textgen_internal_routes_client_and_admin(textgen: Runtime) -> None:
    for path in ("encode", "decode", "token-count", "logits", "chat-prompt"):
        response = textgen.post(f"/v1/internal/{path}", key=KEY, json={"text": "hi", "tokens": [1]})
        assert response.status_code == 200, path
        assert response.json() == {"route": path}
    info = httpx.get(textgen.gateway.url + "/v1/internal/model/info", headers={"x-api-key": KEY})
    assert info.json() == {"route": "model/info"}
    # Loading, unloading and listing what could be loaded are the operators'.
    # So is stopping generation: it stops every client's.
    for method, path in (("GET", "model/list"), ("POST", "model/load"), ("POST", "model/unload"),
                         ("GET", "lora/list"), ("POST", "lora/load"), ("POST", "lora/unload"),
                         ("POST", "stop-generation")):  # fmt: skip
        url = f"{textgen.gateway.url}/v1/internal/{path}"
        body = {"model_name": "llama3", "lora_names": ["sql"]} if path.endswith("/load") else None
        assert httpx.request(method, url, json=body, headers={"x-api-key": KEY}).status_code == 401, path
        response = httpx.request(method, url, json=body, headers={"x-api-key": ADMIN})
        assert response.status_code == 200, path
    assert (
        "POST",
        "/v1/internal/model/load",
        {"model_name": "llama3", "lora_names": ["sql"]},
    ) in textgen.sent()


def test_textgen_routes_are_501_elsewhere(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(backend="vllm", api_keys=[KEY])
    response = httpx.post(
        gateway.url + "/v1/internal/encode", json={"text": "hi"}, headers={"x-api-key": KEY}
    )
    assert response.status_code == 501
    assert response.json()["error"]["type"] == "unsupported"


def test_files_and_batches_through_the_sdk(files_runtime: Runtime) -> None:
    with openai.OpenAI(
        base_url=files_runtime.gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=10
    ) as sdk:
        lines = b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n' * 2000
        uploaded = sdk.files.create(file=("requests.jsonl", io.BytesIO(lines)), purpose="batch")
        assert uploaded.bytes == len(lines)
        assert uploaded.filename == "requests.jsonl"
        assert [f.id for f in sdk.files.list()] == [uploaded.id]
        assert sdk.files.retrieve(uploaded.id).purpose == "batch"
        assert sdk.files.content(uploaded.id).content == lines
        batch = sdk.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert sdk.batches.retrieve(batch.id).input_file_id == uploaded.id
        assert [b.id for b in sdk.batches.list()] == [batch.id]
        assert sdk.batches.cancel(batch.id).status == "cancelling"
        assert sdk.files.delete(uploaded.id).deleted
        with pytest.raises(openai.NotFoundError):
            sdk.files.retrieve(uploaded.id)


@pytest.fixture(params=["vllm", "tgi", "ollama"])
def no_files_runtime(
    request: pytest.FixtureRequest, loop_thread: LoopThread, start_gateway: GatewayFactory
) -> Iterator[Runtime]:
    yield from start_runtime(loop_thread, start_gateway, request.param)


def test_files_and_batches_are_501_where_the_runtime_has_none(no_files_runtime: Runtime) -> None:
    runtime = no_files_runtime
    with openai.OpenAI(base_url=runtime.gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=10) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            sdk.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
        assert caught.value.status_code == 501
        with pytest.raises(openai.APIStatusError) as caught:
            sdk.batches.list()
        assert caught.value.status_code == 501
        assert runtime.fake.requests == []


def test_a_runtimes_own_metrics_are_for_operators(runtime: Runtime) -> None:
    url = (
        runtime.gateway.url + "/admin/backends/" + runtime.gateway.app.state.router.default.name + "/metrics"
    )
    assert httpx.get(url, headers={"x-api-key": KEY}).status_code == 401
    assert httpx.get(url).status_code == 401
    for headers in ({"x-api-key": ADMIN}, {"authorization": f"Bearer {TOKEN}"}):
        response = httpx.get(url, headers=headers)
        if runtime.fake.flavour in {"ollama", "textgen"}:
            assert response.status_code == 501
            continue
        assert response.status_code == 200, response.text
        assert response.text.startswith(f"# TYPE {runtime.fake.flavour}_requests_running gauge")
        assert response.headers["content-type"].startswith("text/plain")
    assert httpx.get(url + "?replica=3", headers={"x-api-key": ADMIN}).status_code in {404, 501}
    missing = runtime.gateway.url + "/admin/backends/nope/metrics"
    assert httpx.get(missing, headers={"x-api-key": ADMIN}).json()["error"]["code"] == "backend_not_found"


def test_fleet_management_goes_to_the_named_backend(
    loop_thread: LoopThread, start_gateway: GatewayFactory
) -> None:
    fakes = [RuntimeFake("basert"), RuntimeFake("ollama")]
    started = [loop_thread.run(start_fake(fake)) for fake in fakes]  # type: ignore[arg-type]
    try:
        gateway = start_gateway(
            backend_url=None,
            backends=[
                {
                    "name": "seed",
                    "kind": "basert",
                    "url": f"http://127.0.0.1:{started[0][1]}",
                    "default": True,
                },
                {"name": "local", "kind": "ollama", "url": f"http://127.0.0.1:{started[1][1]}"},
            ],
            api_keys=[KEY],
            admin_api_keys=[ADMIN],
        )
        headers = {"x-api-key": ADMIN}
        response = httpx.post(
            gateway.url + "/v1/models/load", json={**LOAD, "backend": "local"}, headers=headers
        )
        assert response.status_code == 200
        assert response.headers["x-gateway-backend"] == "local"
        assert ("POST", "/api/generate", b'{"model":"llama3","stream":false,"keep_alive":"10m"}') in fakes[
            1
        ].requests
        # A model no list has yet goes to the default backend, without the gateway's field.
        response = httpx.post(gateway.url + "/v1/models/load", json=LOAD, headers=headers)
        assert response.headers["x-gateway-backend"] == "seed"
        assert fakes[0].requests[-1] == (
            "POST",
            "/v1/models/load",
            json.dumps(LOAD).replace(" ", "").encode(),
        )
        response = httpx.post(
            gateway.url + "/v1/models/load", json={**LOAD, "backend": "nope"}, headers=headers
        )
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "backend_not_found"
    finally:
        for runner, _ in started:
            loop_thread.run(runner.cleanup())


def test_management_reaches_every_replica_and_says_which_failed(
    loop_thread: LoopThread, start_gateway: GatewayFactory
) -> None:
    fakes = [RuntimeFake("ollama"), RuntimeFake("ollama")]
    started = [loop_thread.run(start_fake(fake)) for fake in fakes]  # type: ignore[arg-type]
    dead = f"http://127.0.0.1:{free_port()}"
    urls = [f"http://127.0.0.1:{port}" for _, port in started]
    try:
        gateway = start_gateway(
            backend_url=None,
            backends=[
                {"name": "local", "kind": "ollama", "urls": urls, "models": [MODEL]},
                {"name": "half", "kind": "ollama", "urls": [urls[0], dead], "models": ["other"]},
            ],
            api_keys=[KEY],
            admin_api_keys=[ADMIN],
        )
        headers = {"x-api-key": ADMIN}
        response = httpx.post(gateway.url + "/v1/models/load", json={"model": MODEL}, headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["x-gateway-backend"] == "local"
        assert sorted(answer["url"] for answer in response.json()["data"]) == sorted(urls)
        assert all(answer["status"] == 200 for answer in response.json()["data"])
        for fake in fakes:
            assert ("POST", "/api/generate", b'{"model":"org/model-7b","stream":false}') in fake.requests
        response = httpx.post(gateway.url + "/v1/models/unload", json={"model": "other"}, headers=headers)
        assert response.status_code == 502
        body = response.json()
        assert body["error"]["code"] == "replicas_failed"
        assert body["error"]["message"] == "1 of 2 replicas of the half backend failed"
        statuses = {answer["url"]: answer["status"] for answer in body["data"]}
        assert statuses == {urls[0]: 200, dead: 502}
    finally:
        for runner, _ in started:
            loop_thread.run(runner.cleanup())


def test_a_model_load_naming_a_remote_source_is_refused_unless_allowed(
    loop_thread: LoopThread, start_gateway: GatewayFactory
) -> None:
    fake = RuntimeFake("localai")
    runner, port = loop_thread.run(start_fake(fake))  # type: ignore[arg-type]
    try:
        url = f"http://127.0.0.1:{port}"
        closed = start_gateway(backend="localai", backend_url=url, api_keys=[KEY], admin_api_keys=[ADMIN])
        admin = {"authorization": f"Bearer {ADMIN}"}
        for remote in (
            {"url": "github:someone/models/evil.yaml"},
            {"config_url": "https://example.net/m.yaml"},
            {"files": [{"uri": "https://example.net/w.gguf", "filename": "w.gguf"}]},
        ):
            fake.requests.clear()
            answer = httpx.post(closed.url + "/v1/models/load", json={"model": "m", **remote}, headers=admin)
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"]["code"] == "remote_source"
            assert fake.requests == []
        # A model of its gallery is fine; remote sources are, once the operator allows them.
        fake.requests.clear()
        assert (
            httpx.post(closed.url + "/v1/models/load", json={"model": "m"}, headers=admin).status_code == 200
        )
        opened = start_gateway(
            backend="localai", backend_url=url, admin_api_keys=[ADMIN], allow_remote_model_sources=True
        )
        body = {"model": "m", "url": "github:someone/models/m.yaml"}
        assert httpx.post(opened.url + "/v1/models/load", json=body, headers=admin).status_code == 200
    finally:
        loop_thread.run(runner.cleanup())
