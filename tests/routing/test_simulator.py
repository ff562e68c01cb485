"""The simulated continuous-batching runtime the balancing workloads run against: its queue,
batch, prefix cache and vLLM-named metrics, through real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bench.simulator import Runtime, Settings

PROMPT = " ".join(f"w{i}" for i in range(64))  # four blocks of 16 words


@pytest.fixture
async def runtime() -> AsyncIterator[tuple[Runtime, str]]:
    sim = Runtime(Settings(max_batch=2, decode_ms=5, prefill_ms_per_token=0.01, block_tokens=16))
    runner = web.AppRunner(sim.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield sim, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _complete(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> dict[str, Any]:
    async with session.post(url + "/v1/completions", json=body) as response:
        answer: dict[str, Any] = await response.json()
        return answer


async def test_a_stream_sends_a_chunk_a_token(runtime: tuple[Runtime, str]) -> None:
    _, url = runtime
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json=body) as response,
    ):
        text = await response.text()
    assert text.count("data: ") == 7  # five tokens, the finish, [DONE]
    assert text.endswith("data: [DONE]\n\n")


async def test_requests_past_the_batch_wait_and_the_metrics_say_so(runtime: tuple[Runtime, str]) -> None:
    sim, url = runtime
    body = {"model": "sim", "prompt": "x", "max_tokens": 100}
    async with aiohttp.ClientSession() as session:
        calls = [asyncio.ensure_future(_complete(session, url, body)) for _ in range(5)]
        while (len(sim.engine.running), len(sim.engine.waiting)) != (2, 3):  # noqa: ASYNC110 - the engine's state
            await asyncio.sleep(0.005)
        seen = await metrics(session, url)
        assert seen["vllm:num_requests_running"] == 2
        assert seen["vllm:num_requests_waiting"] == 3
        assert 0 < seen["vllm:kv_cache_usage_perc"] <= 1
        answers = [await call for call in calls]
    assert all(answer["usage"]["completion_tokens"] == 100 for answer in answers)
    assert sim.engine.running == []
    assert not sim.engine.waiting


async def test_a_shared_prefix_hits_the_cache(runtime: tuple[Runtime, str]) -> None:
    sim, url = runtime
    async with aiohttp.ClientSession() as session:
        for prompt in (PROMPT, PROMPT + " more words here", "something else entirely " * 11):
            body = {"model": "sim", "prompt": prompt, "max_tokens": 1}
            async with session.post(url + "/v1/completions", json=body) as response:
                assert response.status == 200
        seen = await metrics(session, url)
    # 4 blocks missed, then the same 4 hit (the extra words fill no block), then 2 missed.
    assert seen["vllm:prefix_cache_queries_total"] == 10
    assert seen["vllm:prefix_cache_hits_total"] == 4
    assert sim.engine.steps == 3
