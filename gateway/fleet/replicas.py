"""What the gateway knows of each backend and its replicas: their state, shared by the router
and the balancing strategies, which read it and change it.

A ``Group`` is one configured backend (its runtime, models, aliases, strategy) with its
``Replica``s; a replica is one server with its pool, its requests in flight, its health
(failures, ejections, probes) and its last load report (``Load``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters import ADAPTERS
from gateway.config.backends import BackendConfig, Strategy
from gateway.fleet.backend import Backend
from gateway.fleet.upstream import Upstream

# Replica states, as /admin/backends and the metrics show them.
READY = "ready"
EJECTED = "ejected"
LOADING = "loading"


@dataclass(frozen=True, slots=True)
class Load:
    """One replica's report: requests waiting and running, and the share of KV cache in use."""

    waiting: float
    running: float
    kv_use: float

    def as_dict(self) -> dict[str, float]:
        return {"waiting": self.waiting, "running": self.running, "kv_use": round(self.kv_use, 4)}


@dataclass(eq=False)
class Replica:
    url: str
    upstream: Upstream
    weight: float = 1.0
    in_flight: int = 0
    picks: int = 0
    failures: int = 0
    """Failures in a row (timeouts, 5xx, refused connections); a success resets it."""
    ejections: int = 0
    """Ejections in a row: each one lasts twice as long as the one before. Reset once the
    replica has served well for as long as its last ejection lasted."""
    ejected_total: int = 0
    ejected: bool = False
    ejected_until: float = 0.0
    """The earliest a probe may bring an ejected replica back."""
    next_probe: float = 0.0
    loading: bool = False
    ramp_from: float = 0.0
    """When the replica came back; it gets its full share ``slow_start`` seconds later."""
    last_probe: str | None = None
    last_probe_at: float | None = None
    current: float = 0.0
    """Smooth weighted round robin's running score."""
    seed: int = 0
    """Its place in affinity keys' orders (from its URL)."""
    reported: Load | None = None
    """What its metrics said at the last scrape (``strategy: queue``)."""
    scraped_at: float | None = None
    in_flight_at_scrape: int = 0
    """This gateway's requests to it when the scrape was answered."""
    batch_seen: float = 0.0
    """The most requests it has reported running at once: its batch, as far as is known."""
    capacity_seen: float = 0.0
    """The most requests it has reported running while others waited in its own queue: what
    it runs at most (``max_concurrency: auto``); 0 until it has been full."""
    scraping: bool = False
    next_scrape: float = 0.0
    last_scrape: str | None = None

    def state(self, now: float) -> str:
        if self.ejected:
            return EJECTED
        if self.loading:
            return LOADING
        return READY

    def available(self) -> bool:
        return not self.ejected and not self.loading

    def share(self, now: float, slow_start: float) -> float:
        """Its weight, cut while it ramps up after coming back."""
        weight = self.weight
        if slow_start and now - self.ramp_from < slow_start:
            weight *= max(0.1, (now - self.ramp_from) / slow_start)
        return weight

    def load(self, now: float, slow_start: float) -> float:
        return (self.in_flight + 1) / self.share(now, slow_start)


@dataclass(eq=False)
class Group:
    """One configured backend: a runtime, its replicas, the models it serves."""

    backend: Backend
    replicas: list[Replica]
    models: frozenset[str] | None = None
    """Configured; None means the backend's own list decides."""
    aliases: dict[str, str] = field(default_factory=dict)
    default: bool = False
    listed: list[dict[str, object]] = field(default_factory=list)
    """The entries of the backend's last model list."""
    listed_at: float | None = None
    config: BackendConfig | None = None
    """As configured (None for the one backend of --backend-url)."""
    strategy: Strategy = Strategy.LEAST_OUTSTANDING
    """Its ``strategy``, else ``--balance``."""
    eject_after: int = 3
    """Failures in a row that eject one of its replicas; 0: outlier detection is off."""
    eject_seconds: float = 2.0
    probe_interval: float = 5.0
    """Seconds between active probes of each of its replicas; 0: none."""
    capacity: int | None = None
    """Requests of this gateway (this worker) each replica runs at once (``max_concurrency``)."""
    auto_capacity: bool = False
    """``max_concurrency: auto``: each replica's capacity learnt from its own reports."""

    @property
    def limited(self) -> bool:
        """Whether requests may wait in the gateway for its replicas (flow control)."""
        return self.capacity is not None or self.auto_capacity

    def has_room(self, replica: Replica) -> bool:
        """Whether ``replica`` may take one more request now."""
        if self.capacity is not None:
            return replica.in_flight < self.capacity
        if not self.auto_capacity or not replica.capacity_seen or replica.reported is None:
            return True
        load = replica.reported
        # What it runs and holds now: its last report, and this gateway's requests since.
        outstanding = max(
            load.waiting + load.running + replica.in_flight - replica.in_flight_at_scrape, replica.in_flight
        )
        return outstanding < replica.capacity_seen

    def replica_capacity(self, replica: Replica) -> float | None:
        """Its capacity as configured or learnt, for the operators; None: none known."""
        if self.capacity is not None:
            return self.capacity
        return replica.capacity_seen or None if self.auto_capacity else None

    @property
    def scrape_interval(self) -> float:
        return self.config.scrape_interval if self.config is not None else 1.0

    @property
    def affinity_spread(self) -> float:
        return self.config.affinity_spread if self.config is not None else 0.25

    @property
    def scraped(self) -> bool:
        """Whether its replicas' metrics are read: ``strategy: queue`` on a runtime that has them."""
        adapter = self.backend.adapter
        return (
            self.strategy == Strategy.QUEUE
            and adapter.load_signals is not None
            and adapter.metrics_path is not None
        )

    @property
    def weight(self) -> float:
        return self.config.weight if self.config is not None else 1.0

    @property
    def discovered(self) -> bool:
        return self.config is not None and self.config.discovery == "dns"

    @property
    def name(self) -> str:
        return self.backend.name

    def model_names(self) -> set[str]:
        """The names clients may use for this backend's models (aliases included)."""
        names = set(self.models) if self.models is not None else {str(e["id"]) for e in self.listed}
        return names | set(self.aliases)

    def backend_model(self, model: str) -> str:
        return self.aliases.get(model, model)


def group_from_config(config: BackendConfig) -> Group:
    key = config.key()
    auth = (b"authorization", f"Bearer {key}".encode()) if key else None
    backend = Backend(
        adapter=ADAPTERS[config.kind], url=config.replica_urls[0], auth_header=auth, label=config.name
    )
    return Group(
        backend,
        [],
        models=frozenset(config.models) if config.models is not None else None,
        aliases=dict(config.aliases),
        default=config.default,
        config=config,
    )
