"""End to end: the gateway in front of a real vLLM (its CPU build) serving a tiny random Llama.

One vLLM serves the module (about a minute to start); the gateway's own launch of vLLM
starts one more. What a real server cannot be made to do stays with the fakes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import ADMIN, Gateway, GatewayFactory, replicas
from tests.support.fakes import free_port, wait_until
from tests.support.make_vllm_model import WINDOW
from tests.support.vllm_server import (
    ENV,
    LORA_NAME,
    MODEL_NAME,
    TinyModel,
    VllmServer,
    children_of,
    group_members,
    make_model,
    start_vllm,
    stop_vllm,
    vllm_python,
)

pytestmark = pytest.mark.vllm

KEY = "sk-test-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello, how are you today?"}]
# About 12 s of generation here, read to its end.
LONG = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 1900, "ignore_eos": True, "stream": True}
# Minutes of generation, for a stream left or broken while it runs: on two cores vLLM keeps
# busy, the test's process may wait for the CPU while the engine goes on, and a shorter one
# may be whole by the time its first line is read.
ENDLESS = {**LONG, "max_tokens": WINDOW - 100}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return make_model(tmp_path_factory.mktemp("vllm-model"))


@pytest.fixture(scope="module")
def vllm(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    server = start_vllm(tiny, tmp_path_factory.mktemp("vllm-log") / "vllm.log")
    yield server
    stop_vllm(server)


@pytest.fixture
def through(start_gateway: GatewayFactory, vllm: VllmServer) -> Gateway:
    return start_gateway(backend="vllm", backend_url=vllm.url, api_keys=[KEY], admin_api_keys=["sk-admin"])


OPENED: list[openai.OpenAI | anthropic.Anthropic | httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    yield
    while OPENED:
        OPENED.pop().close()


def poll(predicate: Callable[[], bool], timeout: float = 10, every: float = 0.5) -> bool:
    """``predicate`` asked twice a second (by default): vLLM's /metrics costs its API server,
    which shares a core with everything else here, and asking it 50 times a second starves
    what it reports."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def sdk(url: str) -> openai.OpenAI:
    """An OpenAI client, closed after the test."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    OPENED.append(client)
    return client


def test_the_same_greedy_answers_direct_and_through(vllm: VllmServer, through: Gateway) -> None:
    answers = []
    for client in (sdk(vllm.url), sdk(through.url)):
        chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0)
        completion = client.completions.create(
            model=MODEL_NAME, prompt="The gateway", max_tokens=8, temperature=0, logprobs=2
        )
        stream = client.chat.completions.create(
            model=MODEL_NAME,
            messages=CHAT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert completion.choices[0].logprobs is not None
        answers.append(
            (
                chat.choices[0].message.content,
                chat.usage,
                completion.choices[0].text,
                completion.choices[0].logprobs.tokens,
                completion.choices[0].logprobs.token_logprobs,
                streamed,
                chunks[-1].usage,
            )
        )
    direct, gateway = answers
    assert direct == gateway
    assert direct[1] is not None
    assert direct[1].completion_tokens == 12
    assert direct[6] is not None
    assert direct[6].completion_tokens == 12
    tokenized = httpx.post(
        through.url + "/v1/tokenize", json={"model": MODEL_NAME, "prompt": "hi"}, headers=AUTH
    )
    assert tokenized.status_code == 200
    assert (
        tokenized.json()
        == httpx.post(vllm.url + "/tokenize", json={"model": MODEL_NAME, "prompt": "hi"}).json()
    )


@pytest.mark.parametrize(
    ("request_body", "exception", "status", "type_", "code"),
    [
        (
            {"model": "no-such-model", "messages": CHAT},
            openai.NotFoundError,
            404,
            "not_found",
            "model_not_found",
        ),
        (
            {"model": MODEL_NAME, "messages": "not a list"},
            openai.BadRequestError,
            400,
            "invalid_request",
            None,
        ),
        (
            {"model": MODEL_NAME, "messages": CHAT, "max_tokens": WINDOW + 1000},
            openai.BadRequestError,
            400,
            "invalid_request",
            "context_length_exceeded",
        ),
    ],
)
def test_errors_are_the_same_sdk_classes_in_one_envelope(
    vllm: VllmServer,
    through: Gateway,
    request_body: dict[str, Any],
    exception: type[openai.APIStatusError],
    status: int,
    type_: str,
    code: str | None,
) -> None:
    for client in (sdk(vllm.url), sdk(through.url)):
        with pytest.raises(exception) as raised:
            client.chat.completions.create(**request_body)
        assert raised.value.status_code == status
    direct = httpx.post(vllm.url + "/v1/chat/completions", json=request_body).json()["error"]
    error = httpx.post(through.url + "/v1/chat/completions", json=request_body, headers=AUTH).json()["error"]
    # vLLM's own: its exception names as type, an integer code.
    assert isinstance(direct["code"], int)
    assert error["type"] == type_
    assert error["code"] == code
    assert error["message"] == direct["message"]
    assert error["param"] == direct["param"]
    assert error["backend_type"] == direct["type"]


@pytest.mark.parametrize(
    ("path", "why"),
    [("/v1/embeddings", "pooling model"), ("/v1/rerank", "cross-encoder"), ("/v1/score", "cross-encoder")],
)
def test_a_route_vllm_has_not_registered_is_501_saying_why(
    vllm: VllmServer, through: Gateway, path: str, why: str
) -> None:
    body = {"model": MODEL_NAME, "input": "x", "query": "x", "documents": ["a"], "text_1": "a", "text_2": "b"}
    direct = httpx.post(vllm.url + path, json=body)
    assert (direct.status_code, direct.json()) == (404, {"detail": "Not Found"})
    answer = httpx.post(through.url + path, json=body, headers=AUTH)
    assert answer.status_code == 501
    assert answer.headers["x-should-retry"] == "false"
    error = answer.json()["error"]
    assert error["type"] == "unsupported"
    assert why in error["message"]
    assert path in error["message"]
    assert "vllm" in error["message"]
    with pytest.raises(openai.InternalServerError) as raised:
        sdk(through.url).embeddings.create(model=MODEL_NAME, input="x")
    assert raised.value.status_code == 501
    # A model that does not exist is still that, not a missing route.
    missing = httpx.post(
        through.url + "/v1/chat/completions", json={"model": "nope", "messages": CHAT}, headers=AUTH
    )
    assert missing.status_code == 404


def _lora_round_trip(gateway: Gateway, tiny: TinyModel) -> None:
    client = sdk(gateway.url)
    base = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0)
    loaded = httpx.post(
        gateway.url + "/v1/lora/load",
        json={"lora_name": LORA_NAME, "lora_path": str(tiny.lora)},
        headers=ADMIN,
        timeout=60,
    )
    assert loaded.status_code == 200, loaded.text
    try:
        # At once, with no wait for a refresh: the list was read again before the answer.
        adapted = client.chat.completions.create(model=LORA_NAME, messages=CHAT, max_tokens=8, temperature=0)
        assert adapted.model == LORA_NAME
        assert adapted.choices[0].message.content != base.choices[0].message.content
        assert LORA_NAME in {model.id for model in client.models.list()}
    finally:
        unloaded = httpx.post(
            gateway.url + "/v1/lora/unload", json={"lora_name": LORA_NAME}, headers=ADMIN, timeout=60
        )
    assert unloaded.status_code == 200, unloaded.text
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model=LORA_NAME, messages=CHAT, max_tokens=8)
    assert raised.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert LORA_NAME not in {model.id for model in client.models.list()}


def test_a_lora_loaded_through_the_gateway_is_routed_at_once_and_gone_after_unload(
    through: Gateway, tiny: TinyModel
) -> None:
    _lora_round_trip(through, tiny)


def test_a_lora_loaded_through_a_fleet_gateway_is_routed_at_once(
    fleet_gateway: Any, vllm: VllmServer, tiny: TinyModel
) -> None:
    gateway = fleet_gateway([{"name": "cpu", "kind": "vllm", "url": vllm.url}])
    _lora_round_trip(gateway, tiny)


def test_a_client_that_leaves_frees_its_slot_in_vllm(vllm: VllmServer, through: Gateway) -> None:
    """vLLM's own log says it aborted the request once the client left. Its running gauge is
    no proof: a request that ran to its end reads 0 as well, and on two cores vLLM keeps busy
    its API server may be late to update the gauge."""
    with httpx.stream(
        "POST",
        through.url + "/v1/chat/completions",
        json=ENDLESS,
        headers=AUTH,
        timeout=60,
    ) as response:
        lines = response.iter_lines()  # held: a dropped line iterator closes the connection
        first = next(line for line in lines if line.startswith("data: "))
        aborted = f"Request {json.loads(first.removeprefix('data: '))['id']} aborted."
        assert not vllm.logged(aborted)
    # Minutes of generation were left; a request that runs to its end is not "aborted".
    assert poll(lambda: vllm.logged(aborted), timeout=30, every=0.1), vllm.tail()
    assert poll(lambda: vllm.metric("vllm:num_requests_running") == 0)


def test_a_stream_with_no_limit_and_no_usage_is_charged_what_it_generated(
    vllm: VllmServer, start_gateway: GatewayFactory
) -> None:
    """vLLM sends no usage unless asked and, with no max_tokens, generates to the end of its
    window: the key pays for the tokens relayed (here until it leaves), not the reservation."""
    gateway = start_gateway(
        backend="vllm",
        backend_url=vllm.url,
        api_keys=[KEY],
        token_limit="100000/minute",
        default_max_tokens=10,
    )
    unlimited = {"model": MODEL_NAME, "messages": CHAT, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=unlimited, headers=AUTH, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        events = 0
        while events < 60:
            events += next(lines).startswith("data: ")
    after = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": CHAT, "max_tokens": 1},
        headers=AUTH,
        timeout=60,
    )
    assert after.status_code == 200
    # Held at 10 and a prompt's estimate, as before, it would have left over 99,950.
    assert int(after.headers["x-ratelimit-remaining-tokens"]) <= 100_000 - 60


def test_queue_balancing_reads_vllms_own_running_count(fleet_gateway: Any, vllm: VllmServer) -> None:
    """While a generation runs, the gateway's scrapes of vLLM's /metrics report it running:
    the most it has seen running at once (``batch_seen``) becomes 1, and 0 is reported once
    the client has left. The generation lasts minutes and is held while the gateway is asked:
    on two cores vLLM keeps busy a scrape may time out, so a generation of a few seconds may
    see none succeed."""
    gateway = fleet_gateway(
        [{"name": "cpu", "kind": "vllm", "url": vllm.url, "strategy": "queue", "scrape_interval": 2.0}]
    )
    assert replicas(gateway)[vllm.url]["batch_seen"] == 0
    # What an earlier test left (an aborted generation) may still hold vLLM: it starts idle, and
    # the gateway's view of it ready (a probe that met a stall would have ejected it).
    assert poll(lambda: vllm.metric("vllm:num_requests_running") == 0, timeout=60)
    assert poll(lambda: replicas(gateway)[vllm.url]["state"] == "ready", timeout=60)
    seen: dict[str, Any] = {}

    def running_seen() -> bool:
        nonlocal seen
        try:
            seen = replicas(gateway)[vllm.url]
        except httpx.TimeoutException:  # the process stalled with the rest: ask again
            return False
        return bool(seen["batch_seen"] == 1)

    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=ENDLESS, headers=AUTH, timeout=60
    ) as response:
        lines = response.iter_lines()  # held: a dropped line iterator closes the connection
        first = next(line for line in lines if line.startswith("data: "))
        assert "chat.completion.chunk" in first, first
        # Unread, the stream waits on this client; vLLM's engine keeps it running meanwhile.
        assert poll(running_seen, timeout=90), (seen, vllm.tail())
    assert poll(lambda: (replicas(gateway)[vllm.url]["reported"] or {}).get("running") == 0, timeout=60)


def test_the_anthropic_sdk_through_the_gateway(vllm: VllmServer, through: Gateway) -> None:
    texts = []
    for url in (vllm.url, through.url):
        client = anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=60)
        OPENED.append(client)
        greedy = {"temperature": 0}
        message = client.messages.create(
            model=MODEL_NAME, max_tokens=8, messages=[{"role": "user", "content": "Hello"}], extra_body=greedy
        )
        with client.messages.stream(
            model=MODEL_NAME, max_tokens=8, messages=[{"role": "user", "content": "Hello"}], extra_body=greedy
        ) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        counted = client.messages.count_tokens(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Hello"}]
        )
        texts.append(
            (
                message.content[0].text,  # type: ignore[union-attr]
                message.usage.output_tokens,
                streamed,
                final.usage,
                counted.input_tokens,
            )
        )
        with pytest.raises(anthropic.NotFoundError) as raised:
            client.messages.create(
                model="nope", max_tokens=8, messages=[{"role": "user", "content": "Hello"}]
            )
        assert raised.value.status_code == 404
    assert texts[0] == texts[1]
    # Its errors in Anthropic's envelope, with Anthropic's type for the status.
    body = {"model": "nope", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]}
    answer = httpx.post(through.url + "/v1/messages", json=body, headers={"x-api-key": KEY})
    assert answer.json()["type"] == "error"
    assert answer.json()["error"]["type"] == "not_found_error"
    refused = httpx.post(through.url + "/v1/messages", json=body, headers={"x-api-key": "wrong"})
    assert refused.status_code == 401
    assert refused.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": refused.json()["error"]["message"]},
    }
    # Charged from its usage: the prompt's tokens at the stream's start, the answer's at its end.
    page = httpx.get(through.url + "/metrics").text
    charged = [
        line
        for line in page.splitlines()
        if line.startswith("gateway_tokens_total") and 'route="messages"' in line
    ]
    assert any('kind="prompt"' in line for line in charged), charged
    assert any('kind="completion"' in line for line in charged), charged


# The gateway launching vLLM itself


def _serve(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **ENV, **(env or {})},
    )
    return process, f"http://127.0.0.1:{port}"


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None


def test_the_gateway_runs_vllm_with_its_flags_and_leaves_nothing_after_sigterm(tiny: TinyModel) -> None:
    process, url = _serve(
        "--backend", "vllm",
        "--model", str(tiny.model),
        "--model-alias", MODEL_NAME,
        "--runtime-python", vllm_python(),
        "--backend-arg=--enforce-eager",
        "--",
        "--max-num-seqs", "4",
    )  # fmt: skip
    stderr: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(process.stderr.readline, b"")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        assert wait_until(lambda: _get(url + "/health") is not None, timeout=30)
        waiting = _get(url + "/ready")
        assert waiting is not None
        assert waiting.status_code == 503
        reason = waiting.json()["error"]["message"]
        assert "waiting for the embedded vllm backend" in reason
        assert "GET /health" in reason
        (child,) = children_of(process.pid)
        assert wait_until(
            lambda: (_get(url + "/ready") or httpx.Response(503)).status_code == 200, timeout=400
        ), b"".join(stderr)[-3000:].decode(errors="replace")
        command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        # Its own port asks for its key on every path, not only under /v1.
        direct = f"http://127.0.0.1:{int(command[command.index(b'--port') + 1])}"
        for path in ("/tokenize", "/pooling", "/invocations"):
            assert httpx.post(direct + path, json={"prompt": "hi"}, timeout=10).status_code == 401, path
        assert httpx.get(direct + "/metrics", timeout=10).status_code == 401
        assert httpx.get(direct + "/health", timeout=10).status_code == 200
        assert b"--enforce-eager" in command
        assert b"--max-num-seqs" in command
        assert b"--max-model-len" not in command  # the model's own window
        client = sdk(url)
        answer = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4, temperature=0)
        assert answer.usage is not None
        assert answer.usage.completion_tokens == 4
        engine = group_members(child)
        assert len(engine) >= 2, engine  # the API server and its engine core

        # vLLM killed mid-stream: the client's stream ends with an error event.
        with httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            json=ENDLESS,
            timeout=60,
        ) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            os.kill(child, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        last = json.loads(rest[-1].removeprefix("data: "))
        assert last["error"]["type"] in {"backend_error", "backend_unreachable"}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(5)
        process.stderr.close()  # type: ignore[union-attr]
    # Whatever vLLM had started (its engine core) went with it, restart or not.
    assert wait_until(lambda: not group_members(child), timeout=15), group_members(child)
    for pid in children_of(process.pid):
        assert not group_members(pid)


def test_a_vllm_that_never_becomes_ready_stops_the_gateway_saying_why(tiny: TinyModel) -> None:
    # Twice the model's window: vLLM refuses to start, every time.
    process, _url = _serve(
        "--backend", "vllm",
        "--model", str(tiny.model),
        "--runtime-python", vllm_python(),
        "--context-size", str(2 * WINDOW),
        "--backend-arg=--enforce-eager",
    )  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(
            f"the gateway kept restarting vLLM: {stderr.decode(errors='replace')[-3000:]}"
        ) from None
    log = stderr.decode(errors="replace")
    assert process.returncode == 1, log[-3000:]
    assert "exited 3 times in a row before it was ever ready" in log
    assert "max_model_len" in log or "max-model-len" in log  # vLLM's own words, from its output


def test_a_higher_priority_is_answered_ahead_of_a_flood(
    start_gateway: GatewayFactory, vllm: VllmServer, tmp_path: Path
) -> None:
    """Flow control in front of the real vLLM, one request at a time (``--max-concurrency 1``):
    while a batch key's endless stream holds the slot, two more of its requests wait, then a
    request of a key of a higher priority; when the stream is left, that request is answered
    next, before the batch requests that waited longer. The order is vLLM's, as its log has
    them received (one at a time, each sent once the one before has ended): when each client
    reads its answer says nothing of it here, where the test's threads and the gateway's
    share a process that waits for the CPU vLLM keeps busy."""
    import concurrent.futures

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"name": "batch", "key": "sk-batch", "priority": 0},
        {"name": "chat", "key": "sk-chat", "priority": 5},
    ]}))  # fmt: skip
    gateway = start_gateway(
        backend="vllm",
        backend_url=vllm.url,
        keys_file=str(keys),
        max_concurrency=1,
        admin_api_keys=["sk-admin"],
    )
    body = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 64, "ignore_eos": True}
    ids: dict[str, str] = {}

    def send(key: str, name: str) -> int:
        answer = httpx.post(
            gateway.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer sk-{key}"},
            timeout=120,
        )
        ids[name] = answer.json()["id"]
        return answer.status_code

    # One client, asked five times a second: a client made for each question (its TLS context
    # loaded again) every 20 ms keeps the interpreter's lock from the gateway and the senders,
    # which share this process, on two cores vLLM keeps busy.
    admin = httpx.Client(headers=ADMIN, timeout=5)
    OPENED.append(admin)

    def waiting() -> int:
        data = admin.get(gateway.url + "/admin/backends").json()["data"]
        return int(data[0]["queue"]["waiting"])

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        headers = {"Authorization": "Bearer sk-batch"}
        with httpx.stream(
            "POST", gateway.url + "/v1/chat/completions", json=ENDLESS, headers=headers, timeout=60
        ) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # held: a dropped line iterator closes the connection
            next(lines)  # generating: the one slot is taken until the stream is left
            answers = []
            for n, (key, name) in enumerate(
                [("batch", "batch-1"), ("batch", "batch-2"), ("chat", "chat-0")], 1
            ):
                answers.append(pool.submit(send, key, name))
                assert poll(lambda: waiting() == n, timeout=30, every=0.2), f"{name} did not wait"  # noqa: B023
        assert [answer.result() for answer in answers] == [200] * 3
    log = vllm.log.read_text(errors="replace")
    received = {name: log.find(f"Received request {id_}") for name, id_ in ids.items()}
    assert -1 not in received.values(), (ids, vllm.tail())
    assert sorted(received, key=received.__getitem__) == ["chat-0", "batch-1", "batch-2"]
