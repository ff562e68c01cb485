"""Balancing by what the runtimes report, and by affinity, with no state shared between gateways.

Two of a backend's strategies (``strategy:`` in the backends file, else ``--balance``) live
here; ``gateway.routing`` calls them with the replicas a request may go to.

``queue``: every replica's own Prometheus metrics (``Adapter.load_signals``) are read
(``scrape``; ``Router.run_scrapes`` schedules the reads) about every ``scrape_interval``
seconds, jittered so that replicas and gateway processes do not scrape in step; a scrape
still running when the next is due is left to finish or time out, never doubled. A
replica's score is what it reported (requests waiting and running) plus the change in
this gateway's own requests to it since that report, plus a penalty for KV-cache use. Two
replicas are drawn and the lower score wins: the global minimum would send every gateway
process, each with its own slightly stale view, to the same replica at once.
A replica whose report is older than ``STALE_SCRAPES`` intervals (its metrics route slow,
down, or renamed) is scored by this gateway's in-flight count alone, plus a penalty. One
whose queue (as reported, changed by what this gateway sent since) reaches ``SATURATED_QUEUE``,
or whose KV use reaches ``SATURATED_KV`` (llm-d's thresholds), is avoided while any other
is not.

``affinity``: a key from the request (``x-session-id``, else the ``prompt_cache_key`` or
``user`` field, else the prompt's leading bytes) orders the replicas by rendezvous hashing,
the same order in every gateway process; the first replica whose requests in flight stay
within (1 + ``affinity_spread``) times the mean takes the request, so that a hot key spills
over to its next replicas rather than swamping one. A request without a key is balanced by
least outstanding requests.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from adapters.base import LoadSignals
from gateway.replicas import Group, Load, Replica
from gateway.upstream import UPSTREAM_ERRORS

KV_PENALTY = 4.0
"""A full KV cache counts as this many more requests: the runtime is about to preempt."""
SATURATED_QUEUE = 5.0
SATURATED_KV = 0.8
STALE_SCRAPES = 3.0
"""A report older than this many scrape intervals is stale."""
STALE_PENALTY = 1.0
"""What a replica without a fresh report is assumed to carry beyond this gateway's requests."""

AFFINITY_BLOCK = 256
AFFINITY_BYTES = 4096
"""A prompt's key is its first bytes, at most this many, cut to whole blocks."""

MASK = (1 << 64) - 1

NO_SIGNALS = "no load metrics"
"""A scrape's outcome when the page has none of the runtime's load metrics."""

logger = logging.getLogger("gateway.balancing")


_patterns: dict[frozenset[str], re.Pattern[str]] = {}


def read_load(text: str, signals: LoadSignals) -> Load | None:
    """The load in a Prometheus exposition, or None when it has neither queue nor batch.

    Only the lines of the wanted metrics are handed to prometheus-client's parser: a
    runtime's page is mostly histograms, and this runs every second for every replica.
    Raises ValueError when those lines do not parse."""
    names = signals.names
    pattern = _patterns.get(names)
    if pattern is None:
        alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
        pattern = _patterns[names] = re.compile(rf"^(?:{alternatives})(?:\{{.*\}})?[ \t].*$", re.MULTILINE)
    lines = pattern.findall(text)
    if not lines:
        return None
    totals: dict[str, float] = {}
    largest: dict[str, float] = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            value = sample.value
            if math.isnan(value) or math.isinf(value):
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + value
            largest[sample.name] = max(largest.get(sample.name, value), value)
    waiting = _first(signals.waiting, totals)
    running = _first(signals.running, totals)
    if waiting is None and running is None:
        return None
    kv_use = _first(signals.kv_use, largest) or 0.0
    if kv_use > 1.0:  # a percentage rather than a ratio
        kv_use /= 100.0
    return Load(max(waiting or 0.0, 0.0), max(running or 0.0, 0.0), min(max(kv_use, 0.0), 1.0))


def _first(names: tuple[str, ...], values: dict[str, float]) -> float | None:
    for name in names:
        if name in values:
            return values[name]
    return None


async def scrape(group: Group, replica: Replica) -> None:
    """Read one replica's load from its metrics route; on any failure its last report stays,
    and grows stale. The read is bounded like every answer the gateway reads whole (the
    backend read limit) and lasts at most one scrape interval."""
    adapter = group.backend.adapter
    assert adapter.metrics_path is not None
    assert adapter.load_signals is not None
    try:
        status, body = await replica.upstream.pool.fetch(
            "GET", adapter.metrics_path, group.backend.own_headers(), group.scrape_interval
        )
        if status != 200:
            replica.last_scrape = f"failed: status {status}"
            return
        load = read_load(body.decode("utf-8", "replace"), adapter.load_signals)
        if load is None:
            if replica.last_scrape != NO_SIGNALS:
                logger.warning(
                    "replica %s of backend %s: its metrics have none of %s; balancing by in-flight requests",
                    replica.url,
                    group.name,
                    ", ".join(sorted(adapter.load_signals.names)),
                )
            replica.last_scrape = NO_SIGNALS
            return
        replica.reported = load
        replica.batch_seen = max(replica.batch_seen, load.running)
        replica.scraped_at = time.monotonic()
        replica.in_flight_at_scrape = replica.in_flight
        replica.last_scrape = "ok"
    except UPSTREAM_ERRORS as exc:
        replica.last_scrape = f"failed: {type(exc).__name__}"
    except ValueError as exc:
        replica.last_scrape = f"failed: unparsable ({exc})"[:200]
    finally:
        replica.scraping = False


def report(replica: Replica, now: float) -> dict[str, object]:
    """A replica's last report, for /admin/backends."""
    return {
        "reported": None if replica.reported is None else replica.reported.as_dict(),
        "reported_age_s": None if replica.scraped_at is None else round(now - replica.scraped_at, 3),
        "last_scrape": replica.last_scrape,
    }


# queue


def fresh(replica: Replica, now: float, interval: float) -> Load | None:
    """The replica's report, if recent enough to go by."""
    at = replica.scraped_at
    if at is None or now - at > STALE_SCRAPES * interval:
        return None
    return replica.reported


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


# affinity


def affinity_key(headers: list[tuple[bytes, bytes]], body: dict[str, Any] | None) -> int | None:
    """The request's affinity key as a 64-bit number, or None when it has none."""
    key: bytes | None = None
    for name, value in headers:
        if name == b"x-session-id" and value:
            key = b"s:" + value
            break
    if key is None and body is not None:
        for field, tag in (("prompt_cache_key", b"k:"), ("user", b"u:")):
            named = body.get(field)
            if isinstance(named, str) and named:
                key = tag + named.encode("utf-8", "replace")
                break
        else:
            leading = leading_bytes(body)
            if leading:
                key = b"p:" + leading
    if key is None:
        return None
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def leading_bytes(body: dict[str, Any]) -> bytes:
    """The start of the prompt that stays the same from one turn of a conversation to the
    next: for messages, the system and developer messages and the first user message; for
    a prompt, its first bytes. At most ``AFFINITY_BYTES``, cut to whole blocks of
    ``AFFINITY_BLOCK`` (a shorter prompt counts whole)."""
    parts: list[bytes] = []
    size = 0
    messages = body.get("messages")
    if messages is None:
        messages = body.get("input")  # the Responses API
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                break
            role = message.get("role")
            part = _content_bytes(message.get("content"))
            parts.append(str(role).encode() + b":" + part + b"\n")
            size += len(parts[-1])
            if role == "user" or size >= AFFINITY_BYTES:
                break
    else:
        prompt = messages if isinstance(messages, str) else body.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0] if isinstance(prompt[0], str | list) else prompt
        if isinstance(prompt, str):
            parts.append(prompt[:AFFINITY_BYTES].encode("utf-8", "replace"))
        elif isinstance(prompt, list):  # token ids
            parts.append(",".join(str(token) for token in prompt[: AFFINITY_BYTES // 4]).encode())
    data = b"".join(parts)[:AFFINITY_BYTES]
    if len(data) > AFFINITY_BLOCK:
        data = data[: len(data) - len(data) % AFFINITY_BLOCK]
    return data


def _content_bytes(content: object) -> bytes:
    if isinstance(content, str):
        return content[:AFFINITY_BYTES].encode("utf-8", "replace")
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return "".join(text for text in texts if isinstance(text, str))[:AFFINITY_BYTES].encode(
            "utf-8", "replace"
        )
    return b""


def replica_seed(url: str) -> int:
    """A replica's place in every key's order: from its URL, the same in every process."""
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "big")


def mix(value: int) -> int:
    """splitmix64's finaliser: every bit of the result depends on every bit of ``value``."""
    value = (value + 0x9E3779B97F4A7C15) & MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK
    return value ^ (value >> 31)


def rendezvous_order(pairs: list[tuple[Group, Replica]], key: int) -> list[tuple[Group, Replica]]:
    """The replicas in ``key``'s order of preference (weighted rendezvous hashing)."""
    weight = pairs[0][1].weight
    if all(pair[1].weight == weight for pair in pairs):
        return sorted(pairs, key=lambda pair: mix(key ^ pair[1].seed), reverse=True)

    def score(pair: tuple[Group, Replica]) -> float:
        unit = (mix(key ^ pair[1].seed) + 0.5) / 2.0**64
        return -pair[1].weight / math.log(unit)

    return sorted(pairs, key=score, reverse=True)


def affinity_pick(pairs: list[tuple[Group, Replica]], key: int, spread: float) -> tuple[Group, Replica]:
    """The first replica in the key's order whose load stays within the bound."""
    order = rendezvous_order(pairs, key)
    total = 1 + sum(pair[1].in_flight for pair in pairs)
    weights = sum(pair[1].weight for pair in pairs)
    for pair in order:
        replica = pair[1]
        bound = math.ceil((1 + spread) * total * replica.weight / weights)
        if replica.in_flight + 1 <= bound:
            return pair
    return order[0]  # not reached: some replica is at or below the mean
