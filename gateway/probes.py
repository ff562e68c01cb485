"""Active health checks: each replica's readiness route, asked on a schedule.

Every ``probe_interval`` seconds each replica's readiness route (the adapter's; no
generation) is asked, and an ejected one as soon as its ejection may end. A replica that
says it is loading gets no traffic; one that is ready again after an ejection or a load
ramps up over ``slow_start`` seconds; one that fails the probe is ejected (for longer each
time in a row, by outlier detection's backoff).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from adapters.base import Readiness
from gateway.client import UpstreamError
from gateway.outlier import OutlierDetection
from gateway.replicas import Group, Replica

logger = logging.getLogger("gateway.routing")


class HealthChecker:
    def __init__(self, outlier: OutlierDetection, interval: float, timeout: float) -> None:
        self.outlier = outlier
        self.interval = interval
        self.timeout = min(timeout, interval)
        """How long a probe may take in the loop: never longer than the interval."""

    async def probe(self, group: Group, replica: Replica, seconds: float) -> Readiness | None:
        """Ask ``replica`` whether it is ready; None when it did not answer."""
        now = time.monotonic()
        adapter = group.backend.adapter
        try:
            status = await replica.upstream.health(adapter.health_path, adapter.health_fallback_path, seconds)
        except UpstreamError as exc:
            replica.last_probe, replica.last_probe_at = f"failed: {type(exc).__name__}", now
            return None
        state = adapter.readiness(status)
        replica.last_probe, replica.last_probe_at = f"{state.value} ({status})", now
        return state

    async def probe_all(self, groups: list[Group], seconds: float) -> None:
        await asyncio.gather(
            *(self.check(group, replica, seconds) for group in groups for replica in group.replicas)
        )

    async def check(self, group: Group, replica: Replica, seconds: float) -> None:
        """Probe ``replica`` and act on the answer."""
        state = await self.probe(group, replica, seconds)
        now = time.monotonic()
        replica.next_probe = now + self.interval
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
        elif self.outlier.enabled:
            replica.loading = False
            if replica.ejected and due:
                replica.ejected = False  # still failing: ejected again, for longer
            self.outlier.eject(group, replica)
        if replica.ejected:
            replica.next_probe = max(replica.ejected_until, now + min(self.interval, 1.0))

    async def run(self, groups: Callable[[], list[Group]]) -> None:
        """Probe every replica when it is due, for the app's lifetime."""
        while True:
            now = time.monotonic()
            due = [(g, r) for g in groups() for r in g.replicas if r.next_probe <= now]
            try:
                await asyncio.gather(*(self.check(g, r, self.timeout) for g, r in due))
            except Exception:  # a probe must never end the loop
                logger.exception("health probes failed")
            now = time.monotonic()
            wake = min((r.next_probe for g in groups() for r in g.replicas), default=now + self.interval)
            await asyncio.sleep(min(max(wake - now, 0.05), self.interval))
