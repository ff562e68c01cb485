"""One JSON line per request on stdout, with no body, prompt, completion or key in it."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from typing import Any

import httpx
import pytest

from adapters.base import Route
from gateway.core.exchange import Exchange
from gateway.observability.accesslog import PIPE_BUF, AccessLog
from gateway.tenancy.auth import plain_key_name
from tests.conftest import GatewayFactory

SECRET_PROMPT = "the launch code is 7-7-alpha"


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def read_lines(capfd: pytest.CaptureFixture[str], count: int, within: float = 5) -> str:
    """What was written until ``count`` lines are there: a line is written once the answer
    has gone, so the client may read its answer before the line exists.

    The capture is looked at with ``pread`` and read (emptied) once at the end: emptying it
    while the gateway's thread writes loses what lands between its read and its truncate."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        written = os.pread(1, 1 << 20, 0).decode(errors="replace")
        if len(lines(written)) >= count:
            break
        time.sleep(0.02)
    return capfd.readouterr().out


def test_one_line_per_request_with_its_fields(
    start_gateway: GatewayFactory, capfd: pytest.CaptureFixture[str]
) -> None:
    gateway = start_gateway(api_keys=["sk-test-1", "sk-test-2"], access_log=True)
    capfd.readouterr()
    httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": SECRET_PROMPT}]},
        headers={"Authorization": "Bearer sk-test-2", "x-request-id": "trace-7"},
    )
    httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "fake-model", "stream": True, "stream_options": {"include_usage": True},
              "messages": [{"role": "user", "content": SECRET_PROMPT}]},
        headers={"Authorization": "Bearer sk-test-1"},
    )  # fmt: skip
    httpx.get(gateway.url + "/v1/models", headers={"x-api-key": "wrong-key"})
    out = read_lines(capfd, 3)
    assert SECRET_PROMPT not in out
    assert "sk-test" not in out
    assert "wrong-key" not in out
    assert "Hello there" not in out  # nor the completion
    first, second, third = lines(out)
    assert first["request_id"] == "trace-7"
    assert first["key"] == plain_key_name("sk-test-2")
    assert first["method"] == "POST"
    assert first["route"] == "chat_completions"
    assert first["status"] == 200
    assert first["backend"] == "openai"
    assert first["model"] == "fake-model"
    assert first["stream"] is False
    assert first["prompt_tokens"] == 5
    assert first["completion_tokens"] == 3
    assert first["error"] is None
    assert first["duration_ms"] >= first["ttfb_ms"] > 0
    assert 0 <= first["overhead_ms"] <= first["duration_ms"]
    assert first["time"].endswith("Z")
    assert second["stream"] is True
    assert second["completion_tokens"] == 5
    assert third["status"] == 401
    assert third["error"] == "authentication_error"
    assert third["key"] is None


def test_access_log_can_be_switched_off(
    start_gateway: GatewayFactory, capfd: pytest.CaptureFixture[str]
) -> None:
    gateway = start_gateway(access_log=False)
    capfd.readouterr()
    httpx.get(gateway.url + "/v1/models")
    assert lines(capfd.readouterr().out) == []


class Writes(io.BytesIO):
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: Any) -> int:
        self.writes.append(bytes(data))
        return len(data)


async def test_a_turns_lines_go_in_whole_writes_no_larger_than_a_pipe_keeps_whole() -> None:
    stream = Writes()
    log = AccessLog(stream)
    for n in range(40):
        exchange = Exchange(f"request-{n:03d}", Route.CHAT_COMPLETIONS, "POST", "openai")
        exchange.model = "m" * (n * 7)  # lines of many lengths
        log.write(exchange)
    written = b"".join(stream.writes)
    await asyncio.sleep(0)  # the turn ends
    rest = b"".join(stream.writes)[len(written) :]
    assert rest, "the lines were written before the turn ended"
    assert [json.loads(line)["request_id"] for line in (written + rest).splitlines()] == [
        f"request-{n:03d}" for n in range(40)
    ]
    assert 1 < len(stream.writes) < 40
    for data in stream.writes:
        assert len(data) <= PIPE_BUF
        assert data.endswith(b"\n")


def test_without_a_loop_a_line_is_written_at_once() -> None:
    stream = Writes()
    AccessLog(stream).write(Exchange("request-1", Route.CHAT_COMPLETIONS, "POST", "openai"))
    assert len(stream.writes) == 1
    assert json.loads(stream.writes[0])["request_id"] == "request-1"
