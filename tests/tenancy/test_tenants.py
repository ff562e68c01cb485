"""What one key can do to another key and to the gateway: model allowlists, and the small
doors (redirects, repeated credentials, forwarded headers, loopback hosts)."""

from __future__ import annotations

import io
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from gateway.tenancy.auth import plain_key_name
from tests.conftest import ADMIN, AUTH, Fake, Gateway, GatewayFactory, Runtime
from tests.support.fakes import LoopThread, free_port, start_fake, wait_until
from tests.support.object_fakes import ObjectRuntime
from tests.support.processes import serve, stop
from tests.support.raw import RawClient
from tests.support.runtime_fakes import RuntimeFake

KEYS_FILE = """keys:
  - name: alice
    key: sk-alice
    models: ["org/model-*"]
  - name: bob
    key: sk-bob
"""


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(KEYS_FILE)
    return path


def test_a_key_uses_only_the_models_it_is_allowed(
    start_gateway: GatewayFactory, objects: tuple[ObjectRuntime, str], keys_file: Path
) -> None:
    runtime, url = objects
    gateway = start_gateway(backend="openai", backend_url=url, keys_file=keys_file)
    alice = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-alice", max_retries=0)
    bob = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-bob", max_retries=0)
    with alice, bob:
        hi = [{"role": "user", "content": "hi"}]
        assert alice.chat.completions.create(model="org/model-7b", messages=hi).choices  # type: ignore[arg-type]
        assert [m.id for m in alice.models.list()] == ["org/model-7b"]
        assert len(list(bob.models.list())) == 3
        assert bob.models.retrieve("org/other-1b").id == "org/other-1b"

        before = len(runtime.requests)
        with pytest.raises(openai.NotFoundError) as caught:
            alice.chat.completions.create(model="org/other-1b", messages=hi)  # type: ignore[arg-type]
        error = caught.value.body
        assert isinstance(error, dict)
        assert error["code"] == "model_not_found"
        assert "does not exist or this key may not use it" in error["message"]
        with pytest.raises(openai.NotFoundError):
            alice.models.retrieve("org/other-1b")
        with pytest.raises(openai.NotFoundError):
            alice.responses.create(model="team-a/tiny", input="x")
        with pytest.raises(openai.BadRequestError):  # the runtime's default model is not asked for
            alice.post("/chat/completions", body={"messages": hi}, cast_to=object)
        line = b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
        made = alice.files.create(file=("in.jsonl", io.BytesIO(line)), purpose="batch")
        with pytest.raises(openai.PermissionDeniedError):
            alice.batches.create(
                input_file_id=made.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert [r for r in runtime.requests[before:] if r[0] != "POST" or r[1] != "/v1/files"] == []
        # Another key is not held to alice's list.
        assert bob.chat.completions.create(model="org/other-1b", messages=hi).choices  # type: ignore[arg-type]


def test_a_multipart_upload_is_checked_by_its_model_field(
    start_gateway: GatewayFactory, objects: tuple[ObjectRuntime, str], keys_file: Path
) -> None:
    runtime, url = objects
    gateway = start_gateway(backend="openai", backend_url=url, keys_file=keys_file)
    files = {"file": ("a.wav", b"RIFF....", "audio/wav")}
    refused = httpx.post(
        gateway.url + "/v1/audio/transcriptions",
        data={"model": "whisper-1"},
        files=files,
        headers={"x-api-key": "sk-alice"},
    )
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "model_not_found"
    assert not any(path.startswith("/v1/audio") for _, path in runtime.requests)


# What routes that need no key cost


def test_ready_floods_make_at_most_a_probe_a_second(
    start_gateway: GatewayFactory, objects: tuple[ObjectRuntime, str]
) -> None:
    runtime, url = objects
    gateway = start_gateway(backend="openai", backend_url=url, api_keys=["sk-alice"])
    before = runtime.probes
    started = time.monotonic()

    def ready(_: int) -> int:
        return httpx.get(gateway.url + "/ready", timeout=10).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(ready, range(80)))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 80
    assert runtime.probes - before <= elapsed + 2


def test_metrics_render_once_a_second_and_hide_replica_credentials(
    start_gateway: GatewayFactory, runtimes: Callable[..., Runtime], tmp_path: Path
) -> None:
    _, url = runtimes("a")
    secret_url = url.replace("http://", "http://user:hunter2@") + "/?token=abc"
    backends = tmp_path / "backends.yaml"
    backends.write_text(f"backends:\n  - name: a\n    kind: vllm\n    urls: ['{secret_url}']\n")
    gateway = start_gateway(backend_url=None, backends=str(backends), api_keys=["sk-test-1"])
    renders = 0
    page = gateway.app.state.metrics_page
    original = page.render

    def counting() -> bytes:
        nonlocal renders
        renders += 1
        return original()  # type: ignore[no-any-return]

    page.render = counting
    started = time.monotonic()
    for _ in range(40):
        text = httpx.get(gateway.url + "/metrics").text
    assert renders <= time.monotonic() - started + 1
    assert "hunter2" not in text
    assert "token=abc" not in text
    assert f'replica="{url}/"' in text


def test_the_metrics_port_serves_metrics_alone_with_its_token(fake: Fake) -> None:
    port = free_port()
    process, _ = serve(
        "--backend-url", fake.url, "--metrics-port", str(port), "--metrics-token", "mt-1", "--no-access-log",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(base + "/metrics").status_code == 401
        assert httpx.get(base + "/metrics", headers={"authorization": "Bearer nope"}).status_code == 401
        page = httpx.get(base + "/metrics", headers={"authorization": "Bearer mt-1"})
        assert page.status_code == 200
        assert "gateway_requests_total" in page.text
        assert httpx.get(base + "/", headers={"authorization": "Bearer mt-1"}).status_code == 404
        assert httpx.get(base + "/anything").status_code == 404
        # Half-sent requests hold a socket each and are dropped after the head deadline;
        # meanwhile the port still answers.
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        for sock in idle:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        assert httpx.get(base + "/metrics", headers={"authorization": "Bearer mt-1"}).status_code == 200
        threads = int(subprocess.check_output(["ps", "-o", "nlwp=", "-p", str(process.pid)]))
        assert threads < 20
        for sock in idle:
            sock.settimeout(10)
            assert sock.recv(100) == b""  # closed by the deadline
            sock.close()
    finally:
        stop(process)


# The small doors


def test_a_trailing_slash_is_no_route_and_no_redirect(gateway: Gateway, fake: Fake) -> None:
    answer = httpx.post(
        gateway.url + "/v1/chat/completions/", json={"model": "fake-model"}, headers={"host": "evil.example"}
    )
    assert answer.status_code == 404
    assert "location" not in answer.headers
    assert answer.json()["error"]["type"] == "not_found"
    assert fake.seen.requests == []


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/admin/backends", "/metrics"])
def test_repeated_credentials_are_refused_everywhere(start_gateway: GatewayFactory, route: str) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], admin_api_keys=["sk-admin"], metrics_token="mt")
    for name, values in [
        ("authorization", ["Bearer sk-test-1", "Bearer sk-admin"]),
        ("x-api-key", ["a", "b"]),
    ]:
        method = "POST" if route.startswith("/v1") else "GET"
        body = b'{"model":"fake-model"}'
        head = f"{method} {route} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        head += "".join(f"{name}: {value}\r\n" for value in values)
        head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        with RawClient(gateway.url) as raw:
            raw.send(head.encode() + body)
            answer = raw.read_all()
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b'"invalid_request"' in answer


def test_a_replica_index_is_checked(start_gateway: GatewayFactory, fake: Fake) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], admin_api_keys=["sk-admin"], backend="vllm")
    for asked, status in [("\u00b2", 400), ("-1", 400), ("1" * 40, 400), ("7", 404)]:
        answer = httpx.get(
            f"{gateway.url}/admin/backends/{gateway.app.state.router.default.name}/metrics",
            params={"replica": asked},
            headers=ADMIN,
        )
        assert answer.status_code == status, answer.text
        assert answer.json()["error"]["message"]


def test_cookies_and_forwarding_headers_from_a_client_do_not_reach_the_backend(
    start_gateway: GatewayFactory, fake: Fake
) -> None:
    sent = {
        "cookie": "session=client", "forwarded": "for=1.2.3.4", "x-forwarded-for": "1.2.3.4",
        "x-forwarded-host": "evil", "x-forwarded-proto": "https", "x-real-ip": "1.2.3.4",
    }  # fmt: skip
    plain = start_gateway(api_keys=["sk-test-1"])
    echoed = httpx.post(plain.url + "/v1/chat/completions", json={"model": "echo"}, headers={**AUTH, **sent})
    headers = {k.lower(): v for k, v in echoed.json()["headers"]}
    assert headers["x-forwarded-for"] == "127.0.0.1"
    for name in ("cookie", "forwarded", "x-forwarded-host", "x-forwarded-proto", "x-real-ip"):
        assert name not in headers
    behind = start_gateway(api_keys=["sk-test-1"], trust_forwarded=["127.0.0.0/8"])
    echoed = httpx.post(behind.url + "/v1/chat/completions", json={"model": "echo"}, headers={**AUTH, **sent})
    headers = {k.lower(): v for k, v in echoed.json()["headers"]}
    assert headers["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-real-ip"] == "1.2.3.4"
    assert "cookie" not in headers


def test_an_open_gateway_on_loopback_serves_only_loopback_hosts(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()  # no keys, on 127.0.0.1
    url = gateway.url + "/v1/models"
    port = gateway.url.rsplit(":", 1)[1]
    assert httpx.get(url).status_code == 200
    assert httpx.get(url, headers={"host": f"localhost:{port}"}).status_code == 200
    rebound = httpx.get(url, headers={"host": f"attacker.example:{port}"})
    assert rebound.status_code == 421
    assert rebound.json()["error"]["type"] == "misdirected_request"
    cross = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "fake-model"},
        headers={"origin": "https://attacker.example"},
    )
    assert cross.status_code == 403
    same = httpx.get(url, headers={"origin": f"http://127.0.0.1:{port}"})
    assert same.status_code == 200
    # With keys, a Host is the ingress's business.
    keyed = start_gateway(api_keys=["sk-test-1"])
    assert httpx.get(keyed.url + "/v1/models", headers={**AUTH, "host": "api.example"}).status_code == 200


def test_stop_generation_is_for_admin_keys(start_gateway: GatewayFactory, loop_thread: LoopThread) -> None:
    runtime = RuntimeFake("textgen")
    runner, port = loop_thread.run(start_fake(runtime))  # type: ignore[arg-type]
    try:
        gateway = start_gateway(
            backend="textgen", backend_url=f"http://127.0.0.1:{port}", api_keys=["sk-test-1"],
            admin_api_keys=["sk-admin"],
        )  # fmt: skip
        stop_url = gateway.url + "/v1/internal/stop-generation"
        assert httpx.post(stop_url, headers=AUTH).status_code == 401
        assert httpx.post(stop_url, headers=ADMIN).status_code == 200
        assert runtime.requests.count(("POST", "/v1/internal/stop-generation", b"")) == 1
    finally:
        loop_thread.run(runner.cleanup())


def test_a_client_that_stops_reading_is_cut_and_frees_the_backend(
    start_gateway: GatewayFactory, objects: tuple[ObjectRuntime, str]
) -> None:
    runtime, url = objects
    gateway = start_gateway(backend="openai", backend_url=url, api_keys=["sk-alice"], client_write_timeout=1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])))
    body = b'{"model": "flood", "stream": true}'
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: sk-alice\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    try:
        # It reads nothing; the gateway cuts it within the timeout and a check or two.
        assert runtime.flood_closed.wait(15)
        assert wait_until(lambda: _in_flight(gateway) == 0, timeout=10)
    finally:
        sock.close()
    # Another client is served as usual.
    answer = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": "x"}, headers={"x-api-key": "sk-alice"}
    )
    assert answer.status_code == 200


def _in_flight(gateway: Gateway) -> float:
    text = httpx.get(gateway.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith('gateway_in_flight_requests{route="chat_completions"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_admin_keys_are_told_apart_in_metrics(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], admin_api_keys=["sk-admin"], backend="vllm")
    httpx.post(
        gateway.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"}, headers=ADMIN
    )
    httpx.get(gateway.url + "/v1/models", headers=AUTH)
    text = httpx.get(gateway.url + "/metrics").text
    requests = [line for line in text.splitlines() if line.startswith("gateway_requests_total{")]
    admin, client = plain_key_name("sk-admin", "admin:"), plain_key_name("sk-test-1")
    assert any(f'key="{admin}"' in line and "load_lora_adapter" in line for line in requests), requests
    assert any(f'key="{client}"' in line and 'route="models"' in line for line in requests), requests


def test_an_alias_counts_by_its_own_name_across_backends(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    _, a_url = runtimes("a", ["Qwen/Qwen2.5-7B-Instruct", "other-7b"])
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - name: alice\n    key: sk-alice\n    models: [qwen]\n")
    gateway = fleet_gateway(
        [{"name": "a", "url": a_url, "aliases": {"qwen": "Qwen/Qwen2.5-7B-Instruct"}}], keys_file=keys
    )
    alice = {"x-api-key": "sk-alice"}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    chat = gateway.url + "/v1/chat/completions"
    assert httpx.post(chat, json={**body, "model": "qwen"}, headers=alice).status_code == 200
    for model in ("Qwen/Qwen2.5-7B-Instruct", "other-7b"):  # the alias's target is another name
        assert httpx.post(chat, json={**body, "model": model}, headers=alice).status_code == 404
    listed = httpx.get(gateway.url + "/v1/models", headers=alice).json()["data"]
    assert [entry["id"] for entry in listed] == ["qwen"]
    assert httpx.get(gateway.url + "/v1/models/other-7b", headers=alice).status_code == 404
    assert len(httpx.get(gateway.url + "/v1/models", headers=AUTH).json()["data"]) == 3
