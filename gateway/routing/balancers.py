"""One balancer per strategy: which of the replicas a request may go to takes it.

Each is given the (backend, replica) pairs that are available, two at least, and the
request's key where its strategy reads one (``key``):

- ``least-outstanding``: the less loaded of two replicas drawn by weight (requests in
  flight per unit of weight, streams counted until they end, cut while a replica ramps up
  after coming back); the power of two choices, which every gateway process can make
  alone without herding onto one replica;
- ``round-robin``: smooth weighted round robin (nginx's): even spacing, exact shares;
- ``queue``: the runtimes' own queues (``gateway.fleet.loads``): a replica's score is what it
  reported (requests waiting and running) plus the change in this gateway's requests to
  it since, plus a penalty for KV-cache use, or its in-flight count and a penalty when
  its report is stale. Two are drawn among those not saturated (a queue of
  ``SATURATED_QUEUE`` or KV use of ``SATURATED_KV``, llm-d's thresholds) and the lower
  score wins: the global minimum would send every gateway process, each with its own
  slightly stale view, to the same replica at once;
- ``affinity``: by the request's key (``gateway.routing.affinity``); a request without one is
  balanced by least outstanding requests.
"""

from __future__ import annotations

import random
import time

from gateway.config.backends import Strategy
from gateway.core.jsonbody import JsonBody
from gateway.fleet.loads import fresh
from gateway.fleet.replicas import Group, Replica
from gateway.routing.affinity import affinity_key, affinity_pick

Pair = tuple[Group, Replica]

KV_PENALTY = 4.0
"""A full KV cache counts as this many more requests: the runtime is about to preempt."""
SATURATED_QUEUE = 5.0
SATURATED_KV = 0.8
STALE_PENALTY = 1.0
"""What a replica without a fresh report is assumed to carry beyond this gateway's requests."""


class Balancer:
    """Picks one of two or more available replicas."""

    strategy: Strategy

    def key(self, headers: list[tuple[bytes, bytes]], body: JsonBody | None) -> int | None:
        """What of the request the strategy goes by; most go by none."""
        return None

    def pick(self, pairs: list[Pair], key: int | None) -> Pair:
        raise NotImplementedError


class LeastOutstanding(Balancer):
    strategy = Strategy.LEAST_OUTSTANDING

    def __init__(self, slow_start: float) -> None:
        self.slow_start = slow_start

    def pick(self, pairs: list[Pair], key: int | None) -> Pair:
        a, b = draw_two(pairs)
        now = time.monotonic()
        slow_start = self.slow_start
        return a if a[1].load(now, slow_start) <= b[1].load(now, slow_start) else b


class RoundRobin(Balancer):
    strategy = Strategy.ROUND_ROBIN

    def pick(self, pairs: list[Pair], key: int | None) -> Pair:
        total = 0.0
        chosen = pairs[0]
        for pair in pairs:
            replica = pair[1]
            replica.current += replica.weight
            total += replica.weight
            if replica.current > chosen[1].current:
                chosen = pair
        chosen[1].current -= total
        return chosen


class Queue(Balancer):
    strategy = Strategy.QUEUE

    def __init__(self, slow_start: float) -> None:
        self.slow_start = slow_start

    def pick(self, pairs: list[Pair], key: int | None) -> Pair:
        """The lower score of two replicas drawn among those not saturated (among all when
        every one is)."""
        now = time.monotonic()
        interval = pairs[0][0].scrape_interval
        candidates = [pair for pair in pairs if not saturated(pair[1], now, interval)]
        if not candidates:
            candidates = pairs
        elif len(candidates) == 1:
            return candidates[0]
        a, b = draw_two(candidates)
        slow_start = self.slow_start
        score_a = queue_score(a[1], now, interval, a[1].share(now, slow_start))
        score_b = queue_score(b[1], now, interval, b[1].share(now, slow_start))
        return a if score_a <= score_b else b


class Affinity(Balancer):
    strategy = Strategy.AFFINITY

    def __init__(self, slow_start: float) -> None:
        self.fallback = LeastOutstanding(slow_start)

    def key(self, headers: list[tuple[bytes, bytes]], body: JsonBody | None) -> int | None:
        return affinity_key(headers, body)

    def pick(self, pairs: list[Pair], key: int | None) -> Pair:
        if key is None:
            return self.fallback.pick(pairs, None)
        return affinity_pick(pairs, key, pairs[0][0].affinity_spread)


def balancers(slow_start: float) -> dict[Strategy, Balancer]:
    """A balancer for each strategy, as one router uses them."""
    return {
        Strategy.LEAST_OUTSTANDING: LeastOutstanding(slow_start),
        Strategy.ROUND_ROBIN: RoundRobin(),
        Strategy.QUEUE: Queue(slow_start),
        Strategy.AFFINITY: Affinity(slow_start),
    }


def draw_two(pairs: list[Pair]) -> tuple[Pair, Pair]:
    """Two distinct replicas, drawn by weight."""
    count = len(pairs)
    weight = pairs[0][1].weight
    if all(pair[1].weight == weight for pair in pairs):
        first = random.randrange(count)
        second = random.randrange(count - 1)
        second += second >= first
    else:
        weights = [pair[1].weight for pair in pairs]
        first = random.choices(range(count), weights)[0]
        weights[first] = 0.0
        second = random.choices(range(count), weights)[0]
    return pairs[first], pairs[second]


def saturated(replica: Replica, now: float, interval: float) -> bool:
    """Whether its queue or its KV use is past the threshold. The queue is estimated: what it
    reported, and this gateway's requests since, beyond the largest batch it has reported
    running. Counting what was sent since keeps a replica that reported an empty queue from
    taking every request until the next scrape."""
    load = fresh(replica, now, interval)
    if load is None:
        return False
    since = replica.in_flight - replica.in_flight_at_scrape
    queued = load.waiting + load.running + since - max(replica.batch_seen, load.running)
    return queued >= SATURATED_QUEUE or load.kv_use >= SATURATED_KV


def queue_score(replica: Replica, now: float, interval: float, share: float) -> float:
    """How loaded the replica is, per unit of weight: lower takes the request."""
    load = fresh(replica, now, interval)
    in_flight = replica.in_flight
    if load is None:
        return (in_flight + 1 + STALE_PENALTY) / share
    since = in_flight - replica.in_flight_at_scrape
    outstanding = max(load.waiting + load.running + since, in_flight)
    return (outstanding + 1 + KV_PENALTY * load.kv_use) / share
