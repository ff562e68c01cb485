"""/metrics after real requests through the gateway, and the tallies they are folded from."""

from __future__ import annotations

import asyncio
import random
import string
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from adapters.base import Route
from gateway.core.exchange import Exchange
from gateway.observability.metrics import LATENCY_BUCKETS, KnownModels, Metrics
from gateway.tenancy.auth import plain_key_name
from tests.conftest import AUTH, Fake, Gateway, GatewayFactory
from tests.support.fakes import free_port, wait_until
from tests.support.processes import serve, stop

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(gateway: Gateway | str, headers: dict[str, str] | None = None) -> Samples:
    url = gateway if isinstance(gateway, str) else gateway.url + "/metrics"
    response = httpx.get(url, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for found, v in samples.get(name, []) if all(found.get(k) == w for k, w in labels.items()))


def known(gateway: Gateway) -> bool:
    return "fake-model" in gateway.app.state.metrics.models.listed


def test_requests_tokens_and_latencies(gateway: Gateway) -> None:
    assert wait_until(lambda: known(gateway))
    for _ in range(3):
        httpx.post(gateway.url + "/v1/chat/completions", json={"model": "fake-model"}, headers=AUTH)
    httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "fake-model", "stream": True, "stream_options": {"include_usage": True}},
        headers=AUTH,
    )
    samples = scrape(gateway)
    labels = {
        "route": "chat_completions",
        "status": "200",
        "model": "fake-model",
        "key": plain_key_name("sk-test-1"),
    }
    assert value(samples, "gateway_requests_total", backend="openai", method="POST", **labels) == 4
    # 3 answers with usage 5 + 3, one stream whose final chunk says 5 + 5.
    assert (
        value(
            samples,
            "gateway_tokens_total",
            kind="prompt",
            model="fake-model",
            key=plain_key_name("sk-test-1"),
        )
        == 20
    )
    assert (
        value(
            samples,
            "gateway_tokens_total",
            kind="completion",
            model="fake-model",
            key=plain_key_name("sk-test-1"),
        )
        == 14
    )
    assert value(samples, "gateway_time_to_first_byte_seconds_count", route="chat_completions") == 4
    assert value(samples, "gateway_request_duration_seconds_count", route="chat_completions") == 4
    assert value(samples, "gateway_overhead_seconds_count", route="chat_completions") == 4
    assert value(samples, "gateway_stream_duration_seconds_count", route="chat_completions") == 1
    assert value(samples, "gateway_in_flight_requests", route="chat_completions") == 0
    assert value(samples, "gateway_open_streams", route="chat_completions") == 0


def test_ttfb_is_observed_for_a_paced_stream(gateway: Gateway) -> None:
    httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "fake-model", "stream": True},
        headers={**AUTH, "x-fake-delay": "0.1"},
    )
    samples = scrape(gateway)
    # The first chunk came after ~0.1 s, the whole stream after ~0.5 s.
    assert (
        value(samples, "gateway_time_to_first_byte_seconds_bucket", route="chat_completions", le="0.05") == 0
    )
    assert (
        value(samples, "gateway_time_to_first_byte_seconds_bucket", route="chat_completions", le="0.25") == 1
    )
    assert value(samples, "gateway_request_duration_seconds_bucket", route="chat_completions", le="0.25") == 0


def test_model_label_stays_bounded(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], metrics_models=["configured-model"])
    assert wait_until(lambda: known(gateway))
    rng = random.Random(7)
    with httpx.Client(headers=AUTH) as client:
        for _ in range(1000):
            name = "".join(rng.choices(string.ascii_lowercase, k=12))
            client.post(gateway.url + "/v1/chat/completions", json={"model": name})
        client.post(gateway.url + "/v1/chat/completions", json={"model": "configured-model"})
        client.post(gateway.url + "/v1/chat/completions", json={"model": "org/name-7b"})
    samples = scrape(gateway)
    models = {labels["model"] for labels, _ in samples["gateway_requests_total"]}
    assert models == {"other", "configured-model", "org/name-7b"}
    assert value(samples, "gateway_requests_total", model="other") == 1000


def test_errors_and_disconnects_are_counted(start_gateway: GatewayFactory, fake: Fake) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"])
    httpx.post(gateway.url + "/v1/chat/completions", json={"model": "error-500"}, headers=AUTH)
    httpx.post(gateway.url + "/v1/chat/completions", json={"model": "error-400"}, headers=AUTH)
    httpx.post(gateway.url + "/v1/chat/completions", json={"model": "die", "stream": True}, headers=AUTH)
    httpx.post(gateway.url + "/v1/chat/completions", json={"model": "x"}, headers={"x-api-key": "wrong"})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/v1/chat/completions", json={"model": "slow"}, headers=AUTH, timeout=0.3)
    assert wait_until(fake.seen.cancelled.is_set)
    down = start_gateway(backend_url=f"http://127.0.0.1:{free_port()}")
    httpx.post(down.url + "/v1/chat/completions", json={"model": "x"})

    samples = scrape(gateway)
    assert value(samples, "gateway_backend_errors_total", type="status_5xx") == 1
    assert value(samples, "gateway_backend_errors_total", type="status_4xx") == 1
    assert value(samples, "gateway_backend_errors_total", type="mid_stream") == 1
    assert value(samples, "gateway_requests_total", status="401") == 1
    assert value(samples, "gateway_client_disconnects_total", route="chat_completions") == 1
    assert value(samples, "gateway_requests_total", status="499") == 1
    assert value(scrape(down), "gateway_backend_errors_total", type="unreachable") == 1


def test_metrics_token(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(metrics_token="scrape-me")
    assert httpx.get(gateway.url + "/metrics").status_code == 401
    assert httpx.get(gateway.url + "/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    scrape(gateway, headers={"Authorization": "Bearer scrape-me"})


def test_a_fresh_registry_per_app(start_gateway: GatewayFactory) -> None:
    first = start_gateway()
    httpx.get(first.url + "/v1/models")
    second = start_gateway()
    assert value(scrape(second), "gateway_requests_total") == 0
    assert value(scrape(first), "gateway_requests_total") == 1


def test_metrics_on_their_own_port(fake: Fake) -> None:
    metrics_port = free_port()
    process, url = serve("--backend-url", fake.url, "--metrics-port", str(metrics_port), "--no-access-log")
    try:
        assert httpx.get(url + "/metrics").status_code == 404
        httpx.get(url + "/v1/models")
        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert value(samples, "gateway_requests_total", route="models") == 1
        # The process's own figures, as prometheus_client's default registry has them.
        assert value(samples, "process_resident_memory_bytes") > 10_000_000
        assert value(samples, "process_cpu_seconds_total") > 0
        assert value(samples, "process_open_fds") > 0
        assert value(samples, "python_info", implementation="CPython") == 1
        assert "python_gc_collections_total" in samples
    finally:
        stop(process)


def test_two_workers_aggregate_their_metrics(fake: Fake, tmp_path: Path) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    process, url = serve("--backend-url", fake.url, "--workers", "2", "--no-access-log", env=env)
    try:
        for _ in range(60):
            # A new connection each time, so that both workers take some.
            assert httpx.post(url + "/v1/chat/completions", json={"model": "echo"}).status_code == 200
        samples = scrape(url + "/metrics")
        assert value(samples, "gateway_requests_total", route="chat_completions") == 60
        assert value(samples, "gateway_in_flight_requests") == 0
        # One process's figures would pass for the whole's: left out.
        assert "process_resident_memory_bytes" not in samples
        workers = {path.stem.rsplit("_", 1)[1] for path in tmp_path.glob("counter_*.db")}
        assert len(workers) == 2, "one worker took every connection"
    finally:
        stop(process)
    assert process.returncode == 0


def _finished(route: str, status: int, duration: float, stream: bool = False) -> Exchange:
    exchange = Exchange("id", Route(route), "POST", "openai")
    exchange.status = status
    exchange.model = "fake-model"
    exchange.key = "key-1"
    exchange.duration = duration
    exchange.upstream_wait = duration / 2
    exchange.ttfb = duration / 3 if status < 400 else None
    exchange.stream = stream
    exchange.prompt_tokens, exchange.completion_tokens = (5, 3) if status < 400 else (None, None)
    exchange.error = "backend_timeout" if status == 504 else None
    return exchange


def _exposition(metrics: Metrics) -> dict[str, float]:
    """Every sample but the creation times, by name and labels."""
    return {
        name: float(number)
        for name, number in (
            line.rsplit(" ", 1) for line in metrics.render().decode().splitlines() if line[:1] != "#"
        )
        if "_created" not in name
    }


async def test_a_turns_tallies_add_up_to_each_request_observed_alone() -> None:
    """Requests ended in one turn of the loop are folded together: the exposition is what
    observing each on its own gives."""
    rng = random.Random(7)
    exchanges = [
        _finished(
            rng.choice(["chat_completions", "completions"]),
            rng.choice([200, 200, 200, 404, 504]),
            rng.choice([0.00005, 0.0003, 0.004, 0.2, 3.0, 700.0]),
            stream=rng.random() < 0.3,
        )
        for _ in range(300)
    ]
    folded, alone = Metrics(KnownModels(["fake-model"])), Metrics(KnownModels(["fake-model"]))
    for exchange in exchanges:
        folded.started(exchange)
        if exchange.stream:
            folded.stream_opened(exchange)
        folded.finished(exchange)
    # The turn has not ended, so nothing is folded yet: a render folds first, from any thread
    # (the metrics port's is its own).
    rendered: list[bytes] = []
    thread = threading.Thread(target=lambda: rendered.append(folded.render()))
    thread.start()
    thread.join()
    assert folded._pending == []
    ended = sum(1 for e in exchanges if e.route == "completions")
    assert f'gateway_request_duration_seconds_count{{model="fake-model",route="completions"}} {ended}.0' in (
        rendered[0].decode()
    )
    for exchange in exchanges:
        alone.started(exchange)
        if exchange.stream:
            alone.stream_opened(exchange)
        alone.finished(exchange)
        alone.fold()  # one request a fold
    ours, theirs = _exposition(folded), _exposition(alone)
    assert ours.keys() == theirs.keys()
    # Sums are added in another order: equal to the rounding.
    assert all(ours[name] == pytest.approx(theirs[name], rel=1e-12) for name in ours)
    # And each bucket is what prometheus_client's own observe() makes of the same durations.
    registry = CollectorRegistry()
    reference = Histogram("d", "", ["route", "model"], buckets=LATENCY_BUCKETS, registry=registry)
    for exchange in exchanges:
        reference.labels(exchange.route, "fake-model").observe(exchange.duration)
    buckets = {
        (s.labels["route"], s.labels["le"]): s.value
        for s in next(iter(folded.duration.collect())).samples
        if s.name.endswith("_bucket")
    }
    observed = {
        (s.labels["route"], s.labels["le"]): s.value
        for s in next(iter(reference.collect())).samples
        if s.name.endswith("_bucket")
    }
    assert buckets == observed


async def test_the_fold_runs_when_the_turn_ends() -> None:
    metrics = Metrics(KnownModels(["fake-model"]))
    requests = metrics.requests.labels("chat_completions", "POST", "200", "openai", "fake-model", "key-1")
    for _ in range(5):
        metrics.finished(_finished("chat_completions", 200, 0.001))
    assert requests._value.get() == 0
    await asyncio.sleep(0)
    assert requests._value.get() == 5
