"""``gateway serve`` with no backend configured: a real embedded llama.cpp with Gemma 3 270M."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.fakes import wait_until
from tests.support.processes import serve, stop

pytestmark = pytest.mark.llamacpp


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    url: str

    def children(self) -> list[int]:
        return children_of(self.process.pid)

    def ready_status(self) -> int:
        try:
            return httpx.get(self.url + "/ready", timeout=5).status_code
        except httpx.TransportError:
            return 0


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture
def served() -> Iterator[Served]:
    process, url = serve("--api-key", "sk-local", "--context-size", "1024", until="/ready", timeout=180)
    yield Served(process, url)
    stop(process, signal.SIGKILL)


def test_serves_chat_and_streams_then_stops_with_no_child_left(served: Served) -> None:
    children = served.children()
    assert len(children) == 1
    # The runtime serves only the gateway: a local process going around it has no key.
    argv = Path(f"/proc/{children[0]}/cmdline").read_bytes().split(b"\0")
    port = int(argv[argv.index(b"--port") + 1])
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401
    assert b"API_KEY=" in Path(f"/proc/{children[0]}/environ").read_bytes()
    with openai.OpenAI(base_url=served.url + "/v1", api_key="sk-local", max_retries=0, timeout=120) as sdk:
        assert [model.id for model in sdk.models.list()] == ["gemma-3-270m"]
        completion = sdk.chat.completions.create(
            model="gemma-3-270m",
            messages=[{"role": "user", "content": "Write one sentence about the sea."}],
            max_tokens=24,
        )
        assert (completion.choices[0].message.content or "").strip()
        stream = sdk.chat.completions.create(
            model="gemma-3-270m",
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=16,
            stream=True,
        )
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        assert len(pieces) > 1
        assert "".join(pieces).strip()
    stderr = stop(served.process)
    assert served.process.returncode == 0, stderr
    assert not alive(children[0])
    assert "sk-local" not in stderr


def test_a_killed_backend_comes_back_and_ready_shows_the_gap(served: Served) -> None:
    (child,) = served.children()
    os.kill(child, signal.SIGKILL)
    assert wait_until(lambda: served.ready_status() == 503, timeout=10)
    response = httpx.get(served.url + "/ready")
    assert response.json()["error"]["type"] in {"backend_unavailable", "backend_unreachable"}
    assert wait_until(lambda: served.ready_status() == 200, timeout=120)
    (new_child,) = served.children()
    assert new_child != child
    response = httpx.post(
        served.url + "/v1/completions",
        json={"model": "gemma-3-270m", "prompt": "The sea is", "max_tokens": 8},
        headers={"Authorization": "Bearer sk-local"},
        timeout=120,
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"]


def test_no_orphan_when_the_gateway_crashes(served: Served) -> None:
    (child,) = served.children()
    stop(served.process, signal.SIGKILL)
    assert wait_until(lambda: not alive(child), timeout=10)


def test_interrupt_stops_the_backend_too(served: Served) -> None:
    (child,) = served.children()
    stop(served.process, signal.SIGINT)
    assert served.process.returncode == 0
    assert not alive(child)
