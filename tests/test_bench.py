"""The benchmark script runs end to end in a tiny configuration. No timing is asserted:
speed is what the benchmark reports, not what the suite checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.vllm_server import vllm_python

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.bench


def run_quick(out: Path, *command: str) -> None:
    """``python -m bench [command] --quick --out OUT``, which must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "bench", *command, "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_benchmark_runs_a_tiny_configuration(tmp_path: Path) -> None:
    run_quick(tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    for workload in ("c1", "c32", "stream100_c16"):
        for path in ("direct", "nginx", "nginx-ka", "gateway"):
            assert data[workload][path]["rps"] > 0, (workload, path)
            assert data[workload][path]["errors"] == 0, (workload, path)
    for workload in ("c1", "c32"):  # the floor under the gateway: uvicorn and its client alone
        assert data[workload]["floor"]["rps"] > 0, workload
        assert data[workload]["floor"]["errors"] == 0, workload
    for workload in ("c32", "stream100_c16"):
        assert data[workload]["gateway-2w"]["rps"] > 0, workload
        assert data[workload]["gateway-2w"]["errors"] == 0, workload
    for size in data["bodies"].values():
        assert size["gateway"]["rps"] > 0
    for path in ("nginx", "gateway"):
        assert data["paced"][path]["errors"] == 0, data["paced"]
    assert data["paced"]["gateway"]["peak_rss_mb"] > 0
    assert data["soak"]["samples"]
    fleet = data["fleet"]
    for workload, paths in (("cost", ("one", "four")), ("slow", ("least-outstanding", "round-robin"))):
        for path in paths:
            assert fleet[workload][path]["rps"] > 0, (workload, path)
            assert fleet[workload][path]["errors"] == 0, (workload, path)
    assert fleet["kill"]["requests"] > 0
    for path in ("nginx", "gateway"):
        assert fleet["paced"][path]["errors"] == 0, fleet["paced"]
    report = (tmp_path / "results.md").read_text()
    assert "| target | measured | met |" in report
    assert "| floor | " in report
    assert "## Several replicas" in report
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")


def test_the_balancing_benchmark_runs_a_tiny_configuration(tmp_path: Path) -> None:
    run_quick(tmp_path, "balance")
    data = json.loads((tmp_path / "balance.json").read_text())
    paths = {(row["workload"], row["path"]) for row in data["runs"]}
    for workload in ("uniform", "slow", "hidden", "sessions", "bursts"):
        for strategy in ("round-robin", "least-outstanding", "queue"):
            assert (workload, strategy) in paths
    assert ("sessions", "affinity") in paths
    assert ("sessions", "oracle") in paths
    assert ("uniform", "nginx round robin") in paths
    assert ("uniform (2 gateways)", "queue") in paths
    for row in data["runs"]:
        assert row["requests"] > 0, row
        assert row["errors"] == 0, row
        assert sum(row["per_replica"]) >= row["requests"], row
    assert all(row["hit_rate"] > 0 for row in data["runs"] if row["workload"].startswith("sessions"))
    assert set(data["picking"]["us_per_pick"]) == {"round-robin", "least-outstanding", "queue", "affinity"}
    report = (tmp_path / "balance.md").read_text()
    assert "| target | measured | met |" in report
    assert "balancers.py" in report  # the profile names the functions it timed
    assert (tmp_path / "balance.png").read_bytes().startswith(b"\x89PNG")


def test_the_flow_benchmark_runs_a_tiny_configuration(tmp_path: Path) -> None:
    run_quick(tmp_path, "flow")
    data = json.loads((tmp_path / "flow.json").read_text())
    assert set(data["paths"]) == {"fifo", "flow", "auto", "shed"}
    for path, run in data["paths"].items():
        for key, figures in run["keys"].items():
            assert figures["requests"] > 0, (path, key)
            assert figures["errors"] == 0, (path, key)
    assert data["paths"]["flow"]["backend"]["max_concurrency"] == 8
    assert data["paths"]["shed"]["keys"]["interactive"]["refused"] == 0
    assert "| target | measured | met |" in (tmp_path / "flow.md").read_text()


@pytest.mark.vllm
def test_the_vllm_benchmark_runs_a_tiny_configuration(tmp_path: Path) -> None:
    vllm_python()  # vLLM's own environment, which make test makes
    run_quick(tmp_path, "vllm")
    data = json.loads((tmp_path / "results.json").read_text())
    measured = data["concurrency"]["2"]
    for path in ("direct", "gateway"):
        (round_,) = measured["rounds"][path]
        assert round_["ttft_median_ms"] > 0
        assert round_["output_throughput"] > 0
    assert set(measured["added_ms"]) >= {"ttft_median_ms", "itl_median_ms", "itl_p99_ms"}
    assert "| figure | direct | through the gateway | added |" in (tmp_path / "results.md").read_text()


def test_the_tracing_benchmark_runs_a_tiny_configuration(tmp_path: Path) -> None:
    run_quick(tmp_path, "tracing")
    data = json.loads((tmp_path / "tracing.json").read_text())
    for workload in ("c32", "c1"):
        for path in ("off", "on", "sampled-out"):
            assert data[workload][path]["rps"] > 0, (workload, path)
            assert data[workload][path]["errors"] == 0, (workload, path)
    spans = data["spans"]
    assert spans["gateway"]["exported"] > 0
    assert spans["toggled"]["exported"] > 0
    assert spans["gateway"]["exported"] + spans["toggled"]["exported"] == spans["sink"]["spans"]
    for gateway in ("gateway", "toggled"):
        assert spans[gateway]["dropped"] == spans[gateway]["failed"] == 0
    for traffic in ("on", "sampled-out"):  # both modes measured in the one gateway
        cpu = data["cpu"][traffic]
        for figure in ("requests_on", "requests_off", "on_us", "off_us", "share"):
            assert cpu[figure] > 0, (traffic, figure)
    assert data["cpu"]["on"]["export_us"] > 0  # its spans were sent
    assert "| target | measured | met |" in (tmp_path / "tracing.md").read_text()
    assert "CPU a request" in (tmp_path / "tracing.md").read_text()


def test_the_tracing_benchmarks_rounds_put_each_path_right_after_every_other_once() -> None:
    from bench.tracing import balanced_order

    paths = ("off", "on", "sampled-out", "off-traceparent")
    rounds = [balanced_order(paths, turn) for turn in range(len(paths))]
    assert all(sorted(order) == sorted(paths) for order in rounds)
    assert sorted(order[0] for order in rounds) == sorted(paths)
    after = [(order[i], order[i + 1]) for order in rounds for i in range(len(order) - 1)]
    assert sorted(after) == sorted((a, b) for a in paths for b in paths if a != b)
