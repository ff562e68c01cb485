"""Graceful shutdown of a real process with a slow stream in flight."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx

from tests.conftest import Fake
from tests.support.fakes import wait_until
from tests.support.processes import serve, stop


def start(fake: Fake, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    return serve("--backend-url", fake.url, "--no-access-log", *args, until="/ready")


class SlowStream(threading.Thread):
    """Reads a stream whose five chunks come 0.4 s apart."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[str] = []
        self.started_reading = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST",
                self.url + "/v1/chat/completions",
                json={"model": "fake-model", "stream": True},
                headers={"x-fake-delay": "0.4"},
                timeout=30,
            ) as response:
                for line in response.iter_lines():
                    if line:
                        self.events.append(line)
                        self.started_reading.set()
        except Exception as exc:  # the assertion below reports it
            self.error = exc


def test_sigterm_drains_streams_and_exits_zero(fake: Fake) -> None:
    process, url = start(fake, "--shutdown-delay", "1", "--drain-timeout", "20")
    stream = SlowStream(url)
    stream.start()
    assert stream.started_reading.wait(10)
    process.send_signal(signal.SIGTERM)
    # At once, and while the listener still accepts, readiness says no.
    response = httpx.get(url + "/ready", timeout=5)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "shutting_down"
    assert httpx.get(url + "/health").status_code == 200
    stream.join(30)
    assert stream.error is None, stream.error
    assert stream.events[-1] == "data: [DONE]"
    assert len(stream.events) == 6  # nothing was cut
    stderr = stop(process, sig=None)
    assert process.returncode == 0, stderr
    # Once the delay has passed the listener is closed.
    try:
        httpx.get(url + "/health", timeout=1)
        raise AssertionError("the gateway still accepts connections after exiting")
    except httpx.ConnectError:
        pass


def test_a_stream_longer_than_the_drain_timeout_is_cut_and_the_process_still_exits_zero(fake: Fake) -> None:
    process, url = start(fake, "--drain-timeout", "0.5")
    stream = SlowStream(url)
    stream.start()
    assert stream.started_reading.wait(10)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    stderr = stop(process, sig=None)
    assert process.returncode == 0, stderr
    assert time.monotonic() - started < 10
    stream.join(10)
    assert "data: [DONE]" not in stream.events
    assert wait_until(fake.seen.stream_closed.is_set, timeout=5)  # the backend stream was closed too
    assert all(json.loads(e.removeprefix("data: "))["object"] for e in stream.events)
