"""Routing workloads: the gateway in front of several replicas of a backend.

    python -m bench.fleet [--quick] [--out DIR]     (also run by ``python -m bench``)

- cost: the gateway's CPU time per request at 32 connections through 4 replicas, against
  through one backend URL (target: at most 5% more), and requests/s;
- a slow replica (5 times the others' answer time, each replica taking 8 requests at a
  time and queueing the rest, as a runtime's batch does): least outstanding against round
  robin, median and p99 latency and requests/s;
- a replica killed with SIGKILL half way through a run at 32 connections: the errors the
  clients see (target: none);
- paced streams (10,000 in the full run, started over 10 s, a chunk a second for 30 s
  each) through 4 replicas,
  against nginx balancing the same 4: errors, p99 lateness over the whole run and while
  all are open, the gateway's peak memory (targets: no errors, nginx's p99 + 10 ms while
  all are open, under 1 GB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import KEY, ROOT, free_port, paced, request_body, rounds, rss_mb, wait_for_port, wrk

REPLICAS = 4


@dataclass
class FleetPlan:
    seconds: float
    rounds: int
    paced_streams: int
    paced_seconds: float
    paced_interval_ms: float
    paced_ramp_seconds: float
    """Streams start over this long: 10,000 at once is a connection storm, not a load."""


FULL = FleetPlan(
    seconds=10,
    rounds=3,
    paced_streams=10_000,
    paced_seconds=30,
    paced_interval_ms=1000,
    paced_ramp_seconds=10,
)
QUICK = FleetPlan(
    seconds=1, rounds=1, paced_streams=40, paced_seconds=2, paced_interval_ms=200, paced_ramp_seconds=0.2
)

NGINX_CONF = """
worker_processes auto;
worker_rlimit_nofile 65536;
pid {dir}/nginx-fleet-{port}.pid;
error_log {dir}/nginx-fleet-error.log warn;
events {{ worker_connections 32768; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    upstream replicas {{ {method} {servers} keepalive 1024; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_buffering off; proxy_request_buffering off; proxy_read_timeout 300s;
        }}
    }}
}}
"""


def raise_fd_limit() -> None:
    """Enough descriptors for 10,000 streams through a proxy (two sockets each)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Fleet:
    """Processes started for a workload, stopped together."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[subprocess.Popen[bytes]] = []

    def upstream(self, delay_ms: float = 0, concurrency: int = 0) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        args = ["--port", str(port), "--delay-ms", f"{delay_ms:g}", "--concurrency", str(concurrency)]
        process = subprocess.Popen([sys.executable, "-m", "bench.upstream", *args], cwd=ROOT)
        self.started.append(process)
        wait_for_port(port)
        return process, f"http://127.0.0.1:{port}"

    def gateway(
        self, urls: list[str], *options: str, backend: dict[str, Any] | None = None
    ) -> tuple[subprocess.Popen[bytes], str]:
        """A gateway in front of ``urls`` (one: ``--backend-url``; more: a backends file, with
        ``backend``'s fields in its entry)."""
        port = free_port()
        backends = self.workdir / f"backends-{port}.json"
        entry = {"name": "bench", "urls": urls, **(backend or {})}
        backends.write_text(json.dumps({"backends": [entry]}))
        single = len(urls) == 1 and backend is None
        where = ["--backend-url", urls[0]] if single else ["--backends", str(backends)]
        log = open(self.workdir / f"gateway-{port}.log", "wb")  # noqa: SIM115 - closed with the process
        # Workers count limits in Redis only (the gateway refuses memory): none for them here.
        workers = options[options.index("--workers") + 1] if "--workers" in options else "1"
        limit = () if workers != "1" else ("--rate-limit", "1000000000/minute")
        process = subprocess.Popen(
            [
                sys.executable, "-m", "gateway", "serve", "--port", str(port), *where, "--api-key", KEY,
                *limit, "--log-level", "warning", *options,
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.started.append(process)
        wait_for_port(port)
        return process, f"http://127.0.0.1:{port}"

    def nginx(self, urls: list[str], method: str = "least_conn;") -> str:
        """nginx balancing ``urls`` (``method``: "least_conn;", or "" for round robin)."""
        port = free_port()
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.workdir / sub).mkdir(exist_ok=True)
        servers = " ".join(f"server {url.removeprefix('http://')};" for url in urls)
        conf = self.workdir / f"nginx-fleet-{port}.conf"
        conf.write_text(NGINX_CONF.format(dir=self.workdir, servers=servers, port=port, method=method))
        self.started.append(subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"]))
        wait_for_port(port)
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.started.clear()


@contextlib.contextmanager
def fleet(workdir: Path) -> Iterator[Fleet]:
    processes = Fleet(workdir)
    try:
        yield processes
    finally:
        processes.stop()


def run(plan: FleetPlan, workdir: Path) -> dict[str, Any]:
    raise_fd_limit()
    results: dict[str, Any] = {"plan": plan.__dict__}
    small = request_body(256, workdir)
    chat = "/v1/chat/completions"

    # Cost: one backend URL against four replicas of the same upstream kind. Requests/s
    # moves with the upstreams sharing the two cores (four processes instead of one); the
    # gateway's own CPU time per request is the cost.
    with fleet(workdir) as processes:
        urls = [processes.upstream()[1] for _ in range(REPLICAS)]
        gateways = {"one": processes.gateway(urls[:1]), "four": processes.gateway(urls)}

        def measure(path: str) -> dict[str, Any]:
            process, url = gateways[path]
            before = cpu_seconds(process.pid)
            figures = wrk(url + chat, 32, plan.seconds, small, workdir)
            used = cpu_seconds(process.pid) - before
            figures["cpu_us_per_request"] = used / max(figures["rps"] * max(plan.seconds, 1), 1) * 1e6
            return figures

        results["cost"] = rounds(plan, measure, ("one", "four"))  # type: ignore[arg-type]

    # A slow replica: least outstanding against round robin.
    with fleet(workdir) as processes:
        urls = [processes.upstream(delay_ms=2, concurrency=8)[1] for _ in range(REPLICAS - 1)]
        urls.append(processes.upstream(delay_ms=10, concurrency=8)[1])
        targets = {
            "least-outstanding": processes.gateway(urls)[1],
            "round-robin": processes.gateway(urls, "--balance", "round-robin")[1],
        }
        results["slow"] = rounds(
            plan,  # type: ignore[arg-type]
            lambda p: wrk(targets[p] + chat, 32, plan.seconds, small, workdir),
            ("least-outstanding", "round-robin"),
        )

    # A replica killed mid-run.
    with fleet(workdir) as processes:
        upstreams = [processes.upstream(delay_ms=20) for _ in range(REPLICAS)]
        url = processes.gateway([u for _, u in upstreams])[1]
        seconds = max(plan.seconds, 4)
        script = workdir / "kill.lua"
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {KEY}"\nwrk.body = \'{{"model": "bench"}}\'\n'
        )
        load = subprocess.Popen(
            ["wrk", "-t2", "-c32", f"-d{seconds:g}s", "-s", str(script), url + chat],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(seconds / 2)
        upstreams[0][0].kill()
        output = load.communicate()[0]
        results["kill"] = _wrk_counts(output)

    # Paced streams through four replicas, against nginx balancing the same four. Each
    # stream holds two descriptors in a proxy (the client's, the replica's): past about
    # 9,000 streams one process meets the descriptor limit of a machine like this one
    # (20,000), so the gateway runs two workers, as nginx runs a worker per core.
    with fleet(workdir) as processes:
        urls = [processes.upstream()[1] for _ in range(REPLICAS)]
        workers = "2" if plan.paced_streams > 9000 else "1"
        gateway_process, gateway_url = processes.gateway(urls, "--workers", workers)
        targets = {"nginx": processes.nginx(urls), "gateway": gateway_url}
        results["paced"] = {
            path: paced(targets[path], plan, plan.paced_interval_ms, plan.paced_ramp_seconds)  # type: ignore[arg-type]
            for path in ("nginx", "gateway")
        }
        results["paced"]["gateway"]["workers"] = int(workers)
        results["paced"]["gateway"]["peak_rss_mb"] = round(
            sum(rss_mb(pid)[1] for pid in [gateway_process.pid, *children(gateway_process.pid)]), 1
        )
    return results


def children(pid: int) -> list[int]:
    """A process's children (a gateway's workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wrk_counts(output: str) -> dict[str, Any]:
    import re

    total = re.search(r"(\d+) requests in", output)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "requests": int(total.group(1)) if total else 0,
        "socket_errors": errors,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
    }


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    rows = []
    cost = results["cost"]
    one, four = cost["one"]["cpu_us_per_request"], cost["four"]["cpu_us_per_request"]
    rows.append(
        (
            "4 replicas: the gateway's CPU per request at most 5% above one backend's",
            f"{four:.0f} against {one:.0f} µs ({four / one - 1:+.1%}); requests/s "
            f"{cost['four']['rps'] / cost['one']['rps']:.1%} of one backend's",
            four <= one * 1.05,
        )
    )
    slow = results["slow"]
    lor, rr = slow["least-outstanding"], slow["round-robin"]
    rows.append(
        (
            "a replica 5x slower: least outstanding beats round robin on p99",
            f"p99 {lor['p99_ms']:.2f} ms against {rr['p99_ms']:.2f} ms "
            f"(p50 {lor['p50_ms']:.2f} against {rr['p50_ms']:.2f}; "
            f"{lor['rps']:,.0f} against {rr['rps']:,.0f} requests/s)",
            lor["p99_ms"] < rr["p99_ms"],
        )
    )
    kill = results["kill"]
    errors = kill["socket_errors"] + kill["non_2xx"]
    rows.append(
        (
            "a replica killed mid-run (SIGKILL): errors clients see",
            f"{errors} in {kill['requests']:,} requests",
            errors == 0,
        )
    )
    gw, ng = results["paced"]["gateway"], results["paced"]["nginx"]
    extra = gw["all_open_p99_ms"] - ng["all_open_p99_ms"]
    rows.append(
        (
            f"{gw['streams']:,} paced streams through 4 replicas: no errors, p99 lateness while all are "
            f"open at most nginx's + 10 ms, peak RSS < 1 GB (gateway: {gw.get('workers', 1)} worker(s))",
            f"{gw['errors']} errors (nginx {ng['errors']}), p99 {gw['all_open_p99_ms']:.1f} ms against "
            f"{ng['all_open_p99_ms']:.1f} ms over {gw['all_open_seconds']:.0f} s with all open (whole run, "
            f"starts included: {gw['late_p99_ms']:.1f} against {ng['late_p99_ms']:.1f} ms), "
            f"{gw['peak_rss_mb']} MB",
            gw["errors"] == 0 and extra <= 10 and gw["peak_rss_mb"] < 1024,
        )
    )
    return rows


def report(results: dict[str, Any]) -> str:
    lines = [
        "## Several replicas",
        "",
        f"Plan: `{results['plan']}`.",
        "",
        "| workload | path | rps | p50 ms | p99 ms | errors | gateway CPU µs/request |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (("cost", "32 connections"), ("slow", "a slow replica, 32 connections")):
        for path, figures in results[name].items():
            cpu = figures.get("cpu_us_per_request")
            lines.append(
                f"| {label} | {path} | {figures['rps']:,.0f} | {figures['p50_ms']:.2f} | "
                f"{figures['p99_ms']:.2f} | {figures['errors']} | {'-' if cpu is None else f'{cpu:.0f}'} |"
            )
    lines += [
        "",
        "| paced streams | errors | lateness p50 ms | p99 ms | max ms | all open: p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, figures in results["paced"].items():
        lines.append(
            f"| {path} ({figures['streams']:,} streams) | {figures['errors']} | {figures['late_p50_ms']} | "
            f"{figures['late_p99_ms']} | {figures['late_max_ms']} | {figures['all_open_p50_ms']} | "
            f"{figures['all_open_p99_ms']} | {figures['all_open_max_ms']} |"
        )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in targets(results):
        lines.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tiny configuration, for tests")
    parser.add_argument("--out", type=Path, help="where results go (default: bench/results/<time>-fleet)")
    args = parser.parse_args()
    out = args.out or ROOT / "bench" / "results" / (time.strftime("%Y%m%d-%H%M%S") + "-fleet")
    with tempfile.TemporaryDirectory(prefix="gateway-fleet-") as temp:
        results = run(QUICK if args.quick else FULL, Path(temp))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps(results, indent=2))
    (out / "fleet.md").write_text(report(results))
    print(report(results))
    print(f"results in {out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
