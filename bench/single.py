"""The single-backend benchmark: the gateway against a direct connection and against nginx, in
one run on one machine.

    python -m bench                 # every workload, then a 10-minute soak
    python -m bench --quick         # a tiny configuration (what the test suite runs)

It starts fake upstreams (nginx serving a fixed JSON body; ``bench.upstream`` sending SSE
chunks), the gateway in its production configuration (auth, a rate limit too high to
trigger, metrics and the access log on), as one process and as two workers (without the
limit, which workers count only in Redis), and nginx as a
reverse proxy to the same upstreams in two configurations: plain (``proxy_pass`` as it
comes, a new upstream connection per request) and tuned (HTTP/1.1 keep-alive to the
upstream); and at c=1 and c=32 the floor under the gateway (``bench.floor``: uvicorn and the
gateway's client, nothing else). Then it drives each path with wrk, alternating between them
for several rounds.
Then the several-replica workloads of ``bench.fleet`` (``--no-fleet`` skips them).
``python -m bench vllm`` is vLLM's own serving benchmark against a real vLLM (``bench.vllm``).
Results (medians, ratios, targets) go to ``bench/results/<time>/`` as results.md,
results.json and results.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import fleet
from bench.harness import (
    FULL,
    KEY,
    QUICK,
    ROOT,
    WRK_SCRIPT,
    Plan,
    ensure_tools,
    free_port,
    paced,
    request_body,
    rounds,
    rss_mb,
    wait_for_port,
    wrk,
)
from bench.report import FLOOR, PATHS, SINGLE_GATEWAY, plot, report


@dataclass
class Endpoints:
    static: dict[str, str] = field(default_factory=dict)
    sse: dict[str, str] = field(default_factory=dict)


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
    ports[port_key(FLOOR, "static")] = free_port()
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
        floor = [sys.executable, "-m", "bench.floor", "--port", str(ports[port_key(FLOOR, "static")])]
        started.append(
            subprocess.Popen([*floor, "--backend-url", f"http://127.0.0.1:{ports['static']}"], cwd=ROOT)
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
                        # Workers count limits in Redis only (the gateway refuses memory):
                        # the limit's cost is the one process's figure.
                        *(("--rate-limit", "1000000000/minute") if workers == 1 else ()),
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
            static={path: f"http://127.0.0.1:{ports[port_key(path, 'static')]}" for path in (*PATHS, FLOOR)},
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
                (*SINGLE_GATEWAY, FLOOR),
            )
            results["c32"] = rounds(
                plan,
                lambda p: wrk(endpoints.static[p] + chat, 32, plan.seconds, small, workdir),
                (*PATHS, FLOOR),
            )
            stream = chat + "?chunks=100&interval_ms=0"
            results["stream100_c16"] = rounds(
                plan, lambda p: wrk(endpoints.sse[p] + stream, 16, plan.seconds, small, workdir)
            )

            def bodies_of(size: int) -> Callable[[str], dict[str, float]]:
                body = request_body(size, workdir)
                return lambda p: wrk(endpoints.static[p] + chat, 8, plan.seconds, body, workdir)

            results["bodies"] = {
                str(size): rounds(plan, bodies_of(size), SINGLE_GATEWAY) for size in plan.body_sizes
            }
            results["flood"] = flooded(endpoints.static["gateway"], plan, workdir)
            results["paced"] = rounds(plan, lambda p: paced(endpoints.sse[p], plan), ("nginx", "gateway"))
            results["paced"]["gateway"]["peak_rss_mb"] = round(rss_mb(pids["gateway_sse"])[1], 1)
            if soak_on:
                results["soak"] = soak(endpoints.static["gateway"], pids["gateway_static"], plan, workdir)
        if fleet_on:
            results["fleet"] = fleet.run(fleet.QUICK if plan is QUICK else fleet.FULL, workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results) + flood_report(results["flood"])
    if fleet_on:
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


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tiny configuration, for tests")
    parser.add_argument("--no-soak", action="store_true", help="skip the soak")
    parser.add_argument("--no-fleet", action="store_true", help="skip the several-replica workloads")
    parser.add_argument("--out", type=Path, help="where results go (default: bench/results/<time>)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    out = args.out or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    run(plan, out, soak_on=not args.no_soak, fleet_on=not args.no_fleet)
    print((out / "results.md").read_text())
    print(f"results in {out}")
