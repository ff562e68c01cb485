"""Prometheus metrics, owned by the app: a registry per app, labels kept bounded.

Labels: ``route`` is the gateway's route name, ``model`` is a model the backend lists or
the configuration names (anything else is ``other``), ``key`` is a key's name, never the
key. With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set before start) values
live in shared files and ``/metrics`` aggregates them.

A finished request is tallied in plain numbers, under one lock, by its set of labels; the
tallies are folded into prometheus_client's values once a turn of the event loop (a turn
that ends fifty requests does a series' additions once, not fifty times) and before every
render. What a scrape shows is at most that turn behind.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import threading
import time
from collections import Counter as Bag
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.core.exchange import Exchange
from gateway.fleet.replicas import EJECTED, LOADING, READY
from gateway.routing.router import Router

logger = logging.getLogger("gateway.metrics")

OTHER = "other"
MAX_KNOWN_MODELS = 500
# From sub-millisecond proxy answers to multi-minute generations.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


class KnownModels:
    """The model names a label may take: configured ones plus what the backend lists."""

    def __init__(self, configured: Iterable[str] = ()) -> None:
        self.configured = frozenset(configured)
        self.listed: frozenset[str] = frozenset()

    def update(self, listed: Iterable[str]) -> None:
        names: set[str] = set()
        for name in listed:
            if len(names) >= MAX_KNOWN_MODELS:
                break
            names.add(name)
        self.listed = frozenset(names)

    def label(self, model: str | None) -> str:
        if not model:
            return ""
        if model in self.configured or model in self.listed:
            return model
        return OTHER


class Metrics:
    def __init__(self, models: KnownModels, registry: CollectorRegistry | None = None) -> None:
        self.models = models
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._adders: dict[tuple[int, tuple[str, ...]], Callable[[float], None]] = {}
        self._histograms: dict[tuple[int, tuple[str, ...]], HistogramChild] = {}
        self._tallies: dict[tuple[Any, ...], Tally] = {}
        self._pending: list[Tally] = []
        """Tallies with requests since the last fold."""
        self._fold_due = False
        # The tallies are added to on the event loop's thread, folded there or by a render on
        # the metrics port's thread.
        self._lock = threading.Lock()
        self._declare_requests(self.registry)
        self._declare_failures(self.registry)
        self._declare_queues(self.registry)
        self.fleet: Collector | None = None
        """Replica state read at scrape time (``gateway.routing.router``), this process's view."""

    def _declare_requests(self, r: CollectorRegistry) -> None:
        """What every request adds to: counts, durations, streams, tokens."""
        self.requests = Counter(
            "gateway_requests", "Requests answered, by route, method, status, backend, model and key name.",
            ["route", "method", "status", "backend", "model", "key"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "gateway_request_duration_seconds", "Time from a request's arrival to the end of its answer.",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttfb = Histogram(
            "gateway_time_to_first_byte_seconds",
            "Time from a request's arrival to the backend's first body byte (a stream's first token).",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time a request spent in the gateway itself: its duration less the time waiting on the backend.",
            ["route"], buckets=OVERHEAD_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "gateway_in_flight_requests", "Requests being handled.", ["route"],
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.open_streams = Gauge(
            "gateway_open_streams", "Event streams being relayed.", ["route"],
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.stream_duration = Histogram(
            "gateway_stream_duration_seconds", "Duration of relayed event streams.",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "gateway_tokens", "Tokens reported in responses' usage, by kind (prompt or completion).",
            ["kind", "route", "model", "key"], registry=r,
        )  # fmt: skip

    def _declare_queues(self, r: CollectorRegistry) -> None:
        """Flow control: how long requests waited and how each wait ended."""
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds", "Time requests waited in the gateway for a replica with room.",
            ["backend"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_outcomes = Counter(
            "gateway_queue_outcomes",
            "How waits for a replica with room ended: dispatched, full (refused or displaced), "
            "timeout, abandoned (the client left), shutdown, backend_gone.",
            ["backend", "outcome"], registry=r,
        )  # fmt: skip

    def waited(self, backend: str, seconds: float, outcome: str) -> None:
        self.queue_wait.labels(backend).observe(seconds)
        self.queue_outcomes.labels(backend, outcome).inc()

    def _declare_failures(self, r: CollectorRegistry) -> None:
        """What refusals and failures add to: limits, backends, retries, disconnects."""
        self.rate_limited = Counter(
            "gateway_rate_limited_requests", "Requests refused by a rate limit.", ["key", "limit"], registry=r
        )
        self.rate_limit_failures = Counter(
            "gateway_rate_limit_storage_errors", "Rate-limit checks the storage (Redis) failed to answer.",
            registry=r,
        )  # fmt: skip
        self.backend_errors = Counter(
            "gateway_backend_errors",
            "Backend failures by type: unreachable, timeout, bad_response, status_4xx, status_5xx, "
            "mid_stream.",
            ["backend", "type"], registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "gateway_backend_retries",
            "Requests sent again on a fresh connection after a reused one died before answering.",
            ["backend"], registry=r,
        )  # fmt: skip
        self.disconnects = Counter(
            "gateway_client_disconnects", "Clients that left before their answer was complete.", ["route"],
            registry=r,
        )  # fmt: skip
        self.failovers = Counter(
            "gateway_backend_failovers",
            "Requests sent to another replica after one failed before answering, by the failed one's "
            "backend.",
            ["backend"], registry=r,
        )  # fmt: skip
        self.retry_budget_exhausted = Counter(
            "gateway_retry_budget_exhausted",
            "Failed attempts that could have gone to another replica but the retry budget was spent.",
            registry=r,
        )  # fmt: skip

    def failover(self, backend: str) -> None:
        self._child(self.failovers, backend).inc()

    def _child(self, metric: Any, *values: str) -> Any:
        # labels() validates and locks on every call; the label sets are bounded, so their
        # children are looked up once and kept.
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def _adder(self, metric: Counter | Gauge, *values: str) -> Callable[[float], None]:
        """What adds to one child of a counter or gauge. The public ``inc`` checks, on every
        call, what holds for every child once made (it is observable, the amount is not
        negative where that matters): on the hot path the child's value is added to itself."""
        key = (id(metric), values)
        add = self._adders.get(key)
        if add is None:
            add = self._adders[key] = self._child(metric, *values)._value.inc
        return add

    def started(self, exchange: Exchange) -> None:
        self._adder(self.in_flight, exchange.route)(1)

    def stream_opened(self, exchange: Exchange) -> None:
        self._adder(self.open_streams, exchange.route)(1)

    def finished(self, exchange: Exchange) -> None:
        """Tally a request that is over; its numbers reach the registry with the turn's fold."""
        error = exchange.error
        status = exchange.status
        key = (
            exchange.route,
            exchange.method,
            status,
            exchange.backend,
            self.models.label(exchange.model),
            exchange.key or "",
            exchange.stream,
            None if error is None and status < 400 else error,
        )
        with self._lock:
            tally = self._tallies.get(key)
            if tally is None:
                tally = self._tallies[key] = Tally(key)
            if not tally.requests:
                self._pending.append(tally)
            tally.requests += 1
            duration = exchange.duration
            tally.durations.append(duration)
            tally.overheads.append(max(duration - exchange.upstream_wait - exchange.queued, 0.0))
            if exchange.ttfb is not None:
                tally.ttfbs.append(exchange.ttfb)
            if exchange.prompt_tokens:
                tally.prompt_tokens += exchange.prompt_tokens
            if exchange.completion_tokens:
                tally.completion_tokens += exchange.completion_tokens
            if self._fold_due:
                return
            self._fold_due = True
        try:
            asyncio.get_running_loop().call_soon(self.fold)
        except RuntimeError:  # no loop (a caller of its own): now
            self.fold()

    def fold(self) -> None:
        """Add the tallies since the last fold to the registry's values."""
        with self._lock:
            pending, self._pending = self._pending, []
            self._fold_due = False
            for tally in pending:
                self._fold(tally)
                tally.clear()

    def _fold(self, tally: Tally) -> None:
        series = tally.series
        if series is None:
            series = tally.series = self._series(tally.key)
        count = tally.requests
        series.requests(count)
        series.in_flight(-count)
        series.duration.observe(tally.durations)
        series.overhead.observe(tally.overheads)
        if tally.ttfbs:
            if series.ttfb is None:
                series.ttfb = self._histogram(self.ttfb, *series.labels[:2])
            series.ttfb.observe(tally.ttfbs)
        if series.streams is not None:
            open_streams, stream_duration = series.streams
            open_streams(-count)
            stream_duration.observe(tally.durations)
        if series.failed is not None:
            series.failed(count)
        if tally.prompt_tokens:
            if series.prompt_tokens is None:
                series.prompt_tokens = self._adder(self.tokens, "prompt", *series.labels)
            series.prompt_tokens(tally.prompt_tokens)
        if tally.completion_tokens:
            if series.completion_tokens is None:
                series.completion_tokens = self._adder(self.tokens, "completion", *series.labels)
            series.completion_tokens(tally.completion_tokens)

    def _series(self, key: tuple[Any, ...]) -> Series:
        route, method, status, backend, model, name, stream, error = key
        add = self._adder
        failed = None
        if error == "client_disconnect":
            failed = add(self.disconnects, route)
        elif error in BACKEND_ERROR_TYPES:
            failed = add(self.backend_errors, backend, BACKEND_ERROR_TYPES[error])
        elif error is None and status >= 400:
            failed = add(self.backend_errors, backend, f"status_{status // 100}xx")
        return Series(
            requests=add(self.requests, route, method, str(status), backend, model, name),
            in_flight=add(self.in_flight, route),
            duration=self._histogram(self.duration, route, model),
            overhead=self._histogram(self.overhead, route),
            labels=(route, model, name),
            streams=(
                (add(self.open_streams, route), self._histogram(self.stream_duration, route, model))
                if stream
                else None
            ),
            failed=failed,
        )

    def _histogram(self, metric: Histogram, *labels: str) -> HistogramChild:
        key = (id(metric), labels)
        child = self._histograms.get(key)
        if child is None:
            child = self._histograms[key] = HistogramChild.of(self._child(metric, *labels))
        return child

    def close(self) -> None:
        """A worker leaving: what it tallied is folded, and its live gauges stop counting in
        the aggregate."""
        self.fold()
        if multiprocess_dir():
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    def render(self) -> bytes:
        self.fold()
        directory = multiprocess_dir()
        if directory:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
            if self.fleet is not None:
                registry.register(self.fleet)
            return generate_latest(registry)
        return generate_latest(self.registry)


# The gateway's error types for backend failures, and the metric's name for each.
BACKEND_ERROR_TYPES = {
    "backend_unreachable": "unreachable",
    "backend_timeout": "timeout",
    "backend_error": "bad_response",
    "mid_stream": "mid_stream",
}


@dataclass(slots=True)
class Tally:
    """The finished requests of one set of labels since the last fold."""

    key: tuple[Any, ...]
    """Route, method, status, backend, model label, key name, streamed, error type."""
    requests: int = 0
    durations: list[float] = field(default_factory=list)
    overheads: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    series: Series | None = None
    """Where its numbers are added, found at its first fold."""

    def clear(self) -> None:
        self.requests = self.prompt_tokens = self.completion_tokens = 0
        self.durations.clear()
        self.overheads.clear()
        self.ttfbs.clear()


@dataclass(frozen=True, slots=True)
class HistogramChild:
    """What adds to one child of a histogram: its sum, and each bucket, found by bisection
    rather than the public ``observe``'s scan of every bound."""

    bounds: list[float]
    buckets: list[Callable[[float], None]]
    add_sum: Callable[[float], None]

    @classmethod
    def of(cls, child: Any) -> HistogramChild:
        return cls(list(child._upper_bounds), [bucket.inc for bucket in child._buckets], child._sum.inc)

    def observe(self, amounts: Sequence[float]) -> None:
        """Each bucket and the sum added to once, however many ``amounts``."""
        self.add_sum(sum(amounts))
        if len(amounts) == 1:
            self.buckets[bisect.bisect_left(self.bounds, amounts[0])](1)
            return
        for bucket, count in Bag(map(partial(bisect.bisect_left, self.bounds), amounts)).items():
            self.buckets[bucket](count)


@dataclass(slots=True)
class Series:
    """What one tally's numbers are added to."""

    labels: tuple[str, str, str]
    """Route, model label, key name."""
    requests: Callable[[float], None]
    in_flight: Callable[[float], None]
    duration: HistogramChild
    overhead: HistogramChild
    streams: tuple[Callable[[float], None], HistogramChild] | None
    """The open-streams gauge and the stream-duration histogram, for a streamed answer."""
    failed: Callable[[float], None] | None
    """The counter of its kind of failure, if it failed."""
    # Made when first needed: a child, once made, is shown.
    ttfb: HistogramChild | None = None
    prompt_tokens: Callable[[float], None] | None = None
    completion_tokens: Callable[[float], None] | None = None


def shown_url(url: str) -> str:
    """A replica's URL as metrics show it: no credentials, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class FleetCollector(Collector):
    """Replica state for /metrics, read from the router when scraped: nothing on the hot path."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterable[Metric]:
        labels = ["backend", "replica"]
        in_flight = GaugeMetricFamily(
            "gateway_replica_in_flight_requests",
            "Requests (streams included) a replica is answering.",
            labels=labels,
        )
        picks = CounterMetricFamily("gateway_replica_picks", "Attempts sent to a replica.", labels=labels)
        ejections = CounterMetricFamily(
            "gateway_replica_ejections", "Times a replica was ejected.", labels=labels
        )
        state = GaugeMetricFamily(
            "gateway_replica_state",
            "1 for the replica's state: ready, ejected, loading.",
            labels=[*labels, "state"],
        )
        reported = GaugeMetricFamily(
            "gateway_replica_reported_requests",
            "Requests a replica last reported waiting and running, from its own metrics (strategy: queue).",
            labels=[*labels, "state"],
        )
        capacity = GaugeMetricFamily(
            "gateway_replica_capacity",
            "Requests of this gateway a replica may run at once (max_concurrency, as configured or learnt).",
            labels=labels,
        )
        waiting = GaugeMetricFamily(
            "gateway_queue_waiting_requests",
            "Requests waiting in the gateway for a replica with room, by backend and priority.",
            labels=["backend", "priority"],
        )
        age = GaugeMetricFamily(
            "gateway_replica_report_age_seconds",
            "Seconds since a replica's metrics were last read (strategy: queue).",
            labels=labels,
        )
        now = time.monotonic()
        for group in self.router.groups:
            for replica in group.replicas:
                values = [group.name, shown_url(replica.url)]
                in_flight.add_metric(values, replica.in_flight)
                picks.add_metric(values, replica.picks)
                ejections.add_metric(values, replica.ejected_total)
                current = replica.state(now)
                for name in (READY, EJECTED, LOADING):
                    state.add_metric([*values, name], 1.0 if name == current else 0.0)
                known = group.replica_capacity(replica)
                if known is not None:
                    capacity.add_metric(values, known)
                if replica.reported is not None and replica.scraped_at is not None:
                    reported.add_metric([*values, "waiting"], replica.reported.waiting)
                    reported.add_metric([*values, "running"], replica.reported.running)
                    age.add_metric(values, now - replica.scraped_at)
        for queue in self.router.flow.queues.values():
            for priority, count in queue.by_priority().items():
                waiting.add_metric([queue.group.name, str(priority)], count)
        return [in_flight, picks, ejections, state, reported, age, capacity, waiting]
