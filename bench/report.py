"""Turning a benchmark run's results into the targets' verdicts, a markdown table and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PATHS = ("direct", "nginx", "nginx-ka", "gateway", "gateway-2w")
"""direct to the upstream; nginx plain (the targets' reference) and with upstream keep-alive;
the gateway as one process (the targets' subject) and as two workers."""
SINGLE_GATEWAY = PATHS[:4]
"""The paths for latency and body-size workloads, where a second worker says nothing new."""
FLOOR = "floor"
"""uvicorn and the gateway's client with nothing else (``bench.floor``), beside the gateway
at c=1 and c=32: what its features cost, and what no change to them removes."""


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each target of the performance issue."""
    rows = []
    c1, c32 = results["c1"], results["c32"]
    added = c1["gateway"]["p50_ms"] - c1["direct"]["p50_ms"]
    floor = f" (the floor: +{c1[FLOOR]['p50_ms'] - c1['direct']['p50_ms']:.3f} ms)" if FLOOR in c1 else ""
    rows.append(
        ("c=1: adds at most 0.15 ms to a direct call's median", f"+{added:.3f} ms{floor}", added <= 0.15)
    )
    ratio = _ratio(c32, "gateway", "nginx")
    floor = f" (the floor: {_ratio(c32, FLOOR, 'nginx'):.1%})" if FLOOR in c32 else ""
    rows.append(
        (
            "c=32: one process at least 25% of plain nginx's requests/s",
            f"{ratio:.1%} {_others(c32)}{floor}",
            ratio >= 0.25,
        )
    )
    ratio = _ratio(results["stream100_c16"], "gateway", "nginx")
    rows.append(
        (
            "100-chunk streams, c=16: at least 90% of nginx's responses/s",
            f"{ratio:.1%} {_others(results['stream100_c16'])}",
            ratio >= 0.90,
        )
    )
    gw, ng = results["paced"]["gateway"], results["paced"]["nginx"]
    extra = gw["late_p99_ms"] - ng["late_p99_ms"]
    ok = gw["errors"] == 0 and extra <= 3 and gw["peak_rss_mb"] < 200
    rows.append(
        (
            f"{gw['streams']} paced streams: no errors, p99 lateness at most 3 ms above nginx's, "
            "peak RSS < 200 MB",
            f"{gw['errors']} errors, +{extra:.2f} ms, {gw['peak_rss_mb']} MB",
            ok,
        )
    )
    sizes = sorted(results["bodies"], key=int)
    first, last = sizes[0], sizes[-1]
    cost = [
        results["bodies"][s]["gateway"]["p50_ms"] - results["bodies"][s]["direct"]["p50_ms"]
        for s in (first, last)
    ]
    growth = cost[1] / cost[0] if cost[0] > 0 else float("inf")
    bytes_growth = int(last) / int(first)
    rows.append(
        (
            f"request bodies {int(first) // 1024} KB to {int(last) // 1024} KB: "
            "cost grows no faster than the bytes",
            f"added latency x{growth:.1f} for bytes x{bytes_growth:.0f}",
            growth <= bytes_growth,
        )
    )
    if "soak" in results:
        soak_result = results["soak"]
        flat = abs(soak_result["trend_mb_per_min"]) < 0.5
        rows.append(
            (
                f"{soak_result['seconds'] / 60:g}-minute soak: flat memory",
                f"{soak_result['rss_start_mb']} -> {soak_result['rss_end_mb']} MB, "
                f"trend {soak_result['trend_mb_per_min']} MB/min",
                flat,
            )
        )
    return rows


def _ratio(data: dict[str, dict[str, float]], path: str, reference: str) -> float:
    return data[path]["rps"] / data[reference]["rps"]


def _others(data: dict[str, dict[str, float]]) -> str:
    """The same ratio against tuned nginx, and for two workers."""
    keep_alive = _ratio(data, "gateway", "nginx-ka")
    two, two_ka = _ratio(data, "gateway-2w", "nginx"), _ratio(data, "gateway-2w", "nginx-ka")
    return f"(of nginx with upstream keep-alive: {keep_alive:.1%}; two workers: {two:.1%} and {two_ka:.1%})"


def report(results: dict[str, Any]) -> str:
    lines = [
        "# Benchmark",
        "",
        f"Machine: {results['machine']['cpus']} CPUs. Plan: `{results['plan']}`.",
        "",
        "nginx is a plain `proxy_pass` (a new upstream connection per request); nginx-ka keeps",
        "HTTP/1.1 connections to the upstream. gateway is one process, gateway-2w two workers.",
        "",
        "| workload | metric | " + " | ".join(PATHS) + " | gateway / nginx | gateway / nginx-ka |",
        "|---|---|" + "---|" * (len(PATHS) + 2),
    ]

    def row(name: str, data: dict[str, dict[str, float]], metric: str) -> None:
        values = [f"{data[p][metric]:,.3f}" if p in data else "-" for p in PATHS]
        gateway = data["gateway"][metric]
        ratios = [f"{gateway / data[p][metric]:.1%}" for p in ("nginx", "nginx-ka")]
        lines.append(f"| {name} | {metric} | " + " | ".join(values + ratios) + " |")

    row("non-streaming, c=1", results["c1"], "p50_ms")
    row("non-streaming, c=1", results["c1"], "rps")
    row("non-streaming, c=32", results["c32"], "rps")
    row("non-streaming, c=32", results["c32"], "p99_ms")
    row("100-chunk streams, c=16", results["stream100_c16"], "rps")
    for size, data in results["bodies"].items():
        row(f"{int(size) // 1024} KB bodies, c=8", data, "rps")
        row(f"{int(size) // 1024} KB bodies, c=8", data, "p50_ms")
    if FLOOR in results["c1"] and FLOOR in results["c32"]:
        c1, c32 = results["c1"], results["c32"]
        lines += [
            "",
            "floor: uvicorn and the gateway's client alone (`bench.floor`), no key, limit, metrics, log,",
            "routing or checks; the gap to it is what the gateway's features cost.",
            "",
            "| path | c=1 p50 ms | added to direct | c=32 rps | share of plain nginx |",
            "|---|---|---|---|---|",
        ]
        for path in (FLOOR, "gateway"):
            lines.append(
                f"| {path} | {c1[path]['p50_ms']:.3f} | +{c1[path]['p50_ms'] - c1['direct']['p50_ms']:.3f} | "
                f"{c32[path]['rps']:,.0f} | {_ratio(c32, path, 'nginx'):.1%} |"
            )
    paced_result = results["paced"]
    lines += ["", "| paced streams | errors | lateness p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    for path in ("nginx", "gateway"):
        r = paced_result[path]
        lines.append(
            f"| {path} ({r['streams']} streams) | {r['errors']} | {r['late_p50_ms']} | {r['late_p99_ms']} | "
            f"{r['late_max_ms']} |"
        )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [
        f"| {name} | {measured} | {'yes' if ok else '**no**'} |" for name, measured, ok in targets(results)
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    workloads = [("c=32 req/s", results["c32"]), ("streams c=16", results["stream100_c16"])]
    workloads += [(f"{int(s) // 1024} KB body", d) for s, d in results["bodies"].items()]
    names = [name for name, _ in workloads]
    width = 0.8 / len(PATHS)
    for offset, p in enumerate(PATHS):
        left.bar(
            [i + offset * width for i in range(len(names))],
            [d[p]["rps"] if p in d else 0 for _, d in workloads],
            width,
            label=p,
        )
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=15)
    left.set_ylabel("requests / s (log scale)")
    left.set_yscale("log")
    left.set_title("Throughput")
    left.legend()
    latencies = [results["c1"][p]["p50_ms"] for p in SINGLE_GATEWAY]
    right.bar(SINGLE_GATEWAY, latencies, color=[f"C{i}" for i in range(len(SINGLE_GATEWAY))])
    right.set_ylabel("median latency, ms")
    right.set_title("One client (c=1)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
