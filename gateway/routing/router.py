"""Which backend and which replica a request goes to: the cluster manager.

A ``Router`` holds the configured backends, each a ``Group`` of ``Replica``s with a pool
apiece (``gateway.fleet.replicas``), and the parts that Envoy's cluster manager has:

- the model catalogue (``gateway.routing.catalogue``): which backends serve a model;
- one balancer per strategy (``gateway.routing.balancers``): which replica takes the next request,
  among the replicas of every backend serving the model, each with its backend's weight;
  ejected and loading replicas are skipped while any other is left;
- outlier detection (``gateway.fleet.outlier``): which failures count and when a replica is ejected;
- active health checks (``gateway.fleet.probes``): readiness, loading, the way back from ejection;
- load reports (``gateway.fleet.loads``) for ``strategy: queue``;
- the retry budget (``gateway.routing.retries``): whether a failed attempt may go to another replica;
- DNS discovery (``gateway.fleet.discovery``).

The router chooses (``choose``), changes the fleet (discovery, ``reload`` on SIGHUP,
draining what is gone), runs the background loops and describes it all for
``/admin/backends``. One request's tries are ``gateway.routing.attempts.Attempt``'s.

With ``--backend-url`` there is one backend with one replica, configured so: every model
goes to it (the catalogue does not route by model), and its probes and ejection are off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from gateway.config.backends import BackendConfig
from gateway.config.settings import Settings
from gateway.fleet.backend import Backend
from gateway.fleet.discovery import Resolver, replica_urls, resolve
from gateway.fleet.loads import report, run_scrapes
from gateway.fleet.outlier import OutlierDetection
from gateway.fleet.probes import HealthChecker
from gateway.fleet.replicas import Group, Replica, group_from_config
from gateway.fleet.upstream import Upstream
from gateway.routing.affinity import replica_seed
from gateway.routing.balancers import Balancer, balancers
from gateway.routing.catalogue import Catalogue
from gateway.routing.flow import FlowControl
from gateway.routing.retries import RetryBudget

logger = logging.getLogger("gateway.routing")


FLOW_TICK = 0.25
"""Seconds between looks for room that no ending request announced (flow control)."""


def worker_share(capacity: int, workers: int) -> int:
    """A replica's capacity split between ``--workers`` processes, each counting its own: at
    least one each (so a capacity below the workers is exceeded by the difference)."""
    return max(1, capacity // workers)


class Router:
    def __init__(self, groups: list[Group], settings: Settings, by_model: bool = True) -> None:
        if not groups:
            raise ValueError("a router needs at least one backend")
        self.settings = settings
        self.balancers = balancers(settings.slow_start)
        self.catalogue = Catalogue(by_model)
        self.outlier = OutlierDetection()
        self.health = HealthChecker(self.outlier, settings.ready_timeout)
        self.budget = RetryBudget(settings.retry_budget)
        self.on_retry: Callable[[str], object] | None = None
        """Told a backend's name when its pool sent a request again on a fresh connection."""
        self.on_failover: Callable[[str], object] | None = None
        """Told a backend's name when a failed attempt goes to another replica."""
        self.on_budget_exhausted: Callable[[], object] | None = None
        """Told when a failed attempt could have gone elsewhere but the budget was spent."""
        self.resolve: Resolver = resolve
        """A host name's addresses, for ``discovery: dns``."""
        self.flow = FlowControl()
        """Requests waiting for a replica with room, where backends have a capacity."""
        self.flow.chooser = self.choose
        self._opened = False
        self._background: set[asyncio.Task[None]] = set()
        self.groups = groups
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
        """One backend, one replica (--backend-url, the embedded runtime, a test's backend):
        every model goes to it; no probes and no ejection, since there is nowhere else to
        go; nothing to balance, so no affinity key is read."""
        group = Group(backend, [], default=True, eject_after=0, probe_interval=0)
        if settings.max_concurrency is not None:
            group.capacity = worker_share(settings.max_concurrency, settings.workers)
        router = cls([group], settings, by_model=False)
        router.groups[0].replicas = [router._replica(router.groups[0], backend.url)]
        return router

    def _replica(self, group: Group, url: str) -> Replica:
        upstream = Upstream(self.settings, url, group.backend.auth_header)
        replica = Replica(url, upstream, group.weight, seed=replica_seed(url))
        name = group.name

        def retried() -> None:
            if self.on_retry is not None:
                self.on_retry(name)

        upstream.on_retry = retried
        return replica

    def _set_groups(self, groups: list[Group]) -> None:
        defaults = [group for group in groups if group.default]
        self.default = defaults[0] if defaults else groups[0]
        settings = self.settings
        for group in groups:
            config = group.config
            if config is None:
                continue  # as made (for_backend)
            group.strategy = config.strategy or settings.balance
            group.eject_after = settings.eject_after if config.eject_after is None else config.eject_after
            group.eject_seconds = config.eject_seconds or settings.eject_seconds
            group.probe_interval = (
                settings.probe_interval if config.probe_interval is None else config.probe_interval
            )
            if config.max_concurrency == "auto":
                group.auto_capacity = True
            elif config.max_concurrency is not None:
                group.capacity = worker_share(config.max_concurrency, settings.workers)
        for group in groups:
            if group.limited:
                size = group.config.queue_size if group.config and group.config.queue_size else None
                timeout = group.config.queue_timeout if group.config and group.config.queue_timeout else None
                self.flow.configure(group, size or settings.queue_size, timeout or settings.queue_timeout)
        self.flow.forget({group.name for group in groups if group.limited})
        self.groups = groups
        self.catalogue.set_groups(groups, self.default)

    def group(self, name: str) -> Group | None:
        """A backend by its name."""
        return next((group for group in self.groups if group.name == name), None)

    # Replicas

    def balancer(self, group: Group) -> Balancer:
        return self.balancers[group.strategy]

    def pick(self, group: Group, tried: Iterable[Replica] = ()) -> Replica | None:
        """A replica of ``group`` for the next attempt, or None when every one has been tried."""
        chosen = self.choose([group], list(tried))
        return None if chosen is None else chosen[1]

    def full(self, groups: list[Group], tried: list[Replica]) -> bool:
        """Whether every ready replica of ``groups`` not yet tried is at its capacity: a
        request waits in the gateway rather than going elsewhere."""
        untried = [(g, r) for g in groups for r in g.replicas if r not in tried]
        pairs = [(g, r) for g, r in untried if r.available()] or untried  # as ``choose`` falls back
        return bool(pairs) and all(g.limited and not g.has_room(r) for g, r in pairs)

    def has_candidate(self, groups: list[Group], tried: list[Replica]) -> bool:
        return any(replica not in tried for group in groups for replica in group.replicas)

    def choose(
        self, groups: list[Group], tried: list[Replica], key: int | None = None
    ) -> tuple[Group, Replica] | None:
        """The backend and replica for the next attempt, among every untried replica of the
        backends that serve the request, each with its backend's weight, by the first
        backend's balancer (``key``: what of the request it goes by); None when none is
        left. Ejected and loading replicas are chosen only when no other is left (a fleet
        wrongly ejected whole must still serve): the one whose ejection ends first."""
        if not tried and len(groups) == 1 and len(groups[0].replicas) == 1:
            only = groups[0].replicas[0]  # one backend, one replica: the usual case
            if groups[0].limited and not groups[0].has_room(only):
                return None
            only.picks += 1
            return groups[0], only
        untried = [(g, r) for g in groups for r in g.replicas if r not in tried] if tried else None
        if untried is None:
            untried = [(g, r) for g in groups for r in g.replicas]
        ready = [pair for pair in untried if pair[1].available()]
        if any(group.limited for group in groups):
            # Only replicas with room; with none, the request waits (flow control).
            roomy = [pair for pair in ready or untried if pair[0].has_room(pair[1])]
            if not roomy:
                return None
            if ready:
                ready = roomy
            else:
                untried = roomy
        if ready:
            chosen = ready[0] if len(ready) == 1 else self.balancer(ready[0][0]).pick(ready, key)
        elif untried:
            chosen = min(untried, key=lambda pair: (pair[1].ejected_until, pair[1].loading))
        else:
            return None
        chosen[1].picks += 1
        return chosen

    # Background loops, for the app's lifetime

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """What runs for the app's lifetime; each loop idles when no backend needs it."""
        return [
            self.follow_lists(),
            self.run_probes(),
            self.run_scrapes(),
            self.run_discovery(),
            self.run_flow(),
        ]

    async def run_probes(self) -> None:
        await self.health.run(lambda: self.groups)

    async def run_scrapes(self) -> None:
        await run_scrapes(lambda: self.groups, self._spawn)

    async def run_flow(self) -> None:
        """Hand replicas that found room with no request of this gateway ending (a scrape, a
        replica back from ejection or found by DNS) to waiting requests."""
        while True:
            await asyncio.sleep(FLOW_TICK if self.flow.queues else 1.0)
            if self.flow.waiting():
                self.flow.dispatch()

    async def follow_lists(self) -> None:
        await self.catalogue.follow()

    async def run_discovery(self) -> None:
        """Look up every ``discovery: dns`` backend every ``discovery_interval`` seconds."""
        while True:
            await asyncio.sleep(self.settings.discovery_interval)
            await asyncio.gather(*(self._discover(group) for group in self.groups if group.discovered))

    # Lifecycle

    async def open(self) -> None:
        for group in self.groups:
            for replica in group.replicas:
                await replica.upstream.open()
        self._opened = True
        await asyncio.gather(*(self._discover(group) for group in self.groups if group.discovered))

    async def close(self) -> None:
        self.flow.close()
        self.catalogue.cancel()
        for task in self._background:
            task.cancel()
        for group in self.groups:
            for replica in group.replicas:
                await replica.upstream.close()

    # Changes to the fleet: DNS discovery, SIGHUP

    async def _discover(self, group: Group) -> None:
        assert group.config is not None
        assert group.config.url is not None
        try:
            urls = await replica_urls(group.config.url, self.resolve)
        except OSError as exc:
            # Kept as it is: a DNS hiccup must not empty a backend.
            logger.warning(
                "backend %s: cannot resolve %s (%s); keeping its replicas", group.name, group.config.url, exc
            )
            return
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
            self._spawn(self.catalogue.refresh(group))
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
                for replica in group.replicas:  # a key rotated in the file takes effect now
                    replica.upstream.set_auth(group.backend.auth_header)
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
        self.flow.dispatch()  # capacities may have grown
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
                **self.flow.describe(group),
                "replicas": [
                    {
                        "url": replica.url,
                        "state": replica.state(now),
                        "in_flight": replica.in_flight,
                        **({"capacity": group.replica_capacity(replica)} if group.limited else {}),
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
