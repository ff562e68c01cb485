"""What tracing costs: the same gateway with tracing off, on (every request sampled), and on
with a client whose ``traceparent`` is sampled out, in one run.

    python -m bench tracing [--quick] [--out DIR]

A fake runtime (``bench.upstream``, a fixed chat completion), an OTLP/HTTP sink (a separate
process that takes each export, decodes it and counts its spans, as a collector would), and
two gateways in the production configuration of ``python -m bench`` (a key, a rate limit too
high to trigger, metrics, the access log): one with no OpenTelemetry variable set, one with
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` naming the sink. wrk drives c=32 and c=1, alternating
between the paths for several rounds, in the orders of a balanced Latin square (over four
rounds each path runs right after every other path once):

- off: the gateway without an endpoint (tracing absent);
- on: the traced gateway, no ``traceparent`` (each request starts a sampled trace);
- sampled-out: the traced gateway, each request with a ``traceparent`` whose sampled flag is 0
  (the parent-based sampler records nothing; the runtime is told so);
- off-traceparent: the gateway without an endpoint sent the same requests as sampled-out (it
  passes the header on as sent): the same traffic with tracing absent.

Then a third gateway (``bench.toggled``), traced, switches its tracing off and on every 2,000
requests and counts the CPU of its event loop's thread in each mode, and its export thread's:
wrk drives it at c=32 for 40 s without a ``traceparent`` (on against off) and 40 s with the
sampled-out one. In one process and interleaved at that grain, the comparison is free of the
differences between two processes and of the machine's drift, which on a shared 2-core
machine are as large as what tracing costs.

Reported: requests/s, p50 and p99 per path, on and sampled-out as ratios of off; the CPU a
request in each mode, and off / (on + export), the share of off's throughput a gateway
bound by its CPU keeps; the spans the sink received against the gateways' own counts of
exported, dropped and failed.
Results go to ``bench/results/<time>-tracing/``: tracing.md and tracing.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.harness import KEY, ROOT, ensure_tools, free_port, request_body, wait_for_port, wrk

SAMPLED_OUT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
TARGETS = {"on": 0.75, "sampled-out": 0.95}
"""The least share of off's requests/s at c=32 each path is to keep."""


@dataclass(frozen=True)
class Plan:
    seconds: float = 10.0
    rounds: int = 4  # a whole balanced Latin square of the four paths
    toggled_seconds: float = 40.0
    toggled_block: int = 2000


FULL = Plan()
QUICK = Plan(seconds=1, rounds=1, toggled_seconds=2, toggled_block=100)


async def sink(port: int, counts: Path) -> None:
    """An OTLP/HTTP receiver: each export read, decoded, its spans counted, 200 answered."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    spans = exports = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal spans, exports
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                request = ExportTraceServiceRequest.FromString(await reader.readexactly(length))
                exports += 1
                spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                counts.write_text(json.dumps({"exports": exports, "spans": spans}))  # noqa: ASYNC240  # noqa: ASYNC240 - a few bytes
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"
                )
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


@contextmanager
def processes(workdir: Path, block: int = FULL.toggled_block) -> Iterator[dict[str, str]]:
    ports = {name: free_port() for name in ("upstream", "sink", "off", "on", "toggled")}
    started: list[subprocess.Popen[bytes]] = []
    try:
        started.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.upstream", "--port", str(ports["upstream"])], cwd=ROOT
            )
        )
        started.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.tracing", "--sink", str(ports["sink"]), "--out", str(workdir)],
                cwd=ROOT,
            )
        )
        for name in ("off", "on", "toggled"):
            env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
            if name != "off":
                env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"http://127.0.0.1:{ports['sink']}/v1/traces"
            if name == "toggled":
                env["BENCH_TOGGLED_OUT"] = str(workdir / "toggled.json")
                env["BENCH_TOGGLED_BLOCK"] = str(block)
            log = open(workdir / f"{name}-access.log", "wb")  # noqa: SIM115 - closed with the process
            started.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.toggled" if name == "toggled" else "gateway",
                        "serve",
                        "--port",
                        str(ports[name]),
                        "--backend-url",
                        f"http://127.0.0.1:{ports['upstream']}",
                        "--api-key",
                        KEY,
                        "--rate-limit",
                        "1000000000/minute",
                        "--metrics-public",
                        "--log-level",
                        "warning",
                    ],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.DEVNULL,
                    env=env,
                )
            )
        for port in ports.values():
            wait_for_port(port)
        yield {name: f"http://127.0.0.1:{ports[name]}" for name in ("off", "on", "toggled")}
    finally:
        for process in reversed(started):
            process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def span_counts(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        outcome: float(value)
        for outcome, value in re.findall(r'gateway_trace_spans_total\{outcome="(\w+)"\} (\S+)', text)
    }


def balanced_order(paths: tuple[str, ...], turn: int) -> list[str]:
    """Round ``turn``'s order of ``paths`` (an even number of them), a row of a Williams
    design: over len(paths) rounds each path comes first once and right after each other
    path once."""
    count = len(paths)
    first = [0]
    for step in range(1, count):
        first.append((step + 1) // 2 if step % 2 else count - step // 2)
    return [paths[(index + turn) % count] for index in first]


def run(plan: Plan, out: Path) -> dict[str, Any]:
    ensure_tools()
    paths = ("off", "on", "sampled-out", "off-traceparent")
    results: dict[str, Any] = {"plan": plan.__dict__, "machine": {"cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="gateway-bench-tracing-") as temp:
        workdir = Path(temp)
        with processes(workdir, plan.toggled_block) as urls:
            body = request_body(256, workdir)
            chat = "/v1/chat/completions"

            def measure(path: str, connections: int) -> dict[str, float]:
                url = urls["off" if path.startswith("off") else "on"] + chat
                headers = {"traceparent": SAMPLED_OUT} if path in ("sampled-out", "off-traceparent") else None
                return wrk(url, connections, plan.seconds, body, workdir, headers)

            for connections in (32, 1):
                samples: dict[str, list[dict[str, float]]] = {path: [] for path in paths}
                for turn in range(plan.rounds):
                    # None always follows another's load (the traced gateway's spans of the
                    # path before, still being sent and decoded), as it would if each round only
                    # started one path later.
                    for path in balanced_order(paths, turn):
                        samples[path].append(measure(path, connections))
                results[f"c{connections}"] = {
                    path: {
                        key: sum(s[key] for s in runs)
                        if key == "errors"
                        else statistics.median(s[key] for s in runs)
                        for key in runs[0]
                    }
                    for path, runs in samples.items()
                }
            totals = workdir / "toggled.json"
            toggled = urls["toggled"] + chat
            results["cpu"] = {}
            for traffic in ("on", "sampled-out"):
                headers = {"traceparent": SAMPLED_OUT} if traffic == "sampled-out" else None
                wrk(toggled, 32, 1, body, workdir, headers)  # past the blocks not counted
                time.sleep(0.2)
                before = _totals(totals)
                wrk(toggled, 32, plan.toggled_seconds, body, workdir, headers)
                results["cpu"][traffic] = cpu_per_request(before, _totals(totals))
            time.sleep(6)  # the exporter's batch delay (5 s): what is queued is sent
            results["spans"] = {"gateway": span_counts(urls["on"]), "toggled": span_counts(urls["toggled"])}
        counts = workdir / "sink.json"
        results["spans"]["sink"] = (
            json.loads(counts.read_text()) if counts.exists() else {"exports": 0, "spans": 0}
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tracing.json").write_text(json.dumps(results, indent=2))
    (out / "tracing.md").write_text(report(results))
    return results


def _totals(path: Path) -> dict[str, Any]:
    if path.exists():
        totals: dict[str, Any] = json.loads(path.read_text())
        return totals
    return {"on": {"cpu_s": 0.0, "requests": 0}, "off": {"cpu_s": 0.0, "requests": 0}, "export_cpu_s": 0.0}


def cpu_per_request(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    """Microseconds of CPU a request with tracing on and off in the blocks counted between two
    readings of the toggled gateway's totals, and the export thread's per traced request."""

    def per_request(mode: str) -> tuple[float | None, int]:
        requests = after[mode]["requests"] - before[mode]["requests"]
        cpu = after[mode]["cpu_s"] - before[mode]["cpu_s"]
        return (cpu / requests * 1e6 if requests else None), requests

    on, traced = per_request("on")
    off, untraced = per_request("off")
    export = (after["export_cpu_s"] - before["export_cpu_s"]) / traced * 1e6 if traced else None
    share = off / (on + export) if on and off and export is not None else None
    return {
        "off_us": off,
        "on_us": on,
        "export_us": export,
        "share": share,
        "requests_on": traced,
        "requests_off": untraced,
    }


def report(results: dict[str, Any]) -> str:
    c32, c1 = results["c32"], results["c1"]
    off = c32["off"]["rps"]
    lines = [
        "# Tracing's cost\n",
        f"{results['plan']['rounds']} alternating rounds of {results['plan']['seconds']:g} s; medians.\n",
        "| path | c=32 req/s | x off | c=32 p99 ms | c=1 p50 ms | c=1 added p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for path in ("off", "on", "sampled-out", "off-traceparent"):
        lines.append(
            f"| {path} | {c32[path]['rps']:,.0f} | {c32[path]['rps'] / off:.3f} | {c32[path]['p99_ms']:.2f} "
            f"| {c1[path]['p50_ms']:.3f} | {c1[path]['p50_ms'] - c1['off']['p50_ms']:+.3f} |"
        )
    spans = results["spans"]
    cpu = results["cpu"]
    lines += [
        "",
        "CPU a request at c=32 in one gateway whose tracing is switched off and on every "
        f"{results['plan']['toggled_block']:,} requests ({results['plan']['toggled_seconds']:g} s "
        "a traffic): the event loop's thread, tracing off and on, and the export thread's per "
        "traced request; the share is off / (on + export), the throughput left to a gateway "
        "bound by its CPU (the interpreter's lock serializes the two threads).\n",
        "| traffic | off µs | on µs | export thread µs | added µs | share of off |",
        "|---|---|---|---|---|---|",
    ]
    for traffic, figures in cpu.items():
        if figures["share"] is None:
            lines.append(f"| {traffic} | too few requests to count | | | | |")
            continue
        added = figures["on_us"] + figures["export_us"] - figures["off_us"]
        lines.append(
            f"| {traffic} | {figures['off_us']:.1f} | {figures['on_us']:.1f} | {figures['export_us']:.1f} "
            f"| {added:+.1f} | {figures['share']:.3f} |"
        )
    lines += [
        "",
        f"Spans: the traced gateway counted {spans['gateway']}, the toggled one {spans['toggled']}; "
        f"the sink received {spans['sink']['spans']:,} in {spans['sink']['exports']:,} exports.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for path, least in TARGETS.items():
        ratio = c32[path]["rps"] / off
        met = "yes" if ratio >= least else "no"
        lines.append(f"| c=32 {path} >= {least:.0%} of off, requests/s | {ratio:.1%} | {met} |")
        share = cpu[path]["share"]
        if share is not None:
            lines.append(
                f"| c=32 {path} >= {least:.0%} of off, CPU a request | {share:.1%} "
                f"| {'yes' if share >= least else 'no'} |"
            )
    same = c32["sampled-out"]["rps"] / c32["off-traceparent"]["rps"]
    lines.append(f"\nSampled out against off sent the same traceparent: {same:.1%}.")
    errors = sum(c[p]["errors"] for c in (c32, c1) for p in c)
    lines.append(f"\nErrors (wrk's, non-2xx included): {errors}.\n")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny configuration (the test suite's)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sink", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sink is not None:  # the sink's own process
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(sink(args.sink, args.out / "sink.json"))
        return
    out = args.out or ROOT / "bench" / "results" / (time.strftime("%Y%m%d-%H%M%S") + "-tracing")
    run(QUICK if args.quick else FULL, out)
    print((out / "tracing.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
