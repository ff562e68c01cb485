from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.config.settings import Settings
from gateway.edge.server import uvicorn_config
from tests.support.fakes import FakeBackend, LoopThread, Seen, start_fake
from tests.support.fleet_fakes import FleetRuntime, start_runtime
from tests.support.object_fakes import ObjectRuntime, start_objects
from tests.support.otlp_receiver import Receiver
from tests.support.redis_server import RedisServer

ENV_NAMES = ("API_KEYS", "BACKEND", "BACKEND_URL", "BACKEND_API_KEY")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("GATEWAY_", "OTEL_")) or name in ENV_NAMES:
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


@dataclass
class Fake:
    backend: FakeBackend
    url: str

    @property
    def seen(self) -> Seen:
        return self.backend.seen


@pytest.fixture
def fake(loop_thread: LoopThread) -> Iterator[Fake]:
    backend = FakeBackend()
    runner, port = loop_thread.run(start_fake(backend))
    yield Fake(backend, f"http://127.0.0.1:{port}")
    loop_thread.run(runner.cleanup())


@dataclass
class Gateway:
    url: str
    settings: Settings
    app: Starlette
    server: uvicorn.Server | None = None
    """The in-process server (a test may stop it: ``should_exit``)."""


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def start_gateway(loop_thread: LoopThread, fake: Fake) -> Iterator[GatewayFactory]:
    """Start the gateway on a real socket in front of the fake backend (or another URL)."""
    servers: list[tuple[uvicorn.Server, concurrent.futures.Future[None]]] = []

    def start(**overrides: Any) -> Gateway:
        overrides.setdefault("backend_url", fake.url)
        overrides.setdefault("object_secret", OBJECT_SECRET)
        # Tests read /metrics as they please; test_attacks shows it closed by default.
        overrides.setdefault("metrics_public", True)
        overrides.setdefault("access_log", False)  # on where a test reads it
        settings = Settings(**overrides)
        # IPPROTO_TCP, so that asyncio sets TCP_NODELAY on accepted connections as it does
        # for the sockets uvicorn binds itself.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        app = create_app(settings)
        config = uvicorn_config(app, settings, log_level="warning", timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)
        future = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), loop_thread.loop)
        for _ in range(500):
            if server.started or future.done():
                break
            time.sleep(0.01)
        assert server.started, future.result() if future.done() else "gateway did not start"
        servers.append((server, future))
        return Gateway(f"http://127.0.0.1:{port}", settings, app, server)

    yield start
    for server, _ in servers:
        server.should_exit = True
    for _, future in servers:
        future.result(10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """An OTLP/HTTP trace receiver: what a collector would be sent."""
    running = Receiver().start()
    yield running
    running.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of the test's own."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def objects(loop_thread: LoopThread) -> Iterator[tuple[ObjectRuntime, str]]:
    """A runtime that stores files, batches and responses, and its URL."""
    runtime = ObjectRuntime()
    runner, port = loop_thread.run(start_objects(runtime))
    yield runtime, f"http://127.0.0.1:{port}"
    loop_thread.run(runner.cleanup())


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> Gateway:
    return start_gateway(api_keys=["sk-test-1", "sk-test-2"])


OBJECT_SECRET = "tests-object-secret-0123456789abcdef"
"""Seals object IDs wherever a test starts a gateway with several keys and names none."""

AUTH = {"Authorization": "Bearer sk-test-1"}


# Several backends: fake runtimes and a gateway in front of them


Runtime = tuple[FleetRuntime, str]
ADMIN = {"Authorization": "Bearer sk-admin"}


@pytest.fixture
def runtimes(loop_thread: LoopThread) -> Iterator[Callable[..., Runtime]]:
    """Start fake runtimes in the tests' loop thread: ``runtime(name, models, delay=0)``."""
    runners = []

    def start(name: str, models: list[str] | None = None, delay: float = 0.0) -> Runtime:
        runtime = FleetRuntime(name, models or ["m"], delay)
        runner, port = loop_thread.run(start_runtime(runtime))
        runners.append(runner)
        return runtime, f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        loop_thread.run(runner.cleanup())


@pytest.fixture
def fleet_gateway(start_gateway: GatewayFactory, tmp_path: Path) -> Callable[..., Gateway]:
    """A gateway in front of the backends given, as a backends file of its own."""
    files = 0

    def start(backends: list[dict[str, Any]], **overrides: Any) -> Gateway:
        nonlocal files
        files += 1
        path = tmp_path / f"backends-{files}.yaml"
        path.write_text(yaml.safe_dump({"backends": backends}))
        overrides.setdefault("probe_interval", 0.2)
        overrides.setdefault("eject_seconds", 0.3)
        overrides.setdefault("slow_start", 0)
        return start_gateway(
            backend_url=None,
            backends=str(path),
            api_keys=["sk-test-1"],
            admin_api_keys=["sk-admin"],
            **overrides,
        )

    return start


def replicas(gateway: Gateway) -> dict[str, dict[str, Any]]:
    """Every replica as /admin/backends shows it, by URL."""
    answer = httpx.get(gateway.url + "/admin/backends", headers=ADMIN, timeout=10)
    assert answer.status_code == 200, answer.text
    return {r["url"]: r for backend in answer.json()["data"] for r in backend["replicas"]}
