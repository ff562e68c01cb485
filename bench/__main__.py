"""The gateway against a direct connection and against nginx, in one run on one machine.

    python -m bench                 # every workload, then a 10-minute soak
    python -m bench --quick         # a tiny configuration (what the test suite runs)

It starts fake upstreams (nginx serving a fixed JSON body; ``bench.upstream`` sending SSE
chunks), the gateway in its production configuration (auth, a rate limit too high to
trigger, metrics and the access log on), as one process and as two workers, and nginx as a
reverse proxy to the same upstreams in two configurations: plain (``proxy_pass`` as it
comes, a new upstream connection per request) and tuned (HTTP/1.1 keep-alive to the
upstream). Then it drives each path with wrk, alternating between them for several rounds.
Then the several-replica workloads of ``bench.fleet`` (``--no-fleet`` skips them).
``python -m bench vllm`` is vLLM's own serving benchmark against a real vLLM (``bench.vllm``).
Results (medians, ratios, targets) go to ``bench/results/<time>/`` as results.md,
results.json and results.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import PATHS, SINGLE_GATEWAY, plot, report

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


@dataclass
class Endpoints:
    static: dict[str, str] = field(default_factory=dict)
    sse: dict[str, str] = field(default_factory=dict)


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


NGINX_CONF = """
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    client_max_body_size 4m;
    client_body_buffer_size 4m;
    keepalive_requests 1000000;
    upstream static_upstream {{ server 127.0.0.1:{static}; keepalive 256; }}
    upstream sse_upstream {{ server 127.0.0.1:{sse}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{static};
        location / {{ default_type application/json; return 200 '{body}'; }}
    }}
    # Plain: proxy_pass as it comes (HTTP/1.0 upstream, a connection per request).
    server {{
        listen 127.0.0.1:{nginx_static};
        location / {{ proxy_pass http://127.0.0.1:{static}; }}
    }}
    server {{
        listen 127.0.0.1:{nginx_sse};
        location / {{ proxy_pass http://127.0.0.1:{sse}; proxy_buffering off; proxy_read_timeout 300s; }}
    }}
    # Tuned: keep-alive connections to the upstream, nothing buffered.
    server {{
        listen 127.0.0.1:{nginx_ka_static};
        location / {{
            proxy_pass http://static_upstream; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_buffering off; proxy_request_buffering off;
        }}
    }}
    server {{
        listen 127.0.0.1:{nginx_ka_sse};
        location / {{
            proxy_pass http://sse_upstream; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_buffering off; proxy_request_buffering off; proxy_read_timeout 300s;
        }}
    }}
}}
"""


def port_key(path: str, upstream: str) -> str:
    """The name of a path's port to an upstream; the direct path's is the upstream's own."""
    return upstream if path == "direct" else f"{path}_{upstream}".replace("-", "_")


@contextmanager
def processes(plan: Plan, workdir: Path) -> Iterator[tuple[Endpoints, dict[str, int]]]:
    from bench.upstream import JSON_BODY

    ports = {port_key(path, upstream): free_port() for path in PATHS for upstream in ("static", "sse")}
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, body=JSON_BODY.decode(), **ports))
    started: list[subprocess.Popen[bytes]] = []
    pids: dict[str, int] = {}
    try:
        started.append(subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"]))
        started.append(
            subprocess.Popen([sys.executable, "-m", "bench.upstream", "--port", str(ports["sse"])], cwd=ROOT)
        )
        for upstream in ("static", "sse"):
            for path, workers in (("gateway", 1), ("gateway-2w", 2)):
                name = port_key(path, upstream)
                log = open(workdir / f"{name}-access.log", "wb")  # noqa: SIM115 - closed with the process
                gateway = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "gateway",
                        "serve",
                        "--port",
                        str(ports[name]),
                        "--workers",
                        str(workers),
                        "--backend-url",
                        f"http://127.0.0.1:{ports[upstream]}",
                        "--api-key",
                        KEY,
                        "--rate-limit",
                        "1000000000/minute",
                        "--log-level",
                        "warning",
                    ],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.DEVNULL,
                )
                started.append(gateway)
                pids[name] = gateway.pid
        for port in ports.values():
            wait_for_port(port)
        endpoints = Endpoints(
            static={path: f"http://127.0.0.1:{ports[port_key(path, 'static')]}" for path in PATHS},
            sse={path: f"http://127.0.0.1:{ports[port_key(path, 'sse')]}" for path in PATHS},
        )
        yield endpoints, pids
    finally:
        for process in reversed(started):
            process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


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


def wrk(url: str, connections: int, seconds: float, body: Path, workdir: Path) -> dict[str, float]:
    script = workdir / f"{body.stem}.lua"
    script.write_text(WRK_SCRIPT.format(key=KEY, body=body))
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


def soak(url: str, pid: int, plan: Plan, workdir: Path) -> dict[str, Any]:
    script = workdir / "soak.lua"
    script.write_text(WRK_SCRIPT.format(key=KEY, body=request_body(1024, workdir)))
    load = subprocess.Popen(
        ["wrk", "-t1", "-c8", f"-d{plan.soak_seconds:g}s", "-s", str(script), url + "/v1/chat/completions"],
        stdout=subprocess.DEVNULL,
    )
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    interval = max(plan.soak_seconds / 60, 0.5)
    while load.poll() is None:
        samples.append((time.monotonic() - started, rss_mb(pid)[0]))
        time.sleep(interval)
    # The trend over the second half, after warm-up: MB per minute.
    half = [s for s in samples if s[0] >= plan.soak_seconds / 2] or samples
    slope = (
        statistics.linear_regression([t for t, _ in half], [m for _, m in half]).slope * 60
        if len(half) > 1
        else 0
    )
    return {
        "seconds": plan.soak_seconds,
        "rss_start_mb": round(samples[0][1], 1),
        "rss_end_mb": round(samples[-1][1], 1),
        "rss_max_mb": round(max(m for _, m in samples), 1),
        "trend_mb_per_min": round(slope, 3),
        "samples": [(round(t, 1), round(m, 2)) for t, m in samples],
    }


def flooded(url: str, plan: Plan, workdir: Path) -> dict[str, dict[str, float]]:
    """Chat at c=1 alone, then while 8 callers with no key loop on /metrics, then on /ready:
    routes that need no key must not slow the ones that do."""
    import threading

    import httpx

    small = request_body(256, workdir)
    results = {"quiet": wrk(url + "/v1/chat/completions", 1, plan.seconds, small, workdir)}
    for route in ("/metrics", "/ready"):
        stop = threading.Event()
        calls = [0]

        def loop(route: str, stop: threading.Event, calls: list[int]) -> None:
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    client.get(url + route)
                    calls[0] += 1

        callers = [threading.Thread(target=loop, args=(route, stop, calls)) for _ in range(8)]
        for caller in callers:
            caller.start()
        try:
            measured = wrk(url + "/v1/chat/completions", 1, plan.seconds, small, workdir)
        finally:
            stop.set()
            for caller in callers:
                caller.join()
        results[route.strip("/") + "_flood"] = {**measured, "flood_calls_per_s": calls[0] / plan.seconds}
    return results


def run(plan: Plan, out: Path, soak_on: bool, fleet_on: bool = True) -> dict[str, Any]:
    ensure_tools()
    results: dict[str, Any] = {"plan": plan.__dict__, "machine": {"cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as temp:
        workdir = Path(temp)
        with processes(plan, workdir) as (endpoints, pids):
            small = request_body(256, workdir)
            chat = "/v1/chat/completions"
            results["c1"] = rounds(
                plan,
                lambda p: wrk(endpoints.static[p] + chat, 1, plan.seconds, small, workdir),
                SINGLE_GATEWAY,
            )
            results["c32"] = rounds(
                plan, lambda p: wrk(endpoints.static[p] + chat, 32, plan.seconds, small, workdir)
            )
            stream = chat + "?chunks=100&interval_ms=0"
            results["stream100_c16"] = rounds(
                plan, lambda p: wrk(endpoints.sse[p] + stream, 16, plan.seconds, small, workdir)
            )
            results["bodies"] = {
                str(size): rounds(
                    plan,
                    lambda p, size=size: wrk(
                        endpoints.static[p] + chat, 8, plan.seconds, request_body(size, workdir), workdir
                    ),
                    SINGLE_GATEWAY,
                )
                for size in plan.body_sizes
            }
            results["flood"] = flooded(endpoints.static["gateway"], plan, workdir)
            results["paced"] = rounds(plan, lambda p: paced(endpoints.sse[p], plan), ("nginx", "gateway"))
            results["paced"]["gateway"]["peak_rss_mb"] = round(rss_mb(pids["gateway_sse"])[1], 1)
            if soak_on:
                results["soak"] = soak(endpoints.static["gateway"], pids["gateway_static"], plan, workdir)
        if fleet_on:
            from bench import fleet

            results["fleet"] = fleet.run(fleet.QUICK if plan is QUICK else fleet.FULL, workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results) + flood_report(results["flood"])
    if fleet_on:
        from bench import fleet

        text += "\n" + fleet.report(results["fleet"])
    (out / "results.md").write_text(text)
    plot(results, out / "results.png")
    return results


def flood_report(flood: dict[str, dict[str, float]]) -> str:
    quiet = flood["quiet"]["p50_ms"]
    lines = [
        "\n## Chat at c=1 while callers with no key flood /metrics or /ready\n",
        "| while | chat p50 ms | chat p99 ms | x quiet p50 | flood calls/s |",
        "|---|---|---|---|---|",
    ]
    for name, figures in flood.items():
        calls = figures.get("flood_calls_per_s")
        lines.append(
            f"| {name.replace('_', ' ')} | {figures['p50_ms']:.3f} | {figures['p99_ms']:.3f} | "
            f"{figures['p50_ms'] / quiet:.2f} | {'' if calls is None else f'{calls:,.0f}'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["balance"]:
        from bench import balance

        balance.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["vllm"]:
        from bench import vllm

        vllm.main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tiny configuration, for tests")
    parser.add_argument("--no-soak", action="store_true", help="skip the soak")
    parser.add_argument("--no-fleet", action="store_true", help="skip the several-replica workloads")
    parser.add_argument("--out", type=Path, help="where results go (default: bench/results/<time>)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    out = args.out or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    run(plan, out, soak_on=not args.no_soak, fleet_on=not args.no_fleet)
    print((out / "results.md").read_text())
    print(f"results in {out}")


if __name__ == "__main__":
    main()
