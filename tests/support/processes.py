"""``gateway serve`` as a real process, for the tests that need signals, workers or ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping

import httpx

from tests.support.fakes import free_port, wait_until


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def serve(
    *args: str,
    env: Mapping[str, str] | None = None,
    until: str = "/health",
    timeout: float = 30,
    stdout: int = subprocess.DEVNULL,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the gateway on a free port; return once ``until`` answers 200."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    if not wait_until(lambda: answers(url + until) or process.poll() is not None, timeout=timeout):
        process.kill()
    if process.poll() is not None or not answers(url + until):
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(f"the gateway did not come up: {stderr.decode(errors='replace')[-2000:]}")
    return process, url


def stop(process: subprocess.Popen[bytes], sig: int | None = signal.SIGTERM, timeout: float = 30) -> str:
    """Signal the process (unless ``sig`` is None), wait for it, and return its stderr."""
    if sig is not None and process.poll() is None:
        process.send_signal(sig)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return stderr.decode(errors="replace")
