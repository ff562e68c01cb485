"""Balancing workloads on a simulated fleet: each strategy, and nginx round robin, in one run.

    python -m bench balance [--quick] [--out DIR]

Each replica is a ``bench.simulator`` process (a continuous-batching runtime: a queue, a
batch of 8 whose steps lengthen as it fills, prefill per uncached prompt token, a prefix
cache of limited size, vLLM's metric names). The gateway fronts them with ``kind: vllm``
and each ``strategy``; nginx balances the same replicas round robin. Workloads:

- uniform: Poisson arrivals at 70% of the fleet's capacity, prompts sharing nothing;
- slow: one replica three times slower than the others;
- hidden: eight replicas, four of them also loaded by a client the gateway cannot see
  (sending straight to them, as another gateway or a batch job would);
- sessions: multi-turn conversations (a shared system prompt, a long document of their own,
  then turns), 40 at a time, each turn sent when the last one is answered; the oracle sends
  each conversation straight to one replica, the one with the fewest conversations;
- bursts: arrivals alternating between 35% and 120% of capacity every 2.5 s;
- two gateways: the uniform and session workloads split between two gateway processes,
  each with its own view (herding shows as one replica taking far more than the mean).

Reported per run: time to first token p50 and p99, end to end p99, completed requests/s,
the replicas' prefix-cache hit rate and max/mean requests per replica. Then the cost of
picking a replica, timed and profiled in process at 8 replicas. Results go to
``bench/results/<time>-balance/``: balance.md, balance.json and balance.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench.fleet import Fleet, fleet, raise_fd_limit
from bench.harness import KEY, ROOT, free_port, wait_for_port
from bench.simulator import Settings as Sim
from bench.streams import percentile

CHAT = "/v1/chat/completions"
NGINX = "nginx round robin"
ORACLE = "oracle"
STRATEGIES = ("round-robin", "least-outstanding", "queue", "affinity")


@dataclass
class Plan:
    seconds: float
    replicas: int
    many_replicas: int
    sessions: int
    turns: int
    think_seconds: float
    drain_seconds: float
    sim: Sim = field(default_factory=lambda: Sim(decode_ms=30))
    max_tokens: int = 12
    prompt_words: int = 100
    document_words: int = 400
    system_words: int = 100
    turn_words: int = 20
    session_cache_blocks: int = 800
    pick_iterations: int = 100_000


FULL = Plan(
    seconds=25, replicas=4, many_replicas=8, sessions=40, turns=6, think_seconds=0.3, drain_seconds=60
)
QUICK = Plan(
    seconds=1.5,
    replicas=2,
    many_replicas=4,
    sessions=4,
    turns=3,
    think_seconds=0.05,
    drain_seconds=10,
    sim=Sim(decode_ms=5, prefill_ms_per_token=0.05),
    max_tokens=4,
    pick_iterations=2000,
)


@dataclass
class Workload:
    name: str
    gateways: int
    paths: tuple[str, ...]
    replicas: Callable[[Plan], int]
    sims: Callable[[Plan, int], list[Sim]]


def _uniform_sims(plan: Plan, count: int) -> list[Sim]:
    return [plan.sim] * count


def _slow_sims(plan: Plan, count: int) -> list[Sim]:
    slow = replace(plan.sim, decode_ms=plan.sim.decode_ms * 3)
    return [plan.sim] * (count - 1) + [slow]


def _session_sims(plan: Plan, count: int) -> list[Sim]:
    return [replace(plan.sim, cache_blocks=plan.session_cache_blocks)] * count


BY_LOAD = ("round-robin", "least-outstanding", "queue")
WORKLOADS = (
    Workload("uniform", 1, (NGINX, *STRATEGIES), lambda p: p.replicas, _uniform_sims),
    Workload("slow", 1, (NGINX, *BY_LOAD), lambda p: p.replicas, _slow_sims),
    Workload("hidden", 1, BY_LOAD, lambda p: p.many_replicas, _uniform_sims),
    Workload("sessions", 1, (*STRATEGIES, ORACLE), lambda p: p.replicas, _session_sims),
    Workload("bursts", 1, BY_LOAD, lambda p: p.replicas, _uniform_sims),
    Workload("uniform", 2, STRATEGIES, lambda p: p.replicas, _uniform_sims),
    Workload("sessions", 2, ("least-outstanding", "queue", "affinity"), lambda p: p.replicas, _session_sims),
)


# The load


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    errors: int = 0
    last_done: float = 0.0


def _words(prefix: str, count: int, rng: random.Random) -> str:
    return " ".join(f"{prefix}{rng.randrange(1_000_000)}" for _ in range(count))


async def _send(session: aiohttp.ClientSession, url: str, body: dict[str, Any], tally: Tally | None) -> None:
    start = time.perf_counter()
    first = None
    try:
        async with session.post(url + CHAT, json=body, headers={"Authorization": f"Bearer {KEY}"}) as answer:
            if answer.status != 200:
                await answer.read()
                raise RuntimeError(f"status {answer.status}")
            async for _ in answer.content.iter_any():
                if first is None:
                    first = time.perf_counter()
    except (TimeoutError, aiohttp.ClientError, RuntimeError):
        if tally is not None:
            tally.errors += 1
        return
    end = time.perf_counter()
    if tally is not None and first is not None:
        tally.ttft.append(first - start)
        tally.e2e.append(end - start)
        tally.last_done = end


async def _open_loop(
    session: aiohttp.ClientSession,
    urls: list[str],
    rate: Callable[[float], float],
    seconds: float,
    body: Callable[[], dict[str, Any]],
    tally: Tally | None,
    rng: random.Random,
) -> list[asyncio.Task[None]]:
    """Poisson arrivals at ``rate(t)`` per second for ``seconds``, spread over ``urls`` in turn."""
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    now = 0.0
    turn = 0
    while True:
        now += rng.expovariate(rate(now))
        if now >= seconds:
            return tasks
        delay = start + now - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(_send(session, urls[turn % len(urls)], body(), tally)))
        turn += 1


async def _conversations(
    session: aiohttp.ClientSession,
    urls: list[str],
    plan: Plan,
    tally: Tally,
    rng: random.Random,
    oracle: list[str] | None,
) -> None:
    """``plan.sessions`` conversations at a time until the time is up, each a few turns."""
    system = "You are a careful assistant. " + _words("sys", plan.system_words, random.Random(7))
    deadline = time.perf_counter() + plan.seconds
    active = dict.fromkeys(oracle or (), 0)
    counter = 0

    async def worker(index: int) -> None:
        nonlocal counter
        # Conversations start spread over the first seconds, not all in one instant.
        await asyncio.sleep(rng.uniform(0, min(2.0, plan.seconds / 4)))
        while time.perf_counter() < deadline:
            counter += 1
            target = urls[counter % len(urls)]
            if oracle is not None:
                target = min(active, key=lambda url: (active[url], rng.random()))
                active[target] += 1
            document = _words(f"d{counter}-", plan.document_words, rng)
            messages = [{"role": "system", "content": system}, {"role": "user", "content": document}]
            try:
                for turn in range(plan.turns):
                    body = {
                        "model": "sim",
                        "messages": messages,
                        "max_tokens": plan.max_tokens,
                        "stream": True,
                    }
                    await _send(session, target, body, tally)
                    messages = [
                        *messages,
                        {"role": "assistant", "content": _words(f"a{turn}-", plan.max_tokens, rng)},
                        {"role": "user", "content": _words(f"q{turn}-", plan.turn_words, rng)},
                    ]
                    await asyncio.sleep(plan.think_seconds * rng.uniform(0.5, 1.5))
                    if time.perf_counter() >= deadline:
                        break
            finally:
                if oracle is not None:
                    active[target] -= 1

    await asyncio.gather(*(worker(i) for i in range(plan.sessions)))


async def drive(workload: Workload, plan: Plan, urls: list[str], replicas: list[str]) -> Tally:
    """Run ``workload`` against ``urls`` (gateways, nginx, or the replicas for the oracle)."""
    tally = Tally()
    rng = random.Random(1)
    sims = workload.sims(plan, len(replicas))
    capacity = sum(sim.capacity(plan.max_tokens, plan.prompt_words) for sim in sims)

    def body() -> dict[str, Any]:
        prompt = _words("w", plan.prompt_words, rng)
        messages = [{"role": "user", "content": prompt}]
        return {"model": "sim", "messages": messages, "max_tokens": plan.max_tokens, "stream": True}

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=plan.seconds + plan.drain_seconds)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks: list[asyncio.Task[None]] = []
        if workload.name == "sessions":
            oracle = replicas if urls == replicas else None
            await _conversations(session, urls, plan, tally, rng, oracle)
        else:
            if workload.name == "bursts":
                period = 2.5 if plan.seconds >= 10 else 0.5

                def rate(t: float) -> float:
                    return capacity * (1.2 if int(t / period) % 2 else 0.35)

            elif workload.name == "hidden":
                hidden = replicas[: len(replicas) // 2]
                each = sims[0].capacity(plan.max_tokens, plan.prompt_words)
                others = asyncio.ensure_future(
                    _open_loop(
                        session, hidden, lambda t: 0.6 * each * len(hidden), plan.seconds, body, None, rng
                    )
                )

                def rate(t: float) -> float:
                    return capacity * 0.45

            elif workload.name == "slow":

                def rate(t: float) -> float:
                    return capacity * 0.65

            else:

                def rate(t: float) -> float:
                    return capacity * 0.7

            tasks = await _open_loop(session, urls, rate, plan.seconds, body, tally, rng)
            if workload.name == "hidden":
                tasks += await others
        if tasks:
            await asyncio.wait(tasks, timeout=plan.drain_seconds)
            for task in tasks:
                if not task.done():
                    task.cancel()
                    tally.errors += 1
    return tally


# Processes


def start_simulators(processes: Fleet, sims: list[Sim]) -> list[str]:
    urls = []
    for sim in sims:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.simulator", "--port", str(port), *sim.options()], cwd=ROOT
        )
        processes.started.append(process)
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_for_port(int(url.rsplit(":", 1)[1]))
    return urls


async def _replica_figures(replicas: list[str], reset: bool = False) -> list[dict[str, float]]:
    async with aiohttp.ClientSession() as session:
        figures = []
        for url in replicas:
            if reset:
                async with session.post(url + "/reset") as answer:
                    await answer.read()
            async with session.get(url + "/metrics") as answer:
                text = await answer.text()
            figures.append(
                {
                    sample.name: sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                }
            )
        return figures


def run_one(
    workload: Workload, path: str, plan: Plan, targets: dict[str, list[str]], replicas: list[str]
) -> dict[str, Any]:
    asyncio.run(_replica_figures(replicas, reset=True))
    urls = replicas if path == ORACLE else targets[path]
    started = time.perf_counter()
    tally = asyncio.run(drive(workload, plan, urls, replicas))
    after = asyncio.run(_replica_figures(replicas))
    requests = [figures.get("sim_requests_total", 0.0) for figures in after]
    queries = sum(figures.get("vllm:prefix_cache_queries_total", 0.0) for figures in after)
    hits = sum(figures.get("vllm:prefix_cache_hits_total", 0.0) for figures in after)
    done = len(tally.ttft)
    ttft = sorted(tally.ttft)
    span = max(tally.last_done - started, plan.seconds) if done else plan.seconds
    mean = statistics.fmean(requests) if requests else 0.0
    return {
        "requests": done,
        "errors": tally.errors,
        "rps": round(done / span, 2),
        "ttft_p50_ms": percentile(ttft, 0.50),
        "ttft_p99_ms": percentile(ttft, 0.99),
        "e2e_p99_ms": percentile(sorted(tally.e2e), 0.99),
        "hit_rate": round(hits / queries, 4) if queries else 0.0,
        "max_over_mean": round(max(requests) / mean, 3) if mean else 0.0,
        "per_replica": [int(n) for n in requests],
    }


@contextlib.contextmanager
def _fleet_for(
    workload: Workload, plan: Plan, workdir: Path
) -> Iterator[tuple[dict[str, list[str]], list[str]]]:
    """The replicas and, for each path of the workload, the URLs its clients send to."""
    with fleet(workdir) as processes:
        count = workload.replicas(plan)
        replicas = start_simulators(processes, workload.sims(plan, count))
        targets: dict[str, list[str]] = {}
        for path in workload.paths:
            if path == NGINX:
                targets[path] = [processes.nginx(replicas, method="")]
            elif path in STRATEGIES:
                backend = {"kind": "vllm", "strategy": path}
                targets[path] = [
                    processes.gateway(replicas, "--slow-start", "0", backend=backend)[1]
                    for _ in range(workload.gateways)
                ]
        yield targets, replicas


def run(plan: Plan, workdir: Path, only: set[str] | None = None) -> dict[str, Any]:
    raise_fd_limit()
    results: dict[str, Any] = {"plan": asdict(plan), "runs": []}
    for workload in WORKLOADS:
        if only and workload.name not in only:
            continue
        with _fleet_for(workload, plan, workdir) as (targets, replicas):
            time.sleep(1.5 if plan.seconds >= 10 else 0.5)  # a first scrape and probe of every replica
            for path in workload.paths:
                figures = run_one(workload, path, plan, targets, replicas)
                label = f"{workload.name}{' (2 gateways)' if workload.gateways == 2 else ''}"
                row = {"workload": label, "path": path, "replicas": len(replicas), **figures}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    results["picking"] = picking_cost(plan)
    return results


# The cost of picking


def picking_cost(plan: Plan) -> dict[str, Any]:
    """Microseconds per pick at 8 replicas, each strategy, in this process; and a profile of
    the queue strategy's picks."""
    from gateway.config.backends import parse_backends
    from gateway.config.settings import Settings
    from gateway.core.jsonbody import JsonBody
    from gateway.fleet.replicas import Load
    from gateway.routing.affinity import affinity_key
    from gateway.routing.router import Router

    figures: dict[str, Any] = {}
    body = JsonBody(
        orjson.dumps(
            {
                "model": "sim",
                "messages": [
                    {"role": "system", "content": "x " * 300},
                    {"role": "user", "content": "y " * 500},
                ],
            }
        )
    )
    headers = [(b"content-type", b"application/json"), (b"authorization", b"Bearer k")]
    profile_text = ""
    for strategy in STRATEGIES:
        urls = [f"http://10.0.0.{i}:8000" for i in range(8)]
        configs = parse_backends([{"name": "b", "kind": "vllm", "urls": urls, "strategy": strategy}], "bench")
        router = Router.from_settings(Settings(backends=configs, slow_start=0))
        group = router.groups[0]
        now = time.monotonic()
        for index, replica in enumerate(group.replicas):
            replica.reported, replica.scraped_at = Load(index % 3, 4 + index % 4, 0.1 * index), now + 3600
            replica.in_flight = index % 5
        groups = [group]

        def pick(groups: list[Any] = groups, router: Router = router, strategy: str = strategy) -> None:
            key = affinity_key(headers, body) if strategy == "affinity" else None
            router.choose(groups, [], key)

        iterations = plan.pick_iterations
        for _ in range(min(iterations, 1000)):
            pick()
        start = time.perf_counter()
        for _ in range(iterations):
            pick()
        figures[strategy] = round((time.perf_counter() - start) / iterations * 1e6, 2)
        if strategy in {"queue", "affinity"}:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(min(iterations, 20_000)):
                pick()
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(6)
            profile_text += f"### {strategy}\n\n```\n" + _trim_profile(out.getvalue()) + "```\n\n"
    return {"us_per_pick": figures, "replicas": 8, "profile": profile_text}


def _trim_profile(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return "\n".join(line.replace(str(ROOT) + "/", "") for line in lines[start:]) + "\n"


# Report


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    runs = {(row["workload"], row["path"]): row for row in results["runs"]}
    rows = [
        _ttft_ratio(
            "one slow replica: queue's p99 TTFT at most half of round robin's",
            runs[("slow", "queue")],
            runs[("slow", "round-robin")],
            0.5,
        ),
        _ttft_ratio(
            "load the gateway cannot see: queue's p99 TTFT at most 0.7x least outstanding's",
            runs[("hidden", "queue")],
            runs[("hidden", "least-outstanding")],
            0.7,
        ),
    ]
    affinity, oracle = runs[("sessions", "affinity")], runs[("sessions", ORACLE)]
    share = affinity["hit_rate"] / oracle["hit_rate"] if oracle["hit_rate"] else 0.0
    rows.append(
        (
            "sessions: affinity reaches 80% of the oracle's cache hit rate, max/mean load at most 1.3",
            f"{affinity['hit_rate']:.1%} against {oracle['hit_rate']:.1%} ({share:.0%}), "
            f"max/mean {affinity['max_over_mean']:.2f}",
            share >= 0.8 and affinity["max_over_mean"] <= 1.3,
        )
    )
    two = [row for row in results["runs"] if row["workload"].endswith("(2 gateways)")]
    worst = max(two, key=lambda row: row["max_over_mean"])
    rows.append(
        (
            "two gateway processes: no strategy herds (max/mean load at most 1.3)",
            ", ".join(
                f"{row['workload'].split()[0]} {row['path']} {row['max_over_mean']:.2f}" for row in two
            ),
            worst["max_over_mean"] <= 1.3,
        )
    )
    picks = results["picking"]["us_per_pick"]
    rows.append(
        (
            "picking a replica costs under 20 µs at 8 replicas",
            ", ".join(f"{name} {us:.1f} µs" for name, us in picks.items()),
            max(picks.values()) < 20,
        )
    )
    return rows


def _ttft_ratio(
    target: str, row: dict[str, Any], other: dict[str, Any], most: float
) -> tuple[str, str, bool]:
    ours, theirs = row["ttft_p99_ms"], other["ttft_p99_ms"]
    ratio = ours / theirs if theirs else float("inf")
    return target, f"{ours:,.0f} against {theirs:,.0f} ms (x{ratio:.2f})", ratio <= most


def report(results: dict[str, Any]) -> str:
    lines = [
        "## Balancing on a simulated fleet",
        "",
        f"Plan: `{ {k: v for k, v in results['plan'].items() if k != 'sim'} }`; each replica: "
        f"`{results['plan']['sim']}`.",
        "",
        "| workload | replicas | path | TTFT p50 ms | TTFT p99 ms | e2e p99 ms | requests/s | errors "
        "| cache hit rate | max/mean load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["runs"]:
        lines.append(
            f"| {row['workload']} | {row['replicas']} | {row['path']} | {row['ttft_p50_ms']:,.0f} | "
            f"{row['ttft_p99_ms']:,.0f} | {row['e2e_p99_ms']:,.0f} | {row['rps']:.1f} | {row['errors']} | "
            f"{row['hit_rate']:.1%} | {row['max_over_mean']:.2f} |"
        )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in targets(results):
        lines.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")
    lines += ["", "Picking at 8 replicas, profiled (the 6 costliest functions by own time):", ""]
    lines.append(results["picking"]["profile"])
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    workloads = list(dict.fromkeys(row["workload"] for row in runs))
    paths = list(dict.fromkeys(row["path"] for row in runs))
    figure, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.8 / len(paths)
    for metric, axis, title in (
        ("ttft_p99_ms", axes[0], "time to first token, p99 (ms, log)"),
        ("max_over_mean", axes[1], "max/mean requests per replica"),
    ):
        for offset, name in enumerate(paths):
            xs, ys = [], []
            for index, workload in enumerate(workloads):
                row = next((r for r in runs if r["workload"] == workload and r["path"] == name), None)
                if row is not None:
                    xs.append(index + offset * width)
                    ys.append(max(row[metric], 1e-3))
            axis.bar(xs, ys, width, label=name)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads, rotation=20)
        axis.set_title(title)
        if metric == "ttft_p99_ms":
            axis.set_yscale("log")
        else:
            axis.axhline(1.3, color="grey", linestyle="--", linewidth=1)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench balance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a tiny configuration, for tests")
    parser.add_argument("--out", type=Path, help="where results go (default: bench/results/<time>-balance)")
    parser.add_argument("--only", help="some workloads, comma-separated (a partial run reports no targets)")
    parser.add_argument("--seconds", type=float, help="each run's length (default 25)")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / (time.strftime("%Y%m%d-%H%M%S") + "-balance")
    plan = QUICK if args.quick else FULL
    if args.seconds:
        plan = replace(plan, seconds=args.seconds)
    only = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="gateway-balance-") as temp:
        results = run(plan, Path(temp), only)
    out.mkdir(parents=True, exist_ok=True)
    if only:
        (out / "balance.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results["runs"], indent=1))
        return
    (out / "balance.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (out / "balance.md").write_text(text)
    plot(results, out / "balance.png")
    print(text)
    print(f"results in {out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
