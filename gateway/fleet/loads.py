"""Load reports: what each replica of a ``strategy: queue`` backend says of its own queue.

Every replica's own Prometheus metrics (``Adapter.load_signals``) are read (``scrape``;
``run_scrapes`` schedules the reads) about every ``scrape_interval`` seconds, jittered so
that replicas and gateway processes do not scrape in step; a scrape still running when
the next is due is left to finish or time out, never doubled. A report older than
``STALE_SCRAPES`` intervals (the metrics route slow, down, or renamed) is not gone by
(``fresh``); ``gateway.routing.balancers.Queue`` scores replicas with what is.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from adapters.base import LoadSignals
from gateway.client import UpstreamError
from gateway.fleet.replicas import Group, Load, Replica

STALE_SCRAPES = 3.0
"""A report older than this many scrape intervals is stale."""

NO_SIGNALS = "no load metrics"
"""A scrape's outcome when the page has none of the runtime's load metrics."""

logger = logging.getLogger("gateway.loads")


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
        status, body = await replica.upstream.fetch("GET", adapter.metrics_path, group.scrape_interval)
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
        if load.waiting > 0:
            replica.capacity_seen = max(replica.capacity_seen, load.running)
        replica.scraped_at = time.monotonic()
        replica.in_flight_at_scrape = replica.in_flight
        replica.last_scrape = "ok"
    except UpstreamError as exc:
        replica.last_scrape = f"failed: {type(exc).__name__}"
    except ValueError as exc:
        replica.last_scrape = f"failed: unparsable ({exc})"[:200]
    finally:
        replica.scraping = False


async def run_scrapes(
    groups: Callable[[], list[Group]], spawn: Callable[[Coroutine[Any, Any, None]], None]
) -> None:
    """Read the metrics of every replica of a ``queue`` backend about every
    ``scrape_interval`` seconds, for the app's lifetime; a scrape still running when the
    next is due is not doubled."""
    while True:
        now = time.monotonic()
        wake = 1.0
        for group in groups():
            if not group.scraped:
                continue
            interval = group.scrape_interval
            wake = min(wake, interval / 4)
            for replica in group.replicas:
                if replica.scraping or replica.next_scrape > now:
                    continue
                replica.scraping = True
                replica.next_scrape = now + interval * random.uniform(0.8, 1.2)
                spawn(scrape(group, replica))
        await asyncio.sleep(max(wake, 0.01))


def report(replica: Replica, now: float) -> dict[str, object]:
    """A replica's last report and the most requests it has reported running at once, for
    /admin/backends."""
    return {
        "reported": None if replica.reported is None else replica.reported.as_dict(),
        "reported_age_s": None if replica.scraped_at is None else round(now - replica.scraped_at, 3),
        "batch_seen": replica.batch_seen,
        "last_scrape": replica.last_scrape,
    }


# queue


def fresh(replica: Replica, now: float, interval: float) -> Load | None:
    """The replica's report, if recent enough to go by."""
    at = replica.scraped_at
    if at is None or now - at > STALE_SCRAPES * interval:
        return None
    return replica.reported
