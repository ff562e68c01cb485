"""Flow control (gateway/routing/flow.py): with ``max_concurrency`` a backend's replicas take at
most that many of the gateway's requests each; the rest wait in the gateway and go by priority,
then fair share between keys, then arrival; a full queue or a long wait is 503 ``overloaded``
with Retry-After; a client that leaves while waiting never reaches the runtime."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory
from tests.support.fakes import LoopThread, chat_completion, wait_until

ADMIN = {"authorization": "Bearer sk-admin"}


class Gated:
    """A runtime whose answers wait until the test lets each one go: its requests run as long
    as the test says, whatever the machine's speed."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.arrived: list[str] = []
        """Each request's ``user`` field, in the order requests reached the runtime."""
        self.running = 0
        self.most_running = 0
        self._gates: asyncio.Queue[None] = asyncio.Queue()
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.models)
        self.app.router.add_get("/metrics", self.metrics)
        self.reported_waiting = 0
        """What its /metrics says waits in its own queue (set by a test)."""

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        text = (
            f"vllm:num_requests_running {self.running}\n"
            f"vllm:num_requests_waiting {self.reported_waiting}\n"
            "vllm:kv_cache_usage_perc 0.1\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.arrived.append(body.get("user", "?"))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self._gates.get()
        finally:
            self.running -= 1
        return web.json_response(chat_completion(body["model"]))

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self.loop.call_soon_threadsafe(self._gates.put_nowait, None)


@pytest.fixture
def gated(loop_thread: LoopThread) -> Iterator[tuple[Gated, str]]:
    runtime = Gated(loop_thread.loop)

    async def start() -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(runtime.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    runner, port = loop_thread.run(start())
    yield runtime, f"http://127.0.0.1:{port}"
    runtime.release(1000)
    loop_thread.run(runner.cleanup())


def keys_file(tmp_path: Path, keys: dict[str, dict[str, Any]]) -> str:
    path = tmp_path / "keys.yaml"
    path.write_text(
        json.dumps({"keys": [{"name": name, "key": f"sk-{name}", **extra} for name, extra in keys.items()]})
    )
    return str(path)


class Clients:
    """Requests sent from threads, each answered in its own time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pool = concurrent.futures.ThreadPoolExecutor(32)

    def send(
        self, key: str, user: str, timeout: float = 30, **headers: str
    ) -> concurrent.futures.Future[httpx.Response]:
        body = {"model": "m", "user": user, "messages": [{"role": "user", "content": "hello"}]}
        return self.pool.submit(
            httpx.post,
            self.url + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer sk-{key}", **headers},
            timeout=timeout,
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def waiting(url: str) -> int:
    backends = httpx.get(url + "/admin/backends", headers=ADMIN, timeout=5).json()["data"]
    return sum(backend["queue"]["waiting"] for backend in backends)


def until(predicate: Callable[[], bool], what: str) -> None:
    assert wait_until(predicate, timeout=10), what


@pytest.fixture
def flow(
    start_gateway: GatewayFactory, gated: tuple[Gated, str], tmp_path: Path
) -> Iterator[Callable[..., tuple[Gated, Clients, str]]]:
    made: list[Clients] = []

    def make(keys: dict[str, dict[str, Any]], **settings: Any) -> tuple[Gated, Clients, str]:
        runtime, url = gated
        settings.setdefault("max_concurrency", 1)
        gateway = start_gateway(
            backend_url=url, keys_file=keys_file(tmp_path, keys), admin_api_keys=["sk-admin"], **settings
        )
        clients = Clients(gateway.url)
        made.append(clients)
        return runtime, clients, gateway.url

    yield make
    for clients in made:
        clients.close()


def test_a_higher_priority_goes_first_and_a_key_cannot_raise_its_own(flow: Callable[..., Any]) -> None:
    runtime, clients, url = flow({"batch": {}, "chat": {"priority": 5}})
    first = clients.send("batch", "batch-0")
    until(lambda: runtime.arrived == ["batch-0"], "the first request did not reach the runtime")
    later = []
    for n in (1, 2):  # one after another, so that their order is known
        later.append(clients.send("batch", f"batch-{n}"))
        until(lambda: waiting(url) == n, "the batch request did not wait")  # noqa: B023
    # A header may lower a key's priority, never raise it: this one stays at 0.
    raised = clients.send("batch", "batch-3", **{"x-gateway-priority": "9"})
    until(lambda: waiting(url) == 3, "the raised request did not wait")
    chat = clients.send("chat", "chat-0")
    until(lambda: waiting(url) == 4, "the chat request did not wait")
    assert runtime.arrived == ["batch-0"], "a request went past the capacity"
    for n in range(5):
        runtime.release()
        until(lambda: len(runtime.arrived) == min(n + 2, 5), "nothing was dispatched")  # noqa: B023
    assert [f.result().status_code for f in (first, *later, raised, chat)] == [200] * 5
    assert runtime.arrived == ["batch-0", "chat-0", "batch-1", "batch-2", "batch-3"]
    assert runtime.most_running == 1


def test_a_key_that_floods_gets_no_more_than_a_peer_at_the_same_priority(flow: Callable[..., Any]) -> None:
    runtime, clients, url = flow({"flood": {}, "peer": {}})
    answers = [clients.send("flood", "flood-0")]
    until(lambda: runtime.arrived == ["flood-0"], "the first request did not reach the runtime")
    for n, (key, user) in enumerate(
        [
            ("flood", "flood-1"),
            ("flood", "flood-2"),
            ("flood", "flood-3"),
            ("peer", "peer-0"),
            ("peer", "peer-1"),
        ],
        start=1,
    ):
        answers.append(clients.send(key, user))
        until(lambda: waiting(url) == n, f"{user} did not wait")  # noqa: B023
    for n in range(6):
        runtime.release()
        until(lambda: len(runtime.arrived) == min(n + 2, 6), "nothing was dispatched")  # noqa: B023
    assert [answer.result().status_code for answer in answers] == [200] * 6
    # The peer, served least, goes first; then each key in turn; within a key, in order.
    assert runtime.arrived == ["flood-0", "peer-0", "flood-1", "peer-1", "flood-2", "flood-3"]


def test_a_full_queue_sheds_the_lowest_priority_with_retry_after(flow: Callable[..., Any]) -> None:
    runtime, clients, url = flow({"batch": {}, "chat": {"priority": 5}}, queue_size=1, queue_timeout=5)
    busy = clients.send("batch", "batch-0")
    until(lambda: runtime.arrived == ["batch-0"], "the first request did not reach the runtime")
    waits = clients.send("batch", "batch-1")
    until(lambda: waiting(url) == 1, "the second request did not wait")
    refused = clients.send("batch", "batch-2").result()
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "overloaded"
    assert refused.json()["error"]["code"] == "queue_full"
    assert 1 <= int(refused.headers["retry-after"]) <= 5 + 1
    # A higher priority displaces the newest waiter of a lower one.
    chat = clients.send("chat", "chat-0")
    displaced = waits.result()
    assert displaced.status_code == 503
    assert displaced.json()["error"]["code"] == "queue_full"
    runtime.release(2)
    assert busy.result().status_code == 200
    assert chat.result().status_code == 200
    assert runtime.arrived == ["batch-0", "chat-0"]


def test_a_wait_longer_than_the_queue_timeout_is_refused_and_never_reaches_the_runtime(
    flow: Callable[..., Any],
) -> None:
    runtime, clients, _ = flow({"batch": {}}, queue_timeout=0.5)
    busy = clients.send("batch", "batch-0")
    until(lambda: runtime.arrived == ["batch-0"], "the first request did not reach the runtime")
    began = time.monotonic()
    late = clients.send("batch", "batch-1").result()
    assert time.monotonic() - began >= 0.5
    assert late.status_code == 503
    assert late.json()["error"]["code"] == "queue_timeout"
    assert 1 <= int(late.headers["retry-after"]) <= 2
    runtime.release()
    assert busy.result().status_code == 200
    assert runtime.arrived == ["batch-0"]


def test_a_client_that_leaves_while_waiting_never_reaches_the_runtime(flow: Callable[..., Any]) -> None:
    runtime, clients, url = flow({"batch": {}})
    busy = clients.send("batch", "batch-0")
    until(lambda: runtime.arrived == ["batch-0"], "the first request did not reach the runtime")
    with pytest.raises(httpx.ReadTimeout):
        clients.send("batch", "gone", timeout=0.5).result()
    until(lambda: waiting(url) == 0, "the request that left still waits")
    after = clients.send("batch", "batch-1")
    until(lambda: waiting(url) == 1, "the next request did not wait")
    runtime.release(2)
    assert busy.result().status_code == 200
    assert after.result().status_code == 200
    assert runtime.arrived == ["batch-0", "batch-1"]
    metrics = httpx.get(url + "/metrics", timeout=5).text
    assert re.search(r'gateway_queue_outcomes_total\{backend="[^"]+",outcome="abandoned"\} 1\.0', metrics)


def test_the_wait_is_in_the_access_log_and_the_metrics(
    flow: Callable[..., Any], capfd: pytest.CaptureFixture[str]
) -> None:
    runtime, clients, url = flow({"batch": {}}, access_log=True)
    capfd.readouterr()
    busy = clients.send("batch", "batch-0")
    until(lambda: runtime.arrived == ["batch-0"], "the first request did not reach the runtime")
    waited = clients.send("batch", "batch-1")
    until(lambda: waiting(url) == 1, "the second request did not wait")
    time.sleep(0.3)
    runtime.release(2)
    assert busy.result().status_code == 200
    assert waited.result().status_code == 200
    until(lambda: os_written(2), "the access log lines were not written")
    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    queued = {line["request_id"]: line["queued_ms"] for line in lines}
    assert sorted(queued.values())[0] == 0
    assert sorted(queued.values())[1] >= 300
    metrics = httpx.get(url + "/metrics", timeout=5).text
    assert re.search(r'gateway_queue_outcomes_total\{backend="[^"]+",outcome="dispatched"\} 1\.0', metrics)
    assert re.search(r'gateway_replica_capacity\{backend="[^"]+",replica="[^"]+"\} 1\.0', metrics)
    assert "gateway_queue_wait_seconds_bucket" in metrics


def os_written(count: int) -> bool:
    """Whether the capture holds ``count`` lines, looked at without emptying it."""
    return (
        sum(line.startswith("{") for line in os.pread(1, 1 << 20, 0).decode(errors="replace").splitlines())
        >= count
    )


def test_without_a_capacity_nothing_waits(start_gateway: GatewayFactory, gated: tuple[Gated, str]) -> None:
    runtime, url = gated
    gateway = start_gateway(backend_url=url)
    clients = Clients(gateway.url)
    try:
        answers = [clients.send("x", f"r-{n}") for n in range(4)]
        until(lambda: len(runtime.arrived) == 4, "requests waited without a capacity")
        runtime.release(4)
        assert [answer.result().status_code for answer in answers] == [200] * 4
    finally:
        clients.close()


def test_a_refusal_on_anthropics_route_is_its_overloaded_error(
    flow: Callable[..., Any], gated: tuple[Gated, str]
) -> None:
    runtime, clients, url = flow({"batch": {}}, queue_timeout=0.3)
    busy = clients.send("batch", "batch-0")
    until(lambda: runtime.arrived == ["batch-0"], "the first request did not reach the runtime")
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}
    refused = httpx.post(url + "/v1/messages", json=body, headers={"x-api-key": "sk-batch"}, timeout=10)
    assert refused.status_code == 503
    assert refused.json()["type"] == "error"
    assert refused.json()["error"]["type"] == "overloaded_error"
    assert int(refused.headers["retry-after"]) >= 1
    runtime.release()
    assert busy.result().status_code == 200


def test_a_priority_header_that_is_not_a_number_is_refused(flow: Callable[..., Any]) -> None:
    runtime, clients, _ = flow({"batch": {}})
    answer = clients.send("batch", "odd", **{"x-gateway-priority": "high"}).result()
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_priority"
    assert runtime.arrived == []


def test_a_keys_file_priority_and_weight_are_checked(tmp_path: Path) -> None:
    from gateway.tenancy.auth import load_keys_file

    good = load_keys_file(Path(keys_file(tmp_path, {"a": {"priority": -3, "weight": 2.5}})))
    assert (good[0].priority, good[0].weight) == (-3, 2.5)
    for wrong in (
        {"priority": "high"},
        {"priority": 1.5},
        {"priority": 10_000},
        {"weight": 0},
        {"weight": "x"},
    ):
        with pytest.raises(ValueError, match=r"priority|weight"):
            load_keys_file(Path(keys_file(tmp_path, {"a": wrong})))


def test_a_capacity_is_split_between_workers() -> None:
    from gateway.routing.router import worker_share

    assert [worker_share(8, workers) for workers in (1, 2, 3, 16)] == [8, 4, 2, 1]


def test_auto_needs_the_runtimes_reports() -> None:
    from gateway.config.backends import BackendConfig

    with pytest.raises(ValueError, match="strategy: queue"):
        BackendConfig(name="a", url="http://127.0.0.1:1", max_concurrency="auto")
    assert BackendConfig(name="a", url="http://127.0.0.1:1", max_concurrency="auto", strategy="queue")
    with pytest.raises(ValueError, match="max_concurrency"):
        BackendConfig(name="a", url="http://127.0.0.1:1", max_concurrency=0)


def test_stopping_refuses_waiting_requests_at_once_and_finishes_running_ones(
    gated: tuple[Gated, str], tmp_path: Path
) -> None:
    """A real process told to stop: a request waiting for a replica is refused as the drain
    begins (its client can go to another pod), the one running finishes, the exit is clean."""
    import signal

    from tests.support.processes import serve, stop

    runtime, backend = gated
    args = ["--backend-url", backend, "--max-concurrency", "1", "--no-access-log"]
    process, url = serve(*args, "--keys-file", keys_file(tmp_path, {"batch": {}}), "--drain-timeout", "20")
    clients = Clients(url)
    try:
        running = clients.send("batch", "batch-0")
        until(lambda: runtime.arrived == ["batch-0"], "the first request did not reach the runtime")
        waiting_one = clients.send("batch", "batch-1")
        time.sleep(0.5)  # queued: the only replica is full
        assert runtime.arrived == ["batch-0"]
        process.send_signal(signal.SIGTERM)
        refused = waiting_one.result(timeout=10)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutdown"
        assert refused.headers["retry-after"] == "1"
        runtime.release()
        assert running.result(timeout=10).status_code == 200
        stderr = stop(process, sig=None)
        assert process.returncode == 0, stderr
        assert runtime.arrived == ["batch-0"]
    finally:
        clients.close()
        if process.poll() is None:
            process.kill()


def test_auto_learns_a_replicas_capacity_from_its_reports(
    start_gateway: GatewayFactory, gated: tuple[Gated, str], tmp_path: Path
) -> None:
    """``max_concurrency: auto``: nothing waits until the runtime has reported others waiting
    in its own queue; then what it ran meanwhile is its capacity, and the gateway holds more
    until its reports show room."""
    runtime, backend = gated
    entry = {
        "name": "sim", "kind": "vllm", "url": backend, "strategy": "queue",
        "max_concurrency": "auto", "scrape_interval": 0.05,
    }  # fmt: skip
    backends = tmp_path / "backends.json"
    backends.write_text(json.dumps({"backends": [entry]}))
    gateway = start_gateway(
        backend_url=None, backends=str(backends), keys_file=keys_file(tmp_path, {"batch": {}}),
        admin_api_keys=["sk-admin"],
    )  # fmt: skip
    clients = Clients(gateway.url)
    try:
        answers = [clients.send("batch", f"batch-{n}") for n in range(3)]
        until(lambda: len(runtime.arrived) == 3, "requests waited before any capacity was known")
        runtime.reported_waiting = 1  # full: three run, one more waits in the runtime
        time.sleep(0.3)  # a few scrapes
        answers.append(clients.send("batch", "batch-3"))
        until(lambda: waiting(gateway.url) == 1, "the request did not wait in the gateway")
        replica = httpx.get(gateway.url + "/admin/backends", headers=ADMIN, timeout=5).json()["data"][0]
        assert replica["replicas"][0]["capacity"] == 3
        assert len(runtime.arrived) == 3
        runtime.reported_waiting = 0
        runtime.release()  # one ends: two run, room for one
        until(lambda: len(runtime.arrived) == 4, "the waiting request was not dispatched")
        runtime.release(3)
        assert [answer.result().status_code for answer in answers] == [200] * 4
    finally:
        clients.close()


def test_a_try_that_fails_waits_for_a_replica_with_room_and_is_answered_once(
    start_gateway: GatewayFactory, gated: tuple[Gated, str], tmp_path: Path, loop_thread: LoopThread
) -> None:
    """A replica that refuses connections is tried while the other is full: the request does
    not fail, nor go past the capacity, nor reach the runtime twice; it waits for the full
    one and is answered by it."""
    from gateway.config.backends import BackendConfig
    from tests.support.fakes import free_port

    runtime, backend = gated
    entry: dict[str, Any] = {"name": "sim", "kind": "openai", "urls": [backend], "max_concurrency": 1}
    backends = tmp_path / "backends.json"
    backends.write_text(json.dumps({"backends": [entry]}))
    gateway = start_gateway(
        backend_url=None, backends=str(backends), keys_file=keys_file(tmp_path, {"batch": {}}),
        admin_api_keys=["sk-admin"],
    )  # fmt: skip
    clients = Clients(gateway.url)
    try:
        busy = clients.send("batch", "batch-0")
        until(lambda: runtime.arrived == ["batch-0"], "the first request did not reach the runtime")
        # A second replica, which refuses connections, joins: the next request goes to it.
        dead = f"http://127.0.0.1:{free_port()}"
        router = gateway.app.state.router
        loop_thread.run(router.reload([BackendConfig(**{**entry, "urls": [dead, backend]})]))
        retried = clients.send("batch", "batch-1")
        until(lambda: waiting(gateway.url) == 1, "the request that failed over did not wait")
        assert runtime.arrived == ["batch-0"]
        runtime.release(2)
        assert busy.result().status_code == 200
        answer = retried.result()
        assert answer.status_code == 200, answer.text
        assert runtime.arrived == ["batch-0", "batch-1"]
        assert runtime.most_running == 1
        metrics = httpx.get(gateway.url + "/metrics", timeout=5).text
        assert 'gateway_backend_failovers_total{backend="sim"} 1.0' in metrics
    finally:
        clients.close()


def test_a_key_with_more_weight_gets_more_of_the_slots(flow: Callable[..., Any]) -> None:
    runtime, clients, url = flow({"first": {}, "heavy": {"weight": 3}, "light": {}})
    answers = [clients.send("first", "first")]
    until(lambda: runtime.arrived == ["first"], "the first request did not reach the runtime")
    for n in range(4):  # arriving in turn: heavy, light, heavy, light...
        for key in ("heavy", "light"):
            answers.append(clients.send(key, f"{key}-{n}"))
            until(lambda: waiting(url) == len(answers) - 1, f"{key}-{n} did not wait")
    for n in range(9):
        runtime.release()
        until(lambda: len(runtime.arrived) == min(n + 2, 9), "nothing was dispatched")  # noqa: B023
    assert [answer.result().status_code for answer in answers] == [200] * 9
    first_six = runtime.arrived[1:7]
    assert sum(name.startswith("heavy") for name in first_six) >= 4, runtime.arrived
    # Within a key, in order.
    assert [n for n in runtime.arrived if n.startswith("heavy")] == [f"heavy-{n}" for n in range(4)]
