"""Which backend and which replica a request goes to, and what the gateway knows of their health.

Between the proxy and the connection pools: a ``Router`` holds the configured backends,
each a ``Group`` of ``Replica``s with a pool apiece. It answers three questions:

- which backends serve a model (``groups_for``): by the configured ``models`` and
  ``aliases``, or by each backend's own ``/v1/models``, read at start and refreshed;
- which replica takes the next request (``choose``), among the replicas of every backend
  serving the model, each with its backend's weight, by the backend's strategy: the less
  loaded of two drawn by weight (least outstanding requests, streams counted until they
  end), smooth weighted round robin, or one of ``gateway.balancing``'s (the runtimes' own
  queues, read by ``run_scrapes``; affinity by session or prompt); ejected and loading
  replicas are skipped while any other is left;
- whether a failed attempt may go to another replica (``may_retry``): a budget that lets
  a share of requests be retried, so that a sick fleet is not sent every request twice.

Health is passive and active. Passive: a refused connection ejects a replica at once;
``eject_after`` timeouts or 5xx answers in a row eject it; 4xx answers and clients that
leave never count. An ejection lasts ``eject_seconds``, doubling with each one in a row.
Active: every ``probe_interval`` seconds each replica's readiness route (the adapter's;
no generation) is asked; a replica that says it is loading gets no traffic, one that is
back from ejection ramps up over ``slow_start`` seconds.

With ``--backend-url`` there is one backend with one replica: no probes, no ejection, and
every model goes to it, as before routing existed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from adapters.base import Readiness
from gateway.backend import Backend
from gateway.balancing import (
    affinity_pick,
    queue_score,
    replica_seed,
    report,
    saturated,
    scrape,
)
from gateway.client import ConnectFailed, ConnectTimeout
from gateway.errors import NotFound
from gateway.fleet import BackendConfig
from gateway.replicas import (
    AFFINITY,
    LEAST_OUTSTANDING,
    QUEUE,
    ROUND_ROBIN,
    Group,
    Replica,
    group_from_config,
)
from gateway.settings import Settings
from gateway.upstream import UPSTREAM_ERRORS, Upstream

logger = logging.getLogger("gateway.routing")

LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL, errno.ENOBUFS, errno.ENOMEM})
RETRY_WINDOW = 10.0
MAX_EJECTION_DOUBLINGS = 6  # 2 s doubles to 128 s at most
RETRY_BURST = 10.0
LIST_REFRESH = 60.0
LIST_RETRY = 5.0


class Router:
    def __init__(self, groups: list[Group], settings: Settings, single: bool = False) -> None:
        if not groups:
            raise ValueError("a router needs at least one backend")
        self.groups = groups
        self.settings = settings
        self.single = single
        """One backend from --backend-url: every model goes to it, no probes, no ejection."""
        self.slow_start = settings.slow_start
        self._by_model: dict[str, list[Group]] = {}
        self._requests = [0, 0]
        self._retries = [0, 0]
        self._window_start = time.monotonic()
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self.on_models: Callable[[Iterable[str]], object] | None = None
        """Told every model name whenever a list is read (the metrics' model label)."""
        self.on_retry: Callable[[str], object] | None = None
        """Told a backend's name when its pool sent a request again on a fresh connection."""
        self.resolve: Callable[[str, int], Awaitable[list[str]]] = resolve
        """A host name's addresses, for ``discovery: dns``."""
        self._opened = False
        self._background: set[asyncio.Task[None]] = set()
        self.default = groups[0]
        self._set_groups(groups)

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        if settings.backends is None:
            return cls.for_backend(Backend.from_settings(settings), settings)
        groups = [group_from_config(config) for config in settings.backends]
        router = cls(groups, settings)
        for group in groups:
            if not group.discovered:  # resolved when the router opens
                assert group.config is not None
                group.replicas = [router._replica(group, url) for url in group.config.replica_urls]
        return router

    @classmethod
    def for_backend(cls, backend: Backend, settings: Settings) -> Router:
        """One backend, one replica (--backend-url, the embedded runtime, a test's backend)."""
        router = cls([Group(backend, [], default=True)], settings, single=True)
        router.groups[0].replicas = [router._replica(router.groups[0], backend.url)]
        return router

    def _replica(self, group: Group, url: str) -> Replica:
        replica = Replica(url, Upstream(self.settings, url), group.weight, seed=replica_seed(url))
        name = group.name

        def retried() -> None:
            if self.on_retry is not None:
                self.on_retry(name)

        replica.upstream.on_retry = retried
        return replica

    def _set_groups(self, groups: list[Group]) -> None:
        defaults = [group for group in groups if group.default]
        self.default = defaults[0] if defaults else groups[0]
        for group in groups:
            # One replica (--backend-url) has nothing to balance: no affinity key is read.
            configured = group.config.strategy if group.config is not None else None
            group.strategy = LEAST_OUTSTANDING if self.single else configured or self.settings.balance
        self.groups = groups
        self.rebuild()

    # Models

    def rebuild(self) -> None:
        by_model: dict[str, list[Group]] = {}
        for group in self.groups:
            for name in group.model_names():
                by_model.setdefault(name, []).append(group)
        self._by_model = by_model

    def group(self, name: str) -> Group | None:
        """A backend by its name."""
        return next((group for group in self.groups if group.name == name), None)

    async def groups_for(self, model: str | None) -> list[Group]:
        """The backends that serve ``model``; the default one for a request naming none."""
        if self.single or model is None:
            return [self.default]
        groups = self._by_model.get(model)
        if groups is None and await self._refresh_stale():
            groups = self._by_model.get(model)
        if groups is None:
            raise NotFound(f"the model {model!r} does not exist", code="model_not_found", param="model")
        return groups

    async def _refresh_stale(self) -> bool:
        """Re-read the lists of backends not read lately; True if any was."""
        now = time.monotonic()
        stale = [
            group
            for group in self.groups
            if group.models is None and (group.listed_at is None or now - group.listed_at > LIST_RETRY)
        ]
        if not stale:
            return False
        await asyncio.gather(*(self.refresh(group) for group in stale))
        return True

    async def refresh(self, group: Group, fresh: bool = False) -> None:
        """Read ``group``'s model list (one read at a time, whoever asks); ``fresh``: a read
        begun after this call (a model was just loaded), not one already under way."""
        running = self._refreshing.get(group.name)
        if running is not None and fresh:
            await asyncio.shield(running)
            running = self._refreshing.get(group.name)
        if running is None:
            running = self._refreshing[group.name] = asyncio.ensure_future(self._read_list(group))
            running.add_done_callback(lambda _: self._refreshing.pop(group.name, None))
        await asyncio.shield(running)

    async def _read_list(self, group: Group) -> None:
        if not group.replicas:
            return  # none yet (discovery): asked again once one is there
        headers = group.backend.own_headers()
        replicas = sorted(group.replicas, key=lambda r: not r.available())
        for replica in replicas:
            try:
                status, body = await replica.upstream.pool.fetch("GET", "/v1/models", headers, seconds=10)
                data = orjson.loads(body) if status == 200 else None
            except (*UPSTREAM_ERRORS, orjson.JSONDecodeError):
                continue
            entries = data.get("data") if isinstance(data, dict) else None
            if isinstance(entries, list):
                group.listed = [e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]
                group.listed_at = time.monotonic()
                self.rebuild()
                if self.on_models is not None:
                    self.on_models(self._by_model)
                return
        group.listed_at = time.monotonic()  # failed too: not asked again for LIST_RETRY seconds

    def all_models(self) -> list[dict[str, object]]:
        """The union of every backend's models and aliases, each name once, for GET /v1/models."""
        seen: set[str] = set()
        entries: list[dict[str, object]] = []
        for group in self.groups:
            listed = {str(entry["id"]): entry for entry in group.listed}
            names = sorted(group.models) if group.models is not None else list(listed)
            for name in [*names, *sorted(group.aliases)]:
                if name in seen:
                    continue
                seen.add(name)
                entry = listed.get(group.backend_model(name))
                if entry is None:
                    entry = {"id": name, "object": "model", "created": 0, "owned_by": group.name}
                else:
                    entry = {**entry, "id": name}
                entries.append(entry)
        return entries

    # Replicas

    def pick(self, group: Group, tried: Iterable[Replica] = ()) -> Replica | None:
        """A replica of ``group`` for the next attempt, or None when every one has been tried."""
        chosen = self.choose([group], list(tried))
        return None if chosen is None else chosen[1]

    def has_candidate(self, groups: list[Group], tried: list[Replica]) -> bool:
        return any(replica not in tried for group in groups for replica in group.replicas)

    def choose(
        self, groups: list[Group], tried: list[Replica], key: int | None = None
    ) -> tuple[Group, Replica] | None:
        """The backend and replica for the next attempt, among every untried replica of the
        backends that serve the request, each with its backend's weight, by the first
        backend's strategy (``key``: the request's affinity key, for ``affinity``); None when
        none is left. Ejected and loading replicas are chosen only when no other is left (a
        fleet wrongly ejected whole must still serve): the one whose ejection ends first."""
        if self.single:
            group = self.default
            if tried:
                return None
            only = group.replicas[0]
            only.picks += 1
            return group, only
        untried = [(g, r) for g in groups for r in g.replicas if r not in tried] if tried else None
        if untried is None:
            untried = [(g, r) for g in groups for r in g.replicas]
        ready = [pair for pair in untried if pair[1].available()]
        if ready:
            chosen = ready[0] if len(ready) == 1 else self._balance(ready, key)
        elif untried:
            chosen = min(untried, key=lambda pair: (pair[1].ejected_until, pair[1].loading))
        else:
            return None
        chosen[1].picks += 1
        return chosen

    def _balance(self, pairs: list[tuple[Group, Replica]], key: int | None) -> tuple[Group, Replica]:
        strategy = pairs[0][0].strategy
        if strategy == QUEUE:
            return self._by_queue(pairs)
        if strategy == AFFINITY and key is not None:
            return affinity_pick(pairs, key, pairs[0][0].affinity_spread)
        if strategy == ROUND_ROBIN:
            # Smooth weighted round robin (nginx's): even spacing, exact shares.
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
        a, b = self._draw_two(pairs)
        now = time.monotonic()
        slow_start = self.slow_start
        return a if a[1].load(now, slow_start) <= b[1].load(now, slow_start) else b

    def _by_queue(self, pairs: list[tuple[Group, Replica]]) -> tuple[Group, Replica]:
        """The lower score of two replicas drawn among those not saturated (among all when
        every one is)."""
        now = time.monotonic()
        interval = pairs[0][0].scrape_interval
        candidates = [pair for pair in pairs if not saturated(pair[1], now, interval)]
        if not candidates:
            candidates = pairs
        elif len(candidates) == 1:
            return candidates[0]
        a, b = self._draw_two(candidates)
        slow_start = self.slow_start
        score_a = queue_score(a[1], now, interval, a[1].share(now, slow_start))
        score_b = queue_score(b[1], now, interval, b[1].share(now, slow_start))
        return a if score_a <= score_b else b

    @staticmethod
    def _draw_two(
        pairs: list[tuple[Group, Replica]],
    ) -> tuple[tuple[Group, Replica], tuple[Group, Replica]]:
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

    def admit(self) -> None:
        """A request arrived: it counts towards the share that may be retried."""
        if self.single:
            return
        self._roll()
        self._requests[1] += 1

    def may_retry(self) -> bool:
        """Take a retry from the budget, if one is left: retries over the last 10 to 20
        seconds stay under ``retry_budget`` times the requests, plus a burst of 10."""
        self._roll()
        requests, retries = sum(self._requests), sum(self._retries)
        if retries >= RETRY_BURST + self.settings.retry_budget * requests:
            return False
        self._retries[1] += 1
        return True

    def _roll(self) -> None:
        # Two windows of RETRY_WINDOW seconds: the one filling and the one before it.
        now = time.monotonic()
        if now - self._window_start >= RETRY_WINDOW:
            stale = now - self._window_start >= 2 * RETRY_WINDOW
            self._requests = [0 if stale else self._requests[1], 0]
            self._retries = [0 if stale else self._retries[1], 0]
            self._window_start = now

    def succeeded(self, replica: Replica) -> None:
        replica.failures = 0
        if replica.ejections:
            # Back and serving for as long as its last ejection: the next one starts short.
            last = self.settings.eject_seconds * 2 ** min(replica.ejections - 1, MAX_EJECTION_DOUBLINGS)
            if time.monotonic() - replica.ramp_from > last:
                replica.ejections = 0

    def failed(self, group: Group, replica: Replica, exc: BaseException | None = None) -> None:
        """A timeout, a 5xx or a connection failure; a refused connection ejects at once.

        A failure of the gateway's own (out of file descriptors, of local ports, of buffers)
        says nothing of the replica and does not count."""
        if self.single:
            return
        if isinstance(exc, ConnectFailed) and exc.os_error.errno in LOCAL_ERRNOS:
            return
        replica.failures += 1
        refused = isinstance(exc, ConnectFailed | ConnectTimeout)
        if refused or replica.failures >= self.settings.eject_after:
            self.eject(group, replica)

    def eject(self, group: Group, replica: Replica) -> None:
        """Take ``replica`` out until a probe, no sooner than the backoff, finds it ready."""
        if replica.ejected:
            return
        now = time.monotonic()
        seconds = self.settings.eject_seconds * 2 ** min(replica.ejections, MAX_EJECTION_DOUBLINGS)
        replica.ejected = True
        replica.ejections += 1
        replica.ejected_total += 1
        replica.failures = 0
        replica.ejected_until = replica.next_probe = now + seconds
        logger.warning("replica %s of backend %s ejected for %g s", replica.url, group.name, seconds)

    # Active probes

    async def probe(self, group: Group, replica: Replica, seconds: float) -> Readiness | None:
        """Ask ``replica`` whether it is ready; None when it did not answer."""
        now = time.monotonic()
        try:
            status = await health_status(group.backend, replica, seconds)
        except UPSTREAM_ERRORS as exc:
            replica.last_probe, replica.last_probe_at = f"failed: {type(exc).__name__}", now
            return None
        state = group.backend.adapter.readiness(status)
        replica.last_probe, replica.last_probe_at = f"{state.value} ({status})", now
        return state

    async def probe_all(self, seconds: float) -> None:
        await asyncio.gather(
            *(
                self._probe_and_apply(group, replica, seconds)
                for group in self.groups
                for replica in group.replicas
            )
        )

    async def _probe_and_apply(self, group: Group, replica: Replica, seconds: float) -> None:
        state = await self.probe(group, replica, seconds)
        now = time.monotonic()
        replica.next_probe = now + self.settings.probe_interval
        due = now >= replica.ejected_until
        if state is Readiness.READY:
            if replica.loading or (replica.ejected and due):
                replica.ramp_from = now  # back: ramp up rather than take a stampede
                logger.info("replica %s of backend %s is ready", replica.url, group.name)
            replica.loading = False
            if replica.ejected and due:
                replica.ejected = False
                replica.failures = 0
        elif state is Readiness.LOADING:
            replica.loading = True
        elif not self.single:
            replica.loading = False
            if replica.ejected and due:
                replica.ejected = False  # still failing: ejected again, for longer
            self.eject(group, replica)
        if replica.ejected:
            replica.next_probe = max(replica.ejected_until, now + min(self.settings.probe_interval, 1.0))

    async def run_probes(self) -> None:
        """Probe each replica every ``probe_interval`` seconds, and an ejected one as soon as
        its ejection may end, for the app's lifetime."""
        seconds = min(self.settings.ready_timeout, self.settings.probe_interval)
        while True:
            now = time.monotonic()
            due = [(g, r) for g in self.groups for r in g.replicas if r.next_probe <= now]
            try:
                await asyncio.gather(*(self._probe_and_apply(g, r, seconds) for g, r in due))
            except Exception:  # a probe must never end the loop
                logger.exception("health probes failed")
            now = time.monotonic()
            wake = min(r.next_probe for g in self.groups for r in g.replicas)
            await asyncio.sleep(min(max(wake - now, 0.05), self.settings.probe_interval))

    # Load reports (strategy: queue)

    async def run_scrapes(self) -> None:
        """Read the metrics of every replica of a ``queue`` backend about every
        ``scrape_interval`` seconds, for the app's lifetime; a scrape still running when
        the next is due is not doubled."""
        while True:
            now = time.monotonic()
            wake = 1.0
            for group in self.groups:
                if not group.scraped:
                    continue
                interval = group.scrape_interval
                wake = min(wake, interval / 4)
                for replica in group.replicas:
                    if replica.scraping or replica.next_scrape > now:
                        continue
                    replica.scraping = True
                    replica.next_scrape = now + interval * random.uniform(0.8, 1.2)
                    self._spawn(scrape(group, replica))
            await asyncio.sleep(max(wake, 0.01))

    async def follow_lists(self) -> None:
        """Keep every backend's model list fresh, for routing and for the metrics' labels."""
        while True:
            await asyncio.gather(*(self.refresh(group) for group in self.groups if group.models is None))
            missing = any(group.models is None and not group.listed for group in self.groups)
            await asyncio.sleep(LIST_RETRY if missing else LIST_REFRESH)

    # Lifecycle

    async def open(self) -> None:
        for group in self.groups:
            for replica in group.replicas:
                await replica.upstream.open()
        self._opened = True
        await asyncio.gather(*(self._discover(group) for group in self.groups if group.discovered))

    async def close(self) -> None:
        for task in [*self._refreshing.values(), *self._background]:
            task.cancel()
        for group in self.groups:
            for replica in group.replicas:
                await replica.upstream.close()

    # Changes to the fleet: DNS discovery, SIGHUP

    async def run_discovery(self) -> None:
        """Look up every ``discovery: dns`` backend every ``discovery_interval`` seconds."""
        while True:
            await asyncio.sleep(self.settings.discovery_interval)
            await asyncio.gather(*(self._discover(group) for group in self.groups if group.discovered))

    async def _discover(self, group: Group) -> None:
        assert group.config is not None
        assert group.config.url is not None
        template = urlsplit(group.config.url)
        host, port = template.hostname or "", template.port or (443 if template.scheme == "https" else 80)
        try:
            addresses = sorted(set(await self.resolve(host, port)))
        except OSError as exc:
            # Kept as it is: a DNS hiccup must not empty a backend.
            logger.warning("backend %s: cannot resolve %s (%s); keeping its replicas", group.name, host, exc)
            return
        urls = [
            urlunsplit(
                (template.scheme, f"[{a}]:{port}" if ":" in a else f"{a}:{port}", template.path, "", "")
            )
            for a in addresses
        ]
        await self._set_replicas(group, urls)

    async def _set_replicas(self, group: Group, urls: list[str]) -> None:
        """Make ``urls`` the group's replicas: the ones kept keep their state and pools; new
        ones are opened; the ones gone get no new requests and are closed once idle."""
        current = {replica.url: replica for replica in group.replicas}
        if list(current) == urls:
            return
        replicas = []
        for url in urls:
            replica = current.pop(url, None)
            if replica is None:
                replica = self._replica(group, url)
                if self._opened:
                    await replica.upstream.open()
                # A new replica ramps up, as one back from ejection does.
                replica.ramp_from = time.monotonic()
            replica.weight = group.weight
            replicas.append(replica)
        group.replicas = replicas
        if group.models is None and not group.listed and replicas and self._opened:
            # Its models are not known yet (no replica answered before): ask the new ones.
            group.listed_at = None
            self._spawn(self.refresh(group))
        for gone in current.values():
            self._drain(group, gone)
        logger.info("backend %s: replicas %s", group.name, ", ".join(urls) or "none")

    def _drain(self, group: Group, replica: Replica) -> None:
        async def drain() -> None:
            deadline = time.monotonic() + self.settings.drain_timeout
            while replica.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter, not an event
                await asyncio.sleep(0.1)
            await replica.upstream.close()
            logger.info("backend %s: replica %s drained and closed", group.name, replica.url)

        self._spawn(drain())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload(self, configs: list[BackendConfig]) -> None:
        """Switch to ``configs`` at once: replicas kept by backend name and URL keep their
        state and connections; removed ones are drained."""
        old = {group.name: group for group in self.groups}
        groups = []
        gone = []
        for config in configs:
            group = group_from_config(config)
            previous = old.pop(config.name, None)
            if previous is not None and previous.config is not None and previous.config.kind == config.kind:
                group.listed, group.listed_at = previous.listed, previous.listed_at
                group.replicas = previous.replicas
            elif previous is not None:
                # Another kind of runtime under the same name: nothing of the old one is reused.
                gone.append(previous)
            if not group.discovered:
                await self._set_replicas(group, config.replica_urls)
            groups.append(group)
        for group in [*old.values(), *gone]:
            for replica in group.replicas:
                self._drain(group, replica)
        self._set_groups(groups)
        for group in groups:
            if group.discovered:
                await self._discover(group)
        logger.info("backends reloaded: %s", ", ".join(group.name for group in groups))

    def describe(self) -> list[dict[str, object]]:
        """Every backend and replica as it stands, for /admin/backends."""
        now = time.monotonic()
        return [
            {
                "name": group.name,
                "kind": group.backend.adapter.name,
                "default": group is self.default,
                "strategy": group.strategy,
                "models": sorted(group.model_names()),
                "replicas": [
                    {
                        "url": replica.url,
                        "state": replica.state(now),
                        "in_flight": replica.in_flight,
                        "picks": replica.picks,
                        "failures": replica.failures,
                        "ejections": replica.ejected_total,
                        "ejected_for_s": round(max(replica.ejected_until - now, 0.0), 3)
                        if replica.ejected
                        else 0.0,
                        "weight": replica.weight,
                        "last_probe": replica.last_probe,
                        "last_probe_age_s": None
                        if replica.last_probe_at is None
                        else round(now - replica.last_probe_at, 3),
                        **(report(replica, now) if group.scraped else {}),
                    }
                    for replica in group.replicas
                ],
            }
            for group in self.groups
        ]


async def health_status(backend: Backend, replica: Replica, seconds: float) -> int:
    """The status of the runtime's readiness route (the adapter's, or its fallback where the
    server answers 404 to it). Raises what the pool raises."""
    headers = backend.own_headers()
    pool = replica.upstream.pool
    status, _ = await pool.fetch("GET", backend.adapter.health_path, headers, seconds)
    fallback = backend.adapter.health_fallback_path
    if status == 404 and fallback is not None:
        status, _ = await pool.fetch("GET", fallback, headers, seconds)
    return status


async def resolve(host: str, port: int) -> list[str]:
    found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in found]
