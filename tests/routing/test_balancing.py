"""Balancing by the runtimes' own load reports (strategy: queue) and by affinity, against
simulated continuous-batching runtimes and fake runtimes on real sockets."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import ADAPTERS
from bench.simulator import Runtime as Simulator
from bench.simulator import Settings as SimulatorSettings
from gateway.config.backends import parse_backends
from gateway.config.settings import Settings
from gateway.core.jsonbody import JsonBody
from gateway.fleet.loads import read_load
from gateway.fleet.replicas import Group, Load, Replica
from gateway.fleet.upstream import Upstream
from gateway.routing import affinity
from gateway.routing.affinity import affinity_pick, rendezvous_order, replica_seed
from gateway.routing.balancers import STALE_PENALTY, queue_score, saturated
from gateway.routing.router import Router
from tests.conftest import AUTH, Gateway, Runtime, replicas
from tests.support.fakes import LoopThread, wait_until

CHAT = "/v1/chat/completions"
ROOT = Path(__file__).resolve().parents[2]

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{reason="capacity"} 99.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 12.0
vllm:time_to_first_token_seconds_count{model_name="m"} 12.0
vllm:time_to_first_token_seconds_sum{model_name="m"} 1.5
"""


# Reading the runtimes' metrics


def test_vllm_load_is_read_from_its_page_and_other_metrics_are_ignored() -> None:
    signals = ADAPTERS["vllm"].load_signals
    assert signals is not None
    assert read_load(VLLM_PAGE, signals) == Load(waiting=7.0, running=3.0, kv_use=0.42)


def test_the_old_vllm_cache_metric_is_read_when_the_new_one_is_absent() -> None:
    signals = ADAPTERS["vllm"].load_signals
    assert signals is not None
    page = VLLM_PAGE.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    assert read_load(page, signals) == Load(7.0, 3.0, 0.42)
    both = page + 'vllm:kv_cache_usage_perc{model_name="m"} 0.9\n'
    assert read_load(both, signals) == Load(7.0, 3.0, 0.9)  # the current name wins


@pytest.mark.parametrize(
    ("kind", "page", "expected"),
    [
        (
            "sglang",
            "# TYPE sglang:num_queue_reqs gauge\n"
            'sglang:num_queue_reqs{model_name="m"} 4\n'
            'sglang:num_running_reqs{model_name="m"} 16\n'
            'sglang:token_usage{model_name="m"} 0.85\n'
            'sglang:gen_throughput{model_name="m"} 1234.5\n',
            Load(4, 16, 0.85),
        ),
        (
            "tgi",
            "# TYPE tgi_queue_size gauge\ntgi_queue_size 2\ntgi_batch_current_size 5\n"
            "tgi_batch_current_max_tokens 4096\n",
            Load(2, 5, 0.0),
        ),
        (
            "llamacpp",
            "# HELP llamacpp:requests_processing Number of requests processing.\n"
            "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\n"
            "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 3\n"
            "llamacpp:prompt_tokens_total 999\n",
            Load(3, 1, 0.0),
        ),
    ],
)
def test_each_runtimes_own_names_are_read(kind: str, page: str, expected: Load) -> None:
    signals = ADAPTERS[kind].load_signals
    assert signals is not None
    assert read_load(page, signals) == expected


def test_several_engines_are_summed_and_the_fullest_cache_counts() -> None:
    signals = ADAPTERS["vllm"].load_signals
    assert signals is not None
    page = (
        'vllm:num_requests_waiting{engine="0"} 2\nvllm:num_requests_waiting{engine="1"} 5\n'
        'vllm:num_requests_running{engine="0"} 1\nvllm:num_requests_running{engine="1"} NaN\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.3\nvllm:kv_cache_usage_perc{engine="1"} 0.6\n'
    )
    assert read_load(page, signals) == Load(7, 1, 0.6)


def test_a_page_without_the_names_has_no_load_and_a_broken_line_is_an_error() -> None:
    signals = ADAPTERS["vllm"].load_signals
    assert signals is not None
    renamed = VLLM_PAGE.replace("num_requests_", "requests_")
    assert read_load(renamed, signals) is None
    assert read_load("", signals) is None
    with pytest.raises(ValueError, match=r"."):
        read_load('vllm:num_requests_waiting{model_name="m} 1\n', signals)


def test_runtimes_without_load_metrics_have_no_signals() -> None:
    for kind in ("ollama", "localai", "openai", "llamacpp-python"):
        assert ADAPTERS[kind].load_signals is None


# Scores


def _replica(url: str = "http://r:1", weight: float = 1.0) -> Replica:
    upstream = Upstream(Settings(backend_url="http://r:1"), url)
    return Replica(url, upstream, weight, seed=replica_seed(url))


def test_the_score_is_the_report_plus_this_gateways_change_since() -> None:
    replica = _replica()
    replica.reported, replica.scraped_at, replica.in_flight_at_scrape = Load(4, 2, 0.5), 100.0, 2
    replica.in_flight = 5  # three more sent since the scrape
    assert queue_score(replica, 100.5, 1.0, 1.0) == pytest.approx(4 + 2 + 3 + 1 + 4 * 0.5)
    replica.in_flight = 0  # two finished: the runtime's own count drops with them
    assert queue_score(replica, 100.5, 1.0, 1.0) == pytest.approx(4 + 2 - 2 + 1 + 2)
    assert queue_score(replica, 100.5, 1.0, 2.0) == pytest.approx((4 + 2 - 2 + 1 + 2) / 2)


def test_a_stale_report_leaves_the_in_flight_count_and_a_penalty() -> None:
    replica = _replica()
    replica.reported, replica.scraped_at, replica.in_flight = Load(50, 8, 0.99), 100.0, 2
    assert saturated(replica, 101.0, 1.0)
    assert not saturated(replica, 104.0, 1.0)  # three intervals on: stale, not saturated
    assert queue_score(replica, 104.0, 1.0, 1.0) == pytest.approx(2 + 1 + STALE_PENALTY)
    never = _replica()
    assert queue_score(never, 0.0, 1.0, 1.0) == pytest.approx(1 + STALE_PENALTY)


def test_a_long_queue_or_a_full_cache_saturates() -> None:
    replica = _replica()
    replica.scraped_at, replica.batch_seen = 10.0, 8
    for load, expected in [(Load(4, 8, 0.5), False), (Load(5, 8, 0.5), True), (Load(0, 1, 0.8), True)]:
        replica.reported = load
        assert saturated(replica, 10.0, 1.0) is expected


def test_requests_sent_since_the_report_fill_the_batch_then_the_queue() -> None:
    replica = _replica()
    replica.scraped_at, replica.batch_seen = 10.0, 8
    replica.reported, replica.in_flight_at_scrape = Load(0, 2, 0.1), 2
    replica.in_flight = 2 + 10  # six fill the batch, four wait
    assert not saturated(replica, 10.0, 1.0)
    replica.in_flight += 1  # five wait
    assert saturated(replica, 10.0, 1.0)
    replica.reported, replica.in_flight_at_scrape, replica.in_flight = Load(6, 8, 0.1), 5, 2
    assert not saturated(replica, 10.0, 1.0)  # three of this gateway's finished: three wait


# Affinity keys


def _turns(first: str, replies: int) -> dict[str, Any]:
    messages = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": first}]
    for turn in range(replies):
        messages += [
            {"role": "assistant", "content": f"answer {turn} " * 50},
            {"role": "user", "content": f"question {turn}"},
        ]
    return {"model": "m", "messages": messages}


def test_every_turn_of_a_conversation_has_the_same_key() -> None:
    keys = {affinity_key([], _turns("Summarise this report: " + "figures " * 300, n)) for n in range(6)}
    assert len(keys) == 1
    other = affinity_key([], _turns("Translate this letter: " + "words " * 300, 0))
    assert other not in keys


def test_the_session_header_then_prompt_cache_key_then_user_make_the_key() -> None:
    body = {**_turns("hello", 0), "user": "u-1", "prompt_cache_key": "k-1"}
    header = [(b"x-session-id", b"abc")]
    assert affinity_key(header, body) == affinity_key(header, {})
    assert affinity_key([], body) == affinity_key([], {"prompt_cache_key": "k-1"})
    assert affinity_key([], {"user": "u-1", "messages": []}) == affinity_key([], {"user": "u-1"})
    # The same text in different places is a different key.
    assert affinity_key([], {"user": "abc"}) != affinity_key(header, {})
    assert affinity_key([], {"prompt": ""}) is None
    assert affinity_key([], None) is None


def test_prompts_are_cut_to_whole_blocks_of_their_first_bytes() -> None:
    assert leading_bytes({"prompt": "short"}) == b"short"
    assert len(leading_bytes({"prompt": "x" * 1000})) == 768
    assert len(leading_bytes({"prompt": "x" * 100_000})) == 4096
    # Prompts sharing their first 4 KiB meet, whatever follows.
    shared = "the same long preamble " * 200
    assert affinity_key([], {"prompt": shared + "A"}) == affinity_key([], {"prompt": shared + "B"})
    assert leading_bytes({"prompt": [1, 2, 3]}) == b"[1,2,3]"
    assert leading_bytes({"prompt": ["first", "second"]}) == b"first"
    assert leading_bytes({"input": "a responses prompt"}) == b"a responses prompt"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image"}]}]}
    assert leading_bytes(parts) == orjson.dumps(parts["messages"][0])
    assert leading_bytes({"messages": ["not a message"]}) == b""


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.lists(st.text(max_size=40), max_size=5))
def test_any_request_gives_a_key_or_none_and_never_raises(session: bytes, texts: list[str]) -> None:
    messages = [{"role": "user", "content": text} for text in texts]
    key = affinity_key([(b"x-session-id", session)], {"messages": messages, "prompt": texts})
    assert key is None or 0 <= key < 2**64


def affinity_key(headers: list[tuple[bytes, bytes]], body: dict[str, Any] | None) -> int | None:
    return affinity.affinity_key(headers, None if body is None else JsonBody(orjson.dumps(body)))


def leading_bytes(body: dict[str, Any]) -> bytes:
    return affinity.leading_bytes(JsonBody(orjson.dumps(body)))


def test_keys_are_the_same_in_another_process_with_another_hash_seed() -> None:
    code = (
        "from gateway.routing.affinity import affinity_key, replica_seed\n"
        "from gateway.core.jsonbody import JsonBody\n"
        "print(affinity_key([(b'x-session-id', b's1')], None), replica_seed('http://a:1'),"
        ' affinity_key([], JsonBody(b\'{"messages":[{"role":"user","content":"hello"}]}\')))\n'
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    here = affinity_key([(b"x-session-id", b"s1")], None)
    other = affinity_key([], {"messages": [{"role": "user", "content": "hello"}]})
    assert runs == {f"{here} {replica_seed('http://a:1')} {other}\n"}


# Rendezvous with bounded load


def _pairs(count: int, weights: list[float] | None = None) -> list[tuple[Group, Replica]]:
    group: Any = None  # the strategy functions only look at replicas
    return [(group, _replica(f"http://10.0.0.{i}:8000", (weights or [1.0] * count)[i])) for i in range(count)]


def test_keys_spread_evenly_and_by_weight() -> None:
    pairs = _pairs(4)
    counts = {pair[1].url: 0 for pair in pairs}
    for key in range(8000):
        counts[affinity_pick(pairs, key * 0x9E3779B1, 0.25)[1].url] += 1
    assert all(1700 < count < 2300 for count in counts.values()), counts
    weighted = _pairs(2, [3.0, 1.0])
    first = sum(affinity_pick(weighted, key * 7919, 0.25)[1] is weighted[0][1] for key in range(4000))
    assert 2800 < first < 3200


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(2, 8), st.data())
def test_removing_a_replica_moves_only_the_keys_it_had(key: int, count: int, data: st.DataObject) -> None:
    pairs = _pairs(count)
    before = rendezvous_order(pairs, key)
    gone = data.draw(st.sampled_from(pairs))
    after = rendezvous_order([pair for pair in pairs if pair is not gone], key)
    assert [pair for pair in before if pair is not gone] == after


def test_a_replica_past_the_bound_passes_the_request_to_the_keys_next() -> None:
    pairs = _pairs(4)
    key = 12345
    order = rendezvous_order(pairs, key)
    first, second = order[0][1], order[1][1]
    assert affinity_pick(pairs, key, 0.25)[1] is first
    first.in_flight = 3  # bound: ceil(1.25 * 4 / 4) = 2
    assert affinity_pick(pairs, key, 0.25)[1] is second
    for pair in pairs:
        pair[1].in_flight = 3  # all equal: within the bound again
    assert affinity_pick(pairs, key, 0.25)[1] is first


# The backends file


def test_strategy_and_its_settings_are_checked_per_backend() -> None:
    [backend] = parse_backends(
        [{"name": "v", "kind": "vllm", "url": "http://a:1", "strategy": "queue", "scrape_interval": 0.5}], "f"
    )
    assert (backend.strategy, backend.scrape_interval, backend.affinity_spread) == ("queue", 0.5, 0.25)
    with pytest.raises(ValueError, match=r"backends\[0\] \(v\): strategy: Input should be"):
        parse_backends([{"name": "v", "url": "http://a:1", "strategy": "fastest"}], "f")
    with pytest.raises(ValueError, match="scrape_interval"):
        parse_backends([{"name": "v", "url": "http://a:1", "scrape_interval": 0}], "f")


def test_balance_sets_the_strategy_of_backends_without_one_and_queue_needs_load_metrics() -> None:
    configs = parse_backends(
        [
            {"name": "v", "kind": "vllm", "url": "http://a:1"},
            {"name": "o", "kind": "ollama", "url": "http://b:1", "strategy": "queue"},
            {"name": "t", "kind": "tgi", "url": "http://c:1", "strategy": "round-robin"},
        ],
        "f",
    )
    router = Router.from_settings(Settings(backends=configs, balance="queue"))
    strategies = {group.name: (group.strategy, group.scraped) for group in router.groups}
    # Ollama has no load metrics: queue balances it by in-flight counts, with no scrapes.
    assert strategies == {"v": ("queue", True), "o": ("queue", False), "t": ("round-robin", False)}
    assert [backend["strategy"] for backend in router.describe()] == ["queue", "queue", "round-robin"]


# Through the gateway, on real sockets


@pytest.fixture
def simulators(loop_thread: LoopThread) -> Iterator[Callable[..., tuple[Simulator, str]]]:
    runners: list[web.AppRunner] = []

    def start(**overrides: Any) -> tuple[Simulator, str]:
        simulator = Simulator(SimulatorSettings(**overrides))

        async def serve() -> tuple[web.AppRunner, int]:
            runner = web.AppRunner(simulator.app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        runner, port = loop_thread.run(serve())
        runners.append(runner)
        return simulator, f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        loop_thread.run(runner.cleanup())


def _queue_gateway(fleet_gateway: Callable[..., Gateway], urls: list[str], **overrides: Any) -> Gateway:
    """A gateway balancing vLLM-like replicas by their queues, read ten times a second."""
    backend = {"name": "r", "kind": "vllm", "urls": urls, "strategy": "queue", "scrape_interval": 0.1}
    return fleet_gateway([backend], **overrides)


def _sim_chat(url: str, max_tokens: int, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    return httpx.post(url + CHAT, json=body, headers=headers or {}, timeout=60)


def test_queue_sends_around_load_the_gateway_cannot_see(
    simulators: Callable[..., tuple[Simulator, str]], fleet_gateway: Callable[..., Gateway]
) -> None:
    _, busy_url = simulators(max_batch=2, decode_ms=10)
    idle, idle_url = simulators(max_batch=2, decode_ms=10)
    gateway = _queue_gateway(fleet_gateway, [busy_url, idle_url])
    # Another client keeps the first replica's queue long, straight to it.
    stop = threading.Event()

    def other_client() -> None:
        while not stop.is_set():
            _sim_chat(busy_url, 20)

    others = [threading.Thread(target=other_client) for _ in range(8)]
    for thread in others:
        thread.start()
    try:
        wait_until(lambda: (replicas(gateway)[busy_url]["reported"] or {}).get("waiting", 0) >= 4, timeout=10)
        for _ in range(20):
            assert _sim_chat(gateway.url, 2, AUTH).status_code == 200
    finally:
        stop.set()
        for thread in others:
            thread.join()
    assert idle.engine.submitted >= 18, idle.engine.submitted  # only the gateway sends to it
    described = replicas(gateway)
    assert described[idle_url]["last_scrape"] == "ok"
    assert described[idle_url]["reported_age_s"] < 1.0
    assert described[busy_url]["batch_seen"] == 2  # its max_batch, full while others queued


def test_a_replica_whose_metrics_route_hangs_still_gets_traffic_and_scrapes_never_pile_up(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    hung, hung_url = runtimes("hung", delay=0.05)
    hung.metrics_delay = 3600
    fine, fine_url = runtimes("fine", delay=0.05)
    fine.metrics_text = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n"
    gateway = _queue_gateway(fleet_gateway, [hung_url, fine_url])
    wait_until(lambda: replicas(gateway)[hung_url]["last_scrape"] == "failed: ReadTimeout", timeout=10)
    time.sleep(0.5)  # several intervals: each scrape times out before the next starts

    def client() -> None:
        for _ in range(10):
            answer = httpx.post(gateway.url + CHAT, json={"model": "m"}, headers=AUTH, timeout=30)
            assert answer.status_code == 200

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Demoted, not dropped: under load it takes its share by in-flight counts.
    assert hung.count(CHAT) + fine.count(CHAT) == 80
    assert hung.count(CHAT) >= 10, (hung.count(CHAT), fine.count(CHAT))
    assert hung.metrics_open_most == 1
    described = replicas(gateway)
    assert described[hung_url]["reported"] is None
    assert described[fine_url]["last_scrape"] == "ok"


def test_a_renamed_metric_is_reported_and_balancing_goes_on_by_in_flight_counts(
    runtimes: Callable[..., Runtime],
    fleet_gateway: Callable[..., Gateway],
    caplog: pytest.LogCaptureFixture,
) -> None:
    one, url1 = runtimes("one")
    two, url2 = runtimes("two")
    for runtime in (one, two):
        runtime.metrics_text = "vllm:requests_waiting_renamed 3\n"
    gateway = _queue_gateway(fleet_gateway, [url1, url2])
    wait_until(lambda: replicas(gateway)[url1]["last_scrape"] == "no load metrics", timeout=10)
    for _ in range(20):
        assert (
            httpx.post(gateway.url + CHAT, json={"model": "m"}, headers=AUTH, timeout=30).status_code == 200
        )
    assert one.count(CHAT) >= 3
    assert two.count(CHAT) >= 3
    assert "its metrics have none of vllm:gpu_cache_usage_perc" in caplog.text


def test_a_metrics_page_past_the_read_limit_is_not_read_and_its_connection_not_kept(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    big, big_url = runtimes("big")
    big.metrics_text = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n" + "# padding\n" * 2000
    small, small_url = runtimes("small")
    gateway = _queue_gateway(fleet_gateway, [big_url, small_url], backend_max_read_bytes=4096)
    wait_until(lambda: replicas(gateway)[big_url]["last_scrape"] == "failed: TooLarge", timeout=10)
    assert replicas(gateway)[big_url]["reported"] is None
    wait_until(lambda: len(big.metrics_peers) >= 3, timeout=10)
    assert len(set(big.metrics_peers)) == len(big.metrics_peers)  # each on a new connection
    for _ in range(10):
        assert (
            httpx.post(gateway.url + CHAT, json={"model": "m"}, headers=AUTH, timeout=30).status_code == 200
        )
    assert big.count(CHAT) + small.count(CHAT) == 10


def test_a_saturated_replica_is_avoided_while_another_is_not(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    full, full_url = runtimes("full")
    full.metrics_text = (
        "vllm:num_requests_waiting 0\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.95\n"
    )
    light, light_url = runtimes("light")
    light.metrics_text = (
        "vllm:num_requests_waiting 3\nvllm:num_requests_running 8\nvllm:kv_cache_usage_perc 0.2\n"
    )
    gateway = _queue_gateway(fleet_gateway, [full_url, light_url])
    wait_until(lambda: all(r["last_scrape"] == "ok" for r in replicas(gateway).values()), timeout=10)
    for _ in range(20):
        assert (
            httpx.post(gateway.url + CHAT, json={"model": "m"}, headers=AUTH, timeout=30).status_code == 200
        )
    assert (full.count(CHAT), light.count(CHAT)) == (0, 20)
    metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert (
        f'gateway_replica_reported_requests{{backend="r",replica="{light_url}",state="waiting"}} 3.0'
        in metrics
    )
    assert f'gateway_replica_report_age_seconds{{backend="r",replica="{full_url}"}}' in metrics
    light.metrics_text = "vllm:num_requests_waiting 9\nvllm:num_requests_running 8\n"  # both saturated now
    time.sleep(0.5)
    for _ in range(40):
        assert (
            httpx.post(gateway.url + CHAT, json={"model": "m"}, headers=AUTH, timeout=30).status_code == 200
        )
    assert full.count(CHAT) >= 5  # when all are, the scores decide among all


def test_a_session_keeps_to_one_replica_and_two_gateways_agree(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    started = [runtimes(f"r{i}") for i in range(4)]
    backends = [{"name": "r", "urls": [url for _, url in started], "strategy": "affinity"}]
    first, second = fleet_gateway(backends), fleet_gateway(backends)
    where: dict[str, set[str]] = {}
    for session in range(24):
        for gateway in (first, second, first):
            answer = httpx.post(
                gateway.url + CHAT,
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                headers={**AUTH, "x-session-id": f"session-{session}"},
                timeout=30,
            )
            where.setdefault(f"session-{session}", set()).add(answer.json()["backend"])
    assert all(len(names) == 1 for names in where.values()), where
    assert len({name for names in where.values() for name in names}) >= 3  # sessions spread
    # Without a session header, the conversation's first turn keys it.
    body = _turns("Plan a trip to Lisbon", 0)
    names = set()
    for turns in range(4):
        body = _turns("Plan a trip to Lisbon", turns)
        names.add(httpx.post(first.url + CHAT, json=body, headers=AUTH, timeout=30).json()["backend"])
        names.add(httpx.post(second.url + CHAT, json=body, headers=AUTH, timeout=30).json()["backend"])
    assert len(names) == 1


def test_a_hot_session_spills_over_within_the_bound(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway]
) -> None:
    # Each answer takes 1.5 s, so that all twelve are in flight together even on a loaded
    # machine; one client for every thread, so that none waits on making its own.
    started = [runtimes(f"r{i}", delay=1.5) for i in range(4)]
    gateway = fleet_gateway([{"name": "r", "urls": [url for _, url in started], "strategy": "affinity"}])
    answers: list[str] = []
    shared = httpx.Client(headers={**AUTH, "x-session-id": "hot"}, timeout=30, limits=httpx.Limits())

    def client() -> None:
        answers.append(shared.post(gateway.url + CHAT, json={"model": "m"}).json()["backend"])

    threads = [threading.Thread(target=client) for _ in range(12)]
    with shared:
        for thread in threads:
            thread.start()
            time.sleep(0.01)
        for thread in threads:
            thread.join()
    counts = {name: answers.count(name) for name in set(answers)}
    assert len(answers) == 12
    # Twelve at once over four replicas: none above ceil(1.25 x the mean) = 4.
    assert max(counts.values()) <= 4, counts
