"""What every benchmark here shares: ports, plans, wrk, rounds on alternating paths, paced
streams, memory readings."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import PATHS

KEY = "sk-bench"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Plan:
    seconds: float
    rounds: int
    paced_streams: int
    paced_seconds: float
    body_sizes: tuple[int, ...]
    soak_seconds: float


FULL = Plan(
    seconds=10,
    rounds=3,
    paced_streams=1000,
    paced_seconds=30,
    body_sizes=(1024, 100 * 1024, 1024 * 1024),
    soak_seconds=600,
)
QUICK = Plan(
    seconds=1, rounds=1, paced_streams=20, paced_seconds=2, body_sizes=(1024, 100 * 1024), soak_seconds=3
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def ensure_tools() -> None:
    missing = [
        name for name, binary in (("wrk", "wrk"), ("nginx-light", "nginx")) if not shutil.which(binary)
    ]
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", *missing], check=True, stdout=subprocess.DEVNULL
    )


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
"""


def request_body(size: int, workdir: Path) -> Path:
    path = workdir / f"body-{size}.json"
    if not path.exists():
        head = b'{"model": "bench", "messages": [{"role": "user", "content": "'
        tail = b'"}], "max_tokens": 16}'
        path.write_bytes(head + b"x" * max(size - len(head) - len(tail), 0) + tail)
    return path


def wrk(
    url: str,
    connections: int,
    seconds: float,
    body: Path,
    workdir: Path,
    headers: dict[str, str] | None = None,
) -> dict[str, float]:
    extra = "".join(f'wrk.headers["{name}"] = "{value}"\n' for name, value in (headers or {}).items())
    script = workdir / f"{body.stem}-{len(extra)}-{abs(hash(extra))}.lua"
    script.write_text(WRK_SCRIPT.format(key=KEY, body=body) + extra)
    threads = 1 if connections < 4 else 2
    output = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(seconds, 1):g}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    median = _millis(re.search(r"\s50%\s+([\d.]+\w+)", output).group(1))  # type: ignore[union-attr]
    p99 = _millis(re.search(r"\s99%\s+([\d.]+\w+)", output).group(1))  # type: ignore[union-attr]
    return {
        "rps": rate,
        "p50_ms": median,
        "p99_ms": p99,
        "errors": errors + int(non_2xx.group(1) if non_2xx else 0),
    }


def _millis(text: str) -> float:
    value = float(re.match(r"[\d.]+", text).group(0))  # type: ignore[union-attr]
    unit = text[len(re.match(r"[\d.]+", text).group(0)) :]  # type: ignore[union-attr]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def rounds(
    plan: Plan, measure: Callable[[str], dict[str, Any]], paths: tuple[str, ...] = PATHS
) -> dict[str, dict[str, Any]]:
    """Run ``measure`` on each path, alternating, for every round.

    Per path: the medians of the rounds' figures, and the errors of all rounds summed.
    """
    samples: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
    for _ in range(plan.rounds):
        for path in paths:
            samples[path].append(measure(path))
    return {
        path: {
            key: sum(s[key] for s in runs) if key == "errors" else statistics.median(s[key] for s in runs)
            for key in runs[0]
        }
        for path, runs in samples.items()
    }


def rss_mb(pid: int) -> tuple[float, float]:
    """Current and peak resident memory of a process, in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    current = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return current / 1024, peak / 1024


def paced(
    url: str, plan: Plan, interval_ms: float = 200, ramp_seconds: float | None = None
) -> dict[str, Any]:
    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.streams",
            url,
            "--streams",
            str(plan.paced_streams),
            "--interval-ms",
            f"{interval_ms:g}",
            "--seconds",
            f"{plan.paced_seconds:g}",
            "--key",
            KEY,
            *(["--ramp-seconds", f"{ramp_seconds:g}"] if ramp_seconds is not None else []),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    result: dict[str, Any] = json.loads(output)
    return result
