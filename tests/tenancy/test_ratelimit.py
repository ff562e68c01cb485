"""Rate limits: the limiter with memory://, through the gateway, with the OpenAI SDK, and
shared by two gateway processes through a real redis-server."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway.core.errors import RateLimited, RateLimitUnavailable
from gateway.tenancy.auth import plain_key_name
from gateway.tenancy.ratelimit import KeyLimits, Limiter, _duration, parse_limits
from tests.conftest import AUTH, Fake, GatewayFactory
from tests.support.fakes import free_port
from tests.support.processes import serve, stop
from tests.support.redis_server import RedisServer


def limiter(storage: str = "memory://", strategy: str = "moving-window", **kwargs: object) -> Limiter:
    registry = CollectorRegistry()
    failures = Counter("failures", "", registry=registry)
    limited = Counter("limited", "", ["key", "limit"], registry=registry)
    options = {"global_limit": None, "fail_closed": False, **kwargs}
    return Limiter(storage, strategy, failures=failures, limited=limited, **options)  # type: ignore[arg-type]


def limits(requests: str | None = None, tokens: str | None = None) -> KeyLimits:
    return KeyLimits(parse_limits(requests), parse_limits(tokens))


# The limiter, with memory://


@pytest.mark.parametrize("strategy", ["moving-window", "fixed-window", "sliding-window-counter"])
async def test_admits_up_to_the_limit(strategy: str) -> None:
    lim = limiter(strategy=strategy)
    per_key = limits("3/minute")
    remaining = []
    for _ in range(3):
        headers = dict(await lim.admit("alice", per_key, "alice"))
        remaining.append(headers[b"x-ratelimit-remaining-requests"])
        assert headers[b"x-ratelimit-limit-requests"] == b"3"
    assert remaining == [b"2", b"1", b"0"]
    with pytest.raises(RateLimited) as caught:
        await lim.admit("alice", per_key, "alice")
    error = caught.value
    assert error.status == 429
    assert error.type == "rate_limit_exceeded"
    assert 1 <= int(error.headers["retry-after"]) <= 60
    assert 0 < int(error.headers["retry-after-ms"]) <= 60_000
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    # Another key has its own count.
    await lim.admit("bob", per_key, "bob")


async def test_every_limit_of_a_key_applies() -> None:
    lim = limiter()
    both = limits("5/minute;2/hour")
    await lim.admit("a", both, "a")
    await lim.admit("a", both, "a")
    with pytest.raises(RateLimited, match="2 per 1 hour"):
        await lim.admit("a", both, "a")


async def test_global_limit_counts_all_keys_together() -> None:
    lim = limiter(global_limit="3/minute")
    for who in ("a", "b", "c"):
        await lim.admit(who, limits(), who)
    with pytest.raises(RateLimited, match="gateway's request limit"):
        await lim.admit("d", limits(), "d")


async def test_token_reservation_refused_when_it_does_not_fit() -> None:
    lim = limiter()
    budget = limits(tokens="1000/minute")
    _, headers = await lim.reserve("k", budget, 600, "k")
    assert dict(headers)[b"x-ratelimit-remaining-tokens"] == b"400"
    with pytest.raises(RateLimited) as caught:
        await lim.reserve("k", budget, 500, "k")
    assert caught.value.code == "tokens"
    assert caught.value.headers["x-ratelimit-remaining-tokens"] == "400"
    # The refused reservation took nothing: 400 still fit.
    await lim.reserve("k", budget, 400, "k")


async def test_settling_gives_back_what_was_not_used() -> None:
    lim = limiter()
    budget = limits(tokens="1000/minute")
    reservation, _ = await lim.reserve("k", budget, 900, "k")
    await lim.settle(reservation, 100)
    second, headers = await lim.reserve("k", budget, 850, "k")
    assert dict(headers)[b"x-ratelimit-remaining-tokens"] == b"50"
    # Using more than reserved charges the difference.
    await lim.settle(second, 900)
    with pytest.raises(RateLimited):
        await lim.reserve("k", budget, 1, "k")


async def test_unknown_usage_keeps_the_reservation() -> None:
    lim = limiter()
    budget = limits(tokens="1000/minute")
    reservation, _ = await lim.reserve("k", budget, 700, "k")
    await lim.settle(reservation, None)
    with pytest.raises(RateLimited):
        await lim.reserve("k", budget, 400, "k")


async def test_a_second_budget_refusing_releases_the_first() -> None:
    lim = limiter()
    budgets = limits(tokens="1000/minute;500/hour")
    with pytest.raises(RateLimited, match="500 per 1 hour"):
        await lim.reserve("k", budgets, 600, "k")
    _, headers = await lim.reserve("k", budgets, 500, "k")
    assert dict(headers)[b"x-ratelimit-remaining-tokens"] == b"0"


async def test_storage_failure_fails_open_or_closed() -> None:
    dead = f"redis://127.0.0.1:{free_port()}"
    open_limiter = limiter(dead)
    assert await open_limiter.admit("k", limits("1/minute"), "k") == []
    assert await open_limiter.admit("k", limits("1/minute"), "k") == []
    assert open_limiter.failures._value.get() == 2
    closed = limiter(dead, fail_closed=True)
    with pytest.raises(RateLimitUnavailable) as caught:
        await closed.admit("k", limits("1/minute"), "k")
    assert caught.value.status == 503


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.02, "20ms"), (1.5, "1.5s"), (59.0, "59s"), (360, "6m0s"), (3723, "1h2m3s")]
)
def test_reset_format(seconds: float, text: str) -> None:
    assert _duration(seconds) == text


# Through the gateway


def test_429_and_headers_through_the_gateway(start_gateway: GatewayFactory, fake: Fake) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], rate_limit="2/minute")
    url = gateway.url + "/v1/chat/completions"
    first = httpx.post(url, json={"model": "fake-model"}, headers=AUTH)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    assert httpx.post(url, json={"model": "fake-model"}, headers=AUTH).status_code == 200
    refused = httpx.post(url, json={"model": "fake-model"}, headers=AUTH)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert int(refused.headers["retry-after-ms"]) > 0
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-request-id"]
    assert len(fake.seen.requests) == 2
    metrics = httpx.get(gateway.url + "/metrics").text
    name = plain_key_name("sk-test-1")
    assert f'gateway_rate_limited_requests_total{{key="{name}",limit="2 per 1 minute"}} 1.0' in metrics


def test_keys_file_limits_per_key(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - name: small\n    key: sk-small\n    rate_limit: 1/minute\n"
                    "  - name: big\n    key: sk-big\n")  # fmt: skip
    gateway = start_gateway(keys_file=keys, rate_limit="3/minute")
    url = gateway.url + "/v1/models"
    assert httpx.get(url, headers={"x-api-key": "sk-small"}).status_code == 200
    assert httpx.get(url, headers={"x-api-key": "sk-small"}).status_code == 429
    for _ in range(3):
        assert httpx.get(url, headers={"x-api-key": "sk-big"}).status_code == 200
    assert httpx.get(url, headers={"x-api-key": "sk-big"}).status_code == 429


def test_sdk_sees_rate_limit_error_then_succeeds_after_the_window(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], rate_limit="2/2second")
    messages = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-test-1", max_retries=0) as impatient:
        impatient.chat.completions.create(model="fake-model", messages=messages)  # type: ignore[arg-type]
        impatient.chat.completions.create(model="fake-model", messages=messages)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as caught:
            impatient.chat.completions.create(model="fake-model", messages=messages)  # type: ignore[arg-type]
        assert caught.value.status_code == 429
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-test-1") as patient:  # default retries
        started = time.monotonic()
        completion = patient.chat.completions.create(model="fake-model", messages=messages)  # type: ignore[arg-type]
        assert completion.choices[0].message.content == "Hello there!"
        assert time.monotonic() - started < 10


def test_token_limit_refuses_before_the_backend_and_refunds(
    start_gateway: GatewayFactory, fake: Fake
) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], token_limit="1500/minute")
    url = gateway.url + "/v1/chat/completions"
    too_big = httpx.post(url, json={"model": "fake-model", "max_tokens": 2000}, headers=AUTH)
    assert too_big.status_code == 429
    assert too_big.json()["error"]["code"] == "tokens"
    assert fake.seen.requests == []
    # Each reserves ~1000 but uses 8 (the fake's usage): without the refund the second would not fit.
    for _ in range(3):
        response = httpx.post(url, json={"model": "fake-model", "max_tokens": 1000}, headers=AUTH)
        assert response.status_code == 200
        assert int(response.headers["x-ratelimit-remaining-tokens"]) < 500
    # A stream settles from its final usage chunk.
    stream = {
        "model": "fake-model",
        "max_tokens": 1000,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert httpx.post(url, json=stream, headers=AUTH).status_code == 200
    assert httpx.post(url, json={"model": "fake-model", "max_tokens": 1000}, headers=AUTH).status_code == 200


# Shared through a real redis-server


def start_process(fake: Fake, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    return serve(
        "--backend-url", fake.url, "--api-key", "sk-shared", "--no-access-log", "--metrics-public", *args
    )


def test_two_gateways_sharing_redis_admit_exactly_the_limit(fake: Fake, redis: RedisServer) -> None:
    args = ("--rate-limit", "25/minute", "--rate-limit-storage", redis.url)
    first, first_url = start_process(fake, *args)
    second, second_url = start_process(fake, *args)
    try:
        urls = [first_url, second_url] * 40

        def call(url: str) -> int:
            response = httpx.post(
                url + "/v1/chat/completions", json={"model": "fake-model"}, headers={"x-api-key": "sk-shared"}
            )
            return response.status_code

        with ThreadPoolExecutor(max_workers=16) as pool:
            statuses = list(pool.map(call, urls))
        assert statuses.count(200) == 25
        assert statuses.count(429) == 55
    finally:
        stop(first)
        stop(second)


@pytest.mark.parametrize("fail_closed", [False, True])
def test_redis_stopping_mid_run(fake: Fake, redis: RedisServer, fail_closed: bool) -> None:
    args = ["--rate-limit", "1000/minute", "--rate-limit-storage", redis.url]
    if fail_closed:
        args.append("--rate-limit-fail-closed")
    process, url = start_process(fake, *args)
    try:
        headers = {"x-api-key": "sk-shared"}
        assert (
            httpx.post(url + "/v1/chat/completions", json={"model": "m"}, headers=headers).status_code == 200
        )
        redis.stop()
        for _ in range(3):
            response = httpx.post(
                url + "/v1/chat/completions", json={"model": "m"}, headers=headers, timeout=10
            )
            if fail_closed:
                assert response.status_code == 503
                assert response.json()["error"]["type"] == "rate_limit_unavailable"
            else:
                assert response.status_code == 200
        metrics = httpx.get(url + "/metrics").text
        assert "gateway_rate_limit_storage_errors_total 3.0" in metrics
    finally:
        stderr = stop(process)
    assert "rate-limit storage failed" in stderr


async def test_memory_moving_window_is_exact_and_forgets_idle_keys() -> None:
    from gateway.tenancy.ratelimit import MemoryStorage

    storage = MemoryStorage()
    assert [await storage.acquire_entry("k", 3, 1) for _ in range(4)] == [True, True, True, False]
    start, count = await storage.get_moving_window("k", 3, 1)
    assert count == 3
    assert start <= time.time()
    await asyncio.sleep(1.05)
    assert await storage.acquire_entry("k", 3, 1)  # the window moved on
    assert await storage.acquire_entry("gone", 1, 1)
    await asyncio.sleep(1.05)
    storage._sweep(time.time())
    assert "gone" not in storage.windows
    assert not await storage.acquire_entry("big", 2, 1, amount=3)


def test_window_keeps_hits_in_order_as_it_grows_and_empties() -> None:
    from gateway.tenancy.ratelimit import Window

    rng = random.Random(8)
    window, reference = Window(), []
    now = 0.0
    for _ in range(20_000):
        now += rng.random()
        if rng.random() < 0.55:
            amount = rng.choice((1, 1, 1, 3, 40))
            window.add(now, amount)
            reference += [now] * amount
        else:
            cutoff = now - rng.uniform(0, 60)
            window.trim(cutoff)
            reference = [t for t in reference if t > cutoff]
        assert len(window) == len(reference)
        if reference:
            assert (window.oldest(), window.newest()) == (reference[0], reference[-1])
    assert max(len(block) for block in window.blocks) <= Window.LARGEST
    window.trim(now)
    assert len(window) == 0
    assert not window.blocks  # a burst's memory is given back
    window.add(now + 1)
    assert window.oldest() == window.newest() == now + 1
