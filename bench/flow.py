"""Flow control on a saturated simulated fleet: FIFO against flow control, in one run.

    python -m bench flow [--quick] [--out DIR]

Two ``bench.simulator`` replicas (continuous batching, 8 running each, a FIFO queue inside,
vLLM's metric names) behind a gateway. Three keys: ``flood`` (priority 0) keeps 48 streams in
flight; ``interactive`` (priority 10) and ``peer`` (priority 0, like the flood) each send two
requests a second. Paths:

The flood's requests ask for 32 to 96 tokens, the others' for 8 to 24 (lengths vary: a batch
of equal ones would free its slots together).

- fifo: no ``max_concurrency``, as before flow control: every request waits in a runtime's queue;
- flow: ``max_concurrency: 8``, the replicas' batch;
- auto: ``max_concurrency: auto`` with ``strategy: queue``, learnt from the replicas' reports.

Then shedding: ``queue_size: 4``, ``queue_timeout: 2`` with the flood and the interactive key:
only the flood is refused, each refusal with Retry-After at most the timeout + 1 s, and the
flood's clients wait that long before sending again.

Reported per path and key: time to first token p50 and p99, completed requests, errors, and
tokens a second received while measuring (counted as they stream, not when a request ends).
Results go to ``bench/results/<time>-flow/``: flow.md and flow.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.balance import start_simulators
from bench.fleet import fleet, raise_fd_limit
from bench.harness import ROOT
from bench.simulator import MODEL
from bench.simulator import Settings as Sim
from bench.streams import percentile

CHAT = "/v1/chat/completions"
KEYS = {"flood": 0, "interactive": 10, "peer": 0}
SECRET = "bench-flow-object-secret-0123456789"


@dataclass(frozen=True)
class Plan:
    seconds: float = 30.0
    """How long each path is measured, after its warm-up."""
    warmup: float = 15.0
    """Long enough for FIFO's queues to reach their depth (its waits are several seconds)."""
    flood_streams: int = 48
    rate: float = 2.0
    """Requests a second of the interactive key and of the peer."""
    max_tokens: int = 64
    """The flood's answers, on average (a batch job's)."""
    interactive_tokens: int = 16
    """The interactive key's and the peer's, on average (a chat turn's)."""
    replicas: int = 2
    batch: int = 8


QUICK = Plan(seconds=3.0, warmup=2.0, flood_streams=12, rate=4.0, max_tokens=16, interactive_tokens=8)


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    errors: int = 0
    refused: int = 0
    retry_after: list[int] = field(default_factory=list)
    tokens: int = 0


class Run:
    """One path's clients: what each key saw while measuring."""

    def __init__(self, url: str, plan: Plan) -> None:
        self.url = url
        self.plan = plan
        self.tallies = {key: Tally() for key in KEYS}
        self.measuring = False
        self.stopping = False

    async def send(self, session: aiohttp.ClientSession, key: str, rng: random.Random) -> float:
        """One streamed chat request; the seconds a refusal asks to wait, else 0."""
        words = " ".join(f"w{rng.randrange(10_000)}" for _ in range(32))
        # Lengths vary, as real answers do: a batch of equal ones would free its slots together.
        tokens = self.plan.max_tokens if key == "flood" else self.plan.interactive_tokens
        length = rng.randint(tokens // 2, tokens * 3 // 2)
        body = {
            "model": MODEL,
            "stream": True,
            "max_tokens": length,
            "messages": [{"role": "user", "content": words}],
        }
        tally = self.tallies[key]
        start = time.perf_counter()
        first = None
        try:
            headers = {"Authorization": f"Bearer sk-{key}"}
            async with session.post(self.url + CHAT, json=body, headers=headers) as answer:
                if answer.status == 503:
                    await answer.read()
                    wait = int(answer.headers.get("retry-after", "1"))
                    if self.measuring:
                        tally.refused += 1
                        tally.retry_after.append(wait)
                    return float(wait)
                if answer.status != 200:
                    await answer.read()
                    raise RuntimeError(f"status {answer.status}")
                async for line in answer.content:
                    if line.startswith(b"data: {"):
                        if self.measuring:  # what was generated while measuring, as it came
                            tally.tokens += 1
                        if first is None:
                            first = time.perf_counter()
        except (TimeoutError, aiohttp.ClientError, RuntimeError):
            if self.measuring:
                tally.errors += 1
            return 0.0
        if self.measuring and first is not None:
            tally.ttft.append(first - start)
        return 0.0

    async def flood(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        while not self.stopping:
            wait = await self.send(session, "flood", rng)
            if wait:
                await asyncio.sleep(wait)

    async def open_loop(self, session: aiohttp.ClientSession, key: str, rng: random.Random) -> None:
        tasks: set[asyncio.Task[float]] = set()
        while not self.stopping:
            await asyncio.sleep(rng.expovariate(self.plan.rate))
            task = asyncio.ensure_future(self.send(session, key, rng))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drive(self, keys: list[str]) -> dict[str, Any]:
        rng = random.Random(7)
        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            tasks = [asyncio.ensure_future(self.flood(session, rng)) for _ in range(self.plan.flood_streams)]
            tasks += [
                asyncio.ensure_future(self.open_loop(session, key, rng)) for key in keys if key != "flood"
            ]
            await asyncio.sleep(self.plan.warmup)
            self.measuring = True
            started = time.perf_counter()
            await asyncio.sleep(self.plan.seconds)
            self.measuring = False
            span = time.perf_counter() - started
            self.stopping = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return {key: _figures(self.tallies[key], span) for key in keys}


def _figures(tally: Tally, span: float) -> dict[str, Any]:
    ttft = sorted(tally.ttft)
    return {
        "requests": len(ttft),
        "errors": tally.errors,
        "refused": tally.refused,
        "retry_after_max": max(tally.retry_after, default=None),
        "ttft_p50_ms": percentile(ttft, 0.50),
        "ttft_p99_ms": percentile(ttft, 0.99),
        "tokens_per_s": round(tally.tokens / span, 1),
    }


PATHS: dict[str, dict[str, Any]] = {
    "fifo": {},
    "flow": {"max_concurrency": "batch"},
    "auto": {"max_concurrency": "auto", "strategy": "queue", "scrape_interval": 0.25},
}
SHED_TIMEOUT = 2
SHED: dict[str, Any] = {"max_concurrency": "batch", "queue_size": 4, "queue_timeout": SHED_TIMEOUT}


def run(plan: Plan, workdir: Path) -> dict[str, Any]:
    raise_fd_limit()
    keys_file = workdir / "keys.json"
    keys = [{"name": key, "key": f"sk-{key}", "priority": priority} for key, priority in KEYS.items()]
    keys_file.write_text(json.dumps({"keys": keys}))
    options = (
        "--keys-file",
        str(keys_file),
        "--object-secret",
        SECRET,
        "--slow-start",
        "0",
        "--no-access-log",
    )
    sims = [Sim(max_batch=plan.batch) for _ in range(plan.replicas)]
    results: dict[str, Any] = {"plan": asdict(plan), "paths": {}}
    for name, backend in [*PATHS.items(), ("shed", SHED)]:
        entry = {"kind": "vllm", **{k: plan.batch if v == "batch" else v for k, v in backend.items()}}
        with fleet(workdir) as processes:
            replicas = start_simulators(processes, sims)
            _, url = processes.gateway(replicas, *options, backend=entry)
            keys_used = ["flood", "interactive"] if name == "shed" else list(KEYS)
            results["paths"][name] = {"backend": entry, "keys": asyncio.run(Run(url, plan).drive(keys_used))}
        print(f"{name}: {json.dumps(results['paths'][name]['keys'])}", flush=True)
    return results


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    paths = results["paths"]
    fifo = paths["fifo"]["keys"]

    def ratio(path: str, key: str) -> float | None:
        base, got = fifo[key]["ttft_p99_ms"], paths[path]["keys"][key]["ttft_p99_ms"]
        return None if not base or got is None else got / base

    rows = []
    for path, key, bound in (
        ("flow", "interactive", 0.25),
        ("flow", "peer", 0.25),
        ("auto", "interactive", 0.35),
    ):
        value = ratio(path, key)
        rows.append(
            (
                f"{path}: the {key} key's p99 TTFT at most {bound} of FIFO's",
                "-" if value is None else f"{value:.3f}",
                value is not None and value <= bound,
            )
        )
    flood = fifo["flood"]["tokens_per_s"]
    kept = paths["flow"]["keys"]["flood"]["tokens_per_s"] / flood if flood else 0.0
    rows.append(("flow: the flood's tokens/s at least 0.9 of FIFO's", f"{kept:.3f}", kept >= 0.9))
    total = sum(figures["tokens_per_s"] for figures in fifo.values())
    kept_all = sum(f["tokens_per_s"] for f in paths["flow"]["keys"].values()) / total if total else 0.0
    rows.append(
        ("flow: every key's tokens/s together at least 0.95 of FIFO's", f"{kept_all:.3f}", kept_all >= 0.95)
    )
    shed = paths["shed"]["keys"]
    timeout = SHED_TIMEOUT
    worst = shed["flood"]["retry_after_max"]
    shed_ok = (
        shed["interactive"]["refused"] == 0
        and shed["interactive"]["errors"] == 0
        and shed["flood"]["errors"] == 0
        and (worst is None or worst <= timeout + 1)
    )
    errors = shed["flood"]["errors"] + shed["interactive"]["errors"]
    measured = (
        f"flood refused {shed['flood']['refused']} (Retry-After at most {worst}), "
        f"interactive refused {shed['interactive']['refused']}, errors {errors}"
    )
    rows.append(
        ("a small queue sheds the low priority only, Retry-After within the timeout + 1 s", measured, shed_ok)
    )
    return rows


def report(results: dict[str, Any]) -> str:
    plan = results["plan"]
    lines = [
        "# Flow control",
        "",
        f"Plan: `{plan}`.",
        "",
        "| path | key | requests | errors | refused | TTFT p50 ms | TTFT p99 ms | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, run_ in results["paths"].items():
        for key, figures in run_["keys"].items():
            lines.append(
                f"| {path} | {key} | {figures['requests']} | {figures['errors']} | {figures['refused']} | "
                f"{figures['ttft_p50_ms']} | {figures['ttft_p99_ms']} | {figures['tokens_per_s']} |"
            )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for what, measured, met in targets(results):
        lines.append(f"| {what} | {measured} | {'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench flow", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds a path")
    parser.add_argument("--out", type=Path, help="where the results go (default: bench/results/<time>-flow)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    out = args.out or ROOT / "bench" / "results" / (time.strftime("%Y%m%d-%H%M%S") + "-flow")
    out.mkdir(parents=True, exist_ok=True)
    results = run(plan, out)
    (out / "flow.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (out / "flow.md").write_text(text)
    print(text)
    print(f"results in {out}")
