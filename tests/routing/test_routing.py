"""Routing: several backends by model, replicas, health, failover before the first byte."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway.config.settings import Settings
from gateway.fleet.replicas import Replica
from gateway.fleet.upstream import Upstream
from gateway.proxy.body import StreamedBody
from tests.conftest import ADMIN, AUTH, Gateway, GatewayFactory, Runtime, replicas
from tests.support.fakes import LoopThread, free_port, wait_until
from tests.support.fleet_fakes import FleetRuntime, start_runtime

CHAT = "/v1/chat/completions"


def chat(gateway: Gateway, model: str | None = "m", **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **extra}
    if model is not None:
        body["model"] = model
    return httpx.post(gateway.url + CHAT, json=body, headers=AUTH, timeout=30)


# Models


def test_requests_go_to_the_backend_serving_their_model(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    small, small_url = runtimes("small", ["llama-1b"])
    big, big_url = runtimes("big", ["qwen-72b", "qwen-7b"])
    gateway = fleet_gateway(
        [
            {"name": "small", "kind": "llamacpp", "url": small_url},  # its own /v1/models decides
            {"name": "big", "kind": "vllm", "url": big_url, "models": ["qwen-72b", "qwen-7b"]},
        ]
    )
    for model, runtime in [("llama-1b", "small"), ("qwen-72b", "big"), ("qwen-7b", "big")]:
        answer = chat(gateway, model)
        assert answer.status_code == 200, answer.text
        assert answer.json()["backend"] == runtime
        assert answer.headers["x-gateway-backend"] == runtime
    unknown = chat(gateway, "gpt-9")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert small.count(CHAT) + big.count(CHAT) == 3  # no backend was asked about gpt-9


def test_an_alias_is_renamed_to_the_backends_name(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    runtime, url = runtimes("r", ["Qwen/Qwen2.5-7B-Instruct"])
    gateway = fleet_gateway([{"name": "r", "url": url, "aliases": {"qwen": "Qwen/Qwen2.5-7B-Instruct"}}])
    answer = chat(gateway, "qwen", temperature=0.5)
    assert answer.status_code == 200
    assert answer.json()["model"] == "Qwen/Qwen2.5-7B-Instruct"  # what the runtime was asked for
    assert runtime.requests[-1]["model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert chat(gateway, "Qwen/Qwen2.5-7B-Instruct").status_code == 200  # its own name works too


def test_model_list_is_the_union_with_aliases_each_once(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    _, a_url = runtimes("a", ["shared", "only-a"])
    _, b_url = runtimes("b", ["shared", "only-b"])
    gateway = fleet_gateway(
        [{"name": "a", "url": a_url}, {"name": "b", "url": b_url, "aliases": {"fast": "only-b"}}]
    )
    listing = httpx.get(gateway.url + "/v1/models", headers=AUTH, timeout=10)
    assert listing.status_code == 200
    ids = [entry["id"] for entry in listing.json()["data"]]
    assert sorted(ids) == ["fast", "only-a", "only-b", "shared"]
    assert listing.json()["object"] == "list"
    one = httpx.get(gateway.url + "/v1/models/fast", headers=AUTH, timeout=10)
    assert one.status_code == 200
    assert one.json()["id"] == "fast"
    assert one.json()["owned_by"] == "b"
    missing = httpx.get(gateway.url + "/v1/models/nope", headers=AUTH, timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_a_request_naming_no_model_goes_to_the_default_backend(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    a, a_url = runtimes("a", ["x"])
    b, b_url = runtimes("b", ["y"])
    gateway = fleet_gateway([{"name": "a", "url": a_url}, {"name": "b", "url": b_url, "default": True}])
    assert chat(gateway, None).json()["backend"] == "b"

    def upload(**fields: Any) -> httpx.Response:
        return httpx.post(
            gateway.url + "/v1/audio/transcriptions",
            files={"file": ("a.wav", b"RIFF" + b"\0" * 100_000)},
            data=fields,
            headers=AUTH,
            timeout=10,
        )

    # The SDKs send form fields before files: the model field routes the upload.
    assert upload(model="x").headers["x-gateway-backend"] == "a"
    assert upload().headers["x-gateway-backend"] == "b"
    assert upload(model="unknown").status_code == 404
    # A file before the model field: not held back to look for it; the default backend takes it.
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        f'RIFF\r\n--{boundary}\r\ncontent-disposition: form-data; name="model"\r\n\r\nx\r\n--{boundary}--\r\n'
    ).encode()
    late = httpx.post(
        gateway.url + "/v1/audio/transcriptions",
        content=body,
        headers={**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=10,
    )
    assert late.headers["x-gateway-backend"] == "b"
    assert b.requests[-1]["size"] == len(body)  # forwarded whole and unchanged
    assert a.requests[-1]["size"] > 100_000


@given(
    model=st.text(
        alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=40
    ),
    before=st.lists(st.sampled_from(["language", "prompt", "temperature"]), max_size=3),
    cuts=st.lists(st.integers(1, 400), max_size=8),
    file_first=st.booleans(),
)
def test_the_model_field_is_read_ahead_without_changing_the_upload(
    model: str, before: list[str], cuts: list[int], file_first: bool
) -> None:
    boundary = "----form7MA4YWxkTrZu0gW"
    parts: list[tuple[str, str, str | None]] = [(name, "v", None) for name in before]
    parts.append(("model", model, None))
    file_part = ("file", "x" * 300, "a.wav")
    parts = [file_part, *parts] if file_first else [*parts, file_part]

    def encode(name: str, value: str, filename: str | None) -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        return f"--{boundary}\r\ncontent-disposition: {disposition}\r\n\r\n{value}\r\n".encode()

    body = b"".join(encode(*part) for part in parts) + f"--{boundary}--\r\n".encode()
    chunks, at = [], 0
    for cut in [*cuts, len(body)]:
        chunks.append(body[at : at + cut])
        at += cut
        if at >= len(body):
            break
    if at < len(body):
        chunks.append(body[at:])
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def run() -> tuple[str | None, bytes]:
        streamed = StreamedBody(receive, 10**6)
        found = await streamed.peek_form_field(f"multipart/form-data; boundary={boundary}".encode(), "model")
        return found, b"".join([chunk async for chunk in streamed])

    found, sent = asyncio.run(run())
    assert sent == body
    assert found == (None if file_first else model)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"name": "a"}], "backends[0] (a): entry: Value error, give url or urls"),
        ([{"name": "a", "url": "ftp://x"}], "backends[0] (a): url: Value error, a backend URL must start"),
        (
            [{"name": "a", "url": "http://x", "kind": "nope"}],
            "backends[0] (a): kind: Value error, unknown kind",
        ),
        ([{"name": "a", "url": "http://x", "colour": "red"}], "backends[0] (a): colour: Extra inputs"),
        ([{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}], "two backends are named 'a'"),
        (
            [
                {"name": "a", "url": "http://x", "default": True},
                {"name": "b", "url": "http://y", "default": True},
            ],
            "only one backend may be the default",
        ),
        (
            [{"name": "a", "url": "http://x", "api_key_env": "NO_SUCH_VARIABLE"}],
            "NO_SUCH_VARIABLE, which is not",
        ),
        ([], "'backends' must be a non-empty list"),
    ],
)
def test_a_bad_backends_file_is_refused_naming_the_file_entry_and_field(
    tmp_path: Path, entries: list[dict[str, Any]], message: str
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"backends": entries}))
    with pytest.raises(ValueError, match=r"fleet\.yaml") as caught:
        Settings(backends=str(path))
    assert message in str(caught.value)


def test_backends_come_from_toml_and_from_the_config_file(tmp_path: Path) -> None:
    toml = tmp_path / "fleet.toml"
    toml.write_text('[[backends]]\nname = "a"\nurls = ["http://a1:8000/v1", "http://a2:8000"]\nweight = 2\n')
    settings = Settings(backends=str(toml))
    assert settings.backends is not None
    assert settings.backends[0].replica_urls == ["http://a1:8000", "http://a2:8000"]
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"backends": [{"name": "b", "url": "http://b:1", "kind": "tgi"}]}))
    from_config = Settings(config=config)
    assert from_config.backends is not None
    assert from_config.backends[0].kind == "tgi"
    with pytest.raises(ValueError, match="not both"):
        Settings(backends=str(toml), backend_url="http://x:1")


# Replicas


def test_replicas_share_the_requests_by_weight(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    one, url1 = runtimes("r1")
    two, url2 = runtimes("r2")
    gateway = fleet_gateway([{"name": "r", "urls": [url1, url2]}], balance="round-robin")
    for _ in range(40):
        assert chat(gateway).status_code == 200
    assert one.count(CHAT) == 20
    assert two.count(CHAT) == 20


def test_backends_serving_the_same_model_share_it_by_weight(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    big, url1 = runtimes("big", ["m"])
    small, url2 = runtimes("small", ["m"])
    gateway = fleet_gateway(
        [
            {"name": "big", "url": url1, "weight": 3, "models": ["m"]},
            {"name": "small", "url": url2, "weight": 1, "models": ["m"]},
        ],
        balance="round-robin",
    )
    for _ in range(40):
        assert chat(gateway).status_code == 200
    assert (big.count(CHAT), small.count(CHAT)) == (30, 10)
    small.status = 503  # and one backend failing sends its share to the other
    for _ in range(8):
        assert chat(gateway).json()["backend"] == "big"


def test_a_replica_back_ramps_up_over_the_slow_start() -> None:
    replica = Replica("http://r:1", Upstream(Settings(backend_url="http://r:1"), "http://r:1"), weight=2.0)
    replica.ramp_from = 100.0
    assert replica.load(100.0, 10.0) == pytest.approx(1 / 0.2)  # a tenth of its weight at first
    assert replica.load(105.0, 10.0) == pytest.approx(1 / 1.0)  # half way: half
    assert replica.load(110.0, 10.0) == pytest.approx(1 / 2.0)  # then its full weight
    replica.in_flight = 3
    assert replica.load(200.0, 10.0) == pytest.approx(4 / 2.0)
    assert replica.load(100.0, 0.0) == pytest.approx(4 / 2.0)  # no slow start


def test_least_outstanding_sends_less_to_a_slow_replica(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    fast, fast_url = runtimes("fast", delay=0.01)
    slow, slow_url = runtimes("slow", delay=0.5)
    gateway = fleet_gateway([{"name": "r", "urls": [fast_url, slow_url]}])

    def client() -> None:
        for _ in range(10):
            assert chat(gateway).status_code == 200

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fast.count(CHAT) + slow.count(CHAT) == 60
    assert slow.count(CHAT) < 15, (fast.count(CHAT), slow.count(CHAT))


# Health and failover


def test_a_refused_connection_fails_over_and_ejects_the_replica(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    live, live_url = runtimes("live")
    dead_url = f"http://127.0.0.1:{free_port()}"
    gateway = fleet_gateway([{"name": "r", "urls": [dead_url, live_url]}], probe_interval=30)
    for _ in range(10):
        answer = chat(gateway)
        assert answer.status_code == 200
        assert answer.json()["backend"] == "live"
    state = replicas(gateway)
    assert state[dead_url]["state"] == "ejected"
    assert state[dead_url]["ejections"] >= 1
    assert live.count(CHAT) == 10


def test_5xx_answers_fail_over_and_eject_after_a_few(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    sick, sick_url = runtimes("sick")
    sick.status = 503
    _, well_url = runtimes("well")
    gateway = fleet_gateway(
        [{"name": "r", "urls": [sick_url, well_url]}], probe_interval=30, eject_seconds=30
    )
    for _ in range(20):
        answer = chat(gateway)
        assert answer.status_code == 200, answer.text
    assert sick.count(CHAT) == 3  # eject_after: three 503s in a row, then no more traffic
    assert replicas(gateway)[sick_url]["state"] == "ejected"
    metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert 'gateway_backend_failovers_total{backend="r"} 3.0' in metrics
    assert f'gateway_replica_state{{backend="r",replica="{sick_url}",state="ejected"}} 1.0' in metrics


def test_ejection_and_probes_are_set_per_backend_over_the_global_flags(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    sick, sick_url = runtimes("sick")
    sick.status = 503
    _, well_url = runtimes("well")
    _, quiet_url = runtimes("quiet", ["q"])
    gateway = fleet_gateway(
        [
            {"name": "r", "urls": [sick_url, well_url], "eject_after": 0},
            {"name": "q", "url": quiet_url, "probe_interval": 0},
        ],
        balance="round-robin",
        probe_interval=0.2,
    )
    for _ in range(10):
        assert chat(gateway).status_code == 200
    # Never ejected (eject_after: 0): every other request still tries it first, and fails over.
    assert sick.count(CHAT) == 5
    assert replicas(gateway)[sick_url]["state"] == "ready"
    time.sleep(1.5)
    state = replicas(gateway)
    assert state[well_url]["last_probe_age_s"] < 1.0  # probed by the global interval
    age = state[quiet_url]["last_probe_age_s"]
    assert age is None or age > 1.0  # probe_interval: 0: never in the background


def test_400_answers_pass_through_and_never_eject(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    strict, url1 = runtimes("strict")
    strict.status = 400
    other, url2 = runtimes("other")
    other.status = 400
    gateway = fleet_gateway([{"name": "r", "urls": [url1, url2]}], eject_after=1)
    for _ in range(10):
        answer = chat(gateway)
        assert answer.status_code == 400
        assert "says 400" in answer.json()["error"]["message"]
    assert strict.count(CHAT) + other.count(CHAT) == 10  # no request was sent twice
    assert {r["state"] for r in replicas(gateway).values()} == {"ready"}


def test_429_goes_to_another_replica_else_reaches_the_client_with_retry_after(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    busy, url1 = runtimes("busy")
    busy.status = 429
    free, url2 = runtimes("free")
    gateway = fleet_gateway([{"name": "r", "urls": [url1, url2]}])
    for _ in range(6):
        assert chat(gateway).json()["backend"] == "free"
    assert replicas(gateway)[url1]["state"] == "ready"  # 429 is not a failure of the replica
    free.status = 429
    answer = chat(gateway)
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "7"


def test_the_retry_budget_bounds_failovers(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    sick, url1 = runtimes("sick")
    sick.status = 502
    _, url2 = runtimes("well")
    gateway = fleet_gateway(
        [{"name": "r", "urls": [url1, url2]}], balance="round-robin", retry_budget=0, eject_after=1000
    )
    statuses = [chat(gateway).status_code for _ in range(60)]
    # A burst of 10 failovers, then none: the sick replica's 502s reach the clients.
    assert statuses.count(502) == 30 - 10
    metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert "gateway_retry_budget_exhausted_total 20.0" in metrics


def test_a_stream_is_never_failed_over_after_its_first_byte(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    crashing, url1 = runtimes("crashing")
    crashing.die_after_chunks = 2
    other, url2 = runtimes("other")
    gateway = fleet_gateway([{"name": "r", "urls": [url1, url2]}], balance="round-robin")
    with httpx.stream(
        "POST", gateway.url + CHAT, json={"model": "m", "stream": True}, headers=AUTH, timeout=10
    ) as answer:
        body = b"".join(answer.iter_bytes())
    assert answer.headers["x-gateway-backend"] == "r"
    assert body.count(b'"backend": "crashing"') == 2
    assert b'"backend": "other"' not in body  # not a second answer spliced in
    assert b'"error"' in body  # the stream ends with the gateway's error event
    assert other.count(CHAT) == 0


def test_a_loading_replica_gets_no_traffic_until_ready(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    loading, url1 = runtimes("loading")
    loading.loading = True
    _, url2 = runtimes("ready")
    gateway = fleet_gateway([{"name": "r", "kind": "llamacpp", "urls": [url1, url2]}])
    assert wait_until(lambda: replicas(gateway)[url1]["state"] == "loading")
    for _ in range(10):
        assert chat(gateway).json()["backend"] == "ready"
    loading.loading = False
    assert wait_until(lambda: replicas(gateway)[url1]["state"] == "ready")
    for _ in range(20):
        chat(gateway)
    assert loading.count(CHAT) > 0


def test_a_replica_that_comes_back_gets_traffic_again(
    loop_thread: LoopThread, fleet_gateway: Callable[..., Gateway], runtimes: Callable[..., Runtime]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    _, other_url = runtimes("other")
    gateway = fleet_gateway([{"name": "r", "urls": [url, other_url]}])
    for _ in range(4):
        assert chat(gateway).status_code == 200
    assert replicas(gateway)[url]["state"] == "ejected"
    back = FleetRuntime("back", ["m"])
    runner, _ = loop_thread.run(start_runtime(back, port))
    try:
        assert wait_until(lambda: replicas(gateway)[url]["state"] == "ready", timeout=10)
        for _ in range(20):
            assert chat(gateway).status_code == 200
        assert back.count(CHAT) > 0
    finally:
        loop_thread.run(runner.cleanup())


def test_a_replica_killed_under_load_costs_no_request_that_had_no_answer(
    fleet_gateway: Callable[..., Gateway],
) -> None:
    processes = []
    urls = []
    for name in ("p1", "p2"):
        port = free_port()
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.support.fleet_fakes",
                    "--port",
                    str(port),
                    "--name",
                    name,
                    "--delay",
                    "0.05",
                ]
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url in urls:
            assert wait_until(lambda url=url: _answers(url + "/health"), timeout=20)  # type: ignore[misc]
        gateway = fleet_gateway([{"name": "r", "urls": urls}])
        failures: list[str] = []
        done = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=30) as http:
                while not done.is_set():
                    answer = http.post(gateway.url + CHAT, json={"model": "m"}, headers=AUTH)
                    if answer.status_code != 200:
                        failures.append(answer.text)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        processes[0].kill()  # SIGKILL: requests on it die before their status line
        time.sleep(1.5)
        done.set()
        for thread in threads:
            thread.join()
        assert failures == []
        assert replicas(gateway)[urls[0]]["state"] == "ejected"
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# Readiness and admin


def test_ready_while_any_backend_has_a_ready_replica(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    up, up_url = runtimes("up", ["a"])
    down_url = f"http://127.0.0.1:{free_port()}"
    gateway = fleet_gateway(
        [
            {"name": "up", "kind": "llamacpp", "url": up_url, "models": ["a"]},
            {"name": "down", "url": down_url, "models": ["b"]},
        ]
    )
    ready = httpx.get(gateway.url + "/ready", timeout=10)
    assert ready.status_code == 200
    backends = ready.json()["backends"]
    assert backends["up"]["ready"] == 1
    assert backends["down"]["ready"] == 0
    up.loading = True
    # Probes run at most once a second however often /ready is asked.
    assert wait_until(lambda: httpx.get(gateway.url + "/ready", timeout=10).status_code == 503, timeout=5)
    not_ready = httpx.get(gateway.url + "/ready", timeout=10)
    assert not_ready.status_code == 503
    assert not_ready.json()["error"]["code"] == "no_ready_backend"
    assert not_ready.json()["backends"]["up"]["loading"] == 1


def test_admin_backends_needs_an_admin_key(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    _, url = runtimes("r")
    gateway = fleet_gateway([{"name": "r", "url": url}])
    assert httpx.get(gateway.url + "/admin/backends", headers=AUTH, timeout=10).status_code == 401
    assert httpx.get(gateway.url + "/admin/backends", timeout=10).status_code == 401
    chat(gateway)
    (entry,) = httpx.get(gateway.url + "/admin/backends", headers=ADMIN, timeout=10).json()["data"]
    assert entry["name"] == "r"
    assert entry["replicas"][0]["picks"] == 1
    assert set(entry["replicas"][0]) >= {"state", "in_flight", "failures", "ejected_for_s", "last_probe"}


def test_one_backend_url_answers_with_its_name(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"])
    answer = httpx.post(gateway.url + CHAT, json={"model": "anything"}, headers=AUTH, timeout=10)
    assert answer.status_code == 200
    assert answer.headers["x-gateway-backend"] == "openai"
    assert json.loads(httpx.get(gateway.url + "/ready", timeout=10).text)["status"] == "ready"


# Changes to the fleet


def test_dns_discovery_adds_replicas_and_drains_the_ones_that_go(
    loop_thread: LoopThread, fleet_gateway: Callable[..., Gateway]
) -> None:
    port = free_port()
    first, second = FleetRuntime("first", ["m"]), FleetRuntime("second", ["m"])
    first.chunks, first.chunk_delay = 20, 0.1  # a stream of two seconds
    runners = [
        loop_thread.run(start_runtime(first, port, "127.0.0.1"))[0],
        loop_thread.run(start_runtime(second, port, "127.0.0.2"))[0],
    ]
    addresses = ["127.0.0.1"]

    async def resolve(host: str, port: int) -> list[str]:
        assert host == "runtime.fleet.svc"
        return list(addresses)

    try:
        gateway = fleet_gateway(
            [{"name": "r", "url": f"http://runtime.fleet.svc:{port}", "discovery": "dns"}],
            discovery_interval=0.1,
            balance="round-robin",
        )
        router = gateway.app.state.router
        router.resolve = resolve
        assert wait_until(lambda: [r.url for r in router.groups[0].replicas] == [f"http://127.0.0.1:{port}"])
        first_answer = chat(gateway)
        assert first_answer.json()["backend"] == "first", first_answer.text
        # A stream that is still running on the first replica when it goes away.
        with httpx.stream(
            "POST", gateway.url + CHAT, json={"model": "m", "stream": True}, headers=AUTH, timeout=10
        ) as stream:
            assert stream.headers["x-runtime"] == "first"
            addresses.append("127.0.0.2")  # scaled up: no restart
            assert wait_until(lambda: len(router.groups[0].replicas) == 2)
            assert {chat(gateway).json()["backend"] for _ in range(4)} == {"first", "second"}
            addresses.remove("127.0.0.1")  # scaled down: drained, not cut
            assert wait_until(lambda: len(router.groups[0].replicas) == 1)
            body = b"".join(stream.iter_bytes())
        assert body.count(b'"backend": "first"') == first.chunks
        assert body.endswith(b"data: [DONE]\n\n")
        assert {chat(gateway).json()["backend"] for _ in range(4)} == {"second"}
        addresses.clear()

        async def broken(host: str, port: int) -> list[str]:
            raise OSError("no such host")

        router.resolve = broken  # a DNS failure keeps the replicas as they are
        time.sleep(0.3)
        assert chat(gateway).json()["backend"] == "second"
    finally:
        for runner in runners:
            loop_thread.run(runner.cleanup())


def test_sighup_reloads_the_backends_file_and_refuses_a_bad_one(
    runtimes: Callable[..., Runtime], tmp_path: Path
) -> None:
    from tests.support.processes import serve, stop

    _, one_url = runtimes("one", ["m"])
    _, two_url = runtimes("two", ["m"])
    path = tmp_path / "backends.yaml"
    path.write_text(yaml.safe_dump({"backends": [{"name": "first", "url": one_url}]}))
    process, url = serve("--backends", str(path), "--api-key", "sk-test-1", "--no-access-log")
    try:

        def backend() -> str:
            answer = httpx.post(url + CHAT, json={"model": "m"}, headers=AUTH, timeout=10)
            assert answer.status_code == 200, answer.text
            return str(answer.headers["x-gateway-backend"])

        assert backend() == "first"
        path.write_text(yaml.safe_dump({"backends": [{"name": "second", "url": two_url}]}))
        process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: backend() == "second", timeout=10)
        path.write_text("backends: [{name: broken}]")
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert backend() == "second"  # the bad file was refused; the gateway still serves
        assert process.poll() is None
    finally:
        stderr = stop(process)
    assert "give url or urls" in stderr
    assert "the backends stay as they were" in stderr


def test_limits_metrics_and_the_access_log_work_across_backends(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway], capfd: pytest.CaptureFixture[str]
) -> None:
    _, a_url = runtimes("a", ["model-a"])
    _, b_url = runtimes("b", ["model-b"])
    gateway = fleet_gateway(
        [{"name": "a", "url": a_url}, {"name": "b", "url": b_url}], rate_limit="4/minute", access_log=True
    )
    capfd.readouterr()
    statuses = [chat(gateway, model).status_code for model in ("model-a", "model-b") * 3]
    assert statuses == [200, 200, 200, 200, 429, 429]  # one key's limit, whichever backend
    log = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["backend"] for line in log if line["status"] == 200] == ["a", "b", "a", "b"]
    metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
    answered = [line for line in metrics.splitlines() if line.startswith("gateway_requests_total{")]
    for backend, model in (("a", "model-a"), ("b", "model-b")):
        assert any(f'backend="{backend}"' in line and f'model="{model}"' in line for line in answered), (
            answered
        )


def test_a_reload_that_changes_a_backends_kind_drains_the_old_replicas(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway], loop_thread: LoopThread
) -> None:
    from gateway.config.backends import BackendConfig

    _, url = runtimes("r", ["m"])
    gateway = fleet_gateway([{"name": "r", "url": url, "kind": "openai"}])
    router = gateway.app.state.router
    assert chat(gateway).status_code == 200
    before = router.groups[0].replicas[0]
    closed = threading.Event()
    original = before.upstream.close

    async def close() -> None:
        closed.set()
        await original()

    before.upstream.close = close
    loop_thread.run(router.reload([BackendConfig(name="r", url=url, kind="vllm")]))
    after = router.groups[0].replicas[0]
    assert after is not before
    assert router.groups[0].backend.adapter.name == "vllm"
    assert closed.wait(5)  # the old pool is closed, not left open
    assert chat(gateway).status_code == 200
