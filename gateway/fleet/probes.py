"""Active health checks: each replica's readiness route, asked on a schedule.

Every ``probe_interval`` seconds (the backend's own, else ``--probe-interval``; 0: never)
each replica's readiness route (the adapter's; no
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
from gateway.fleet.outlier import OutlierDetection
from gateway.fleet.replicas import Group, Replica

logger = logging.getLogger("gateway.routing")

IDLE = 1.0
"""The longest the loop sleeps: a backend added by a reload is probed within it."""


class HealthChecker:
    def __init__(self, outlier: OutlierDetection, timeout: float) -> None:
        self.outlier = outlier
        self.timeout = timeout
        """How long a probe may take (in the loop, never longer than its interval)."""

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
        interval = group.probe_interval or IDLE
        replica.next_probe = now + interval
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
        elif group.eject_after:
            replica.loading = False
            if replica.ejected and due:
                replica.ejected = False  # still failing: ejected again, for longer
            self.outlier.eject(group, replica)
        if replica.ejected:
            replica.next_probe = max(replica.ejected_until, now + min(interval, 1.0))

    async def run(self, groups: Callable[[], list[Group]]) -> None:
        """Probe every replica when it is due, for the app's lifetime."""
        while True:
            now = time.monotonic()
            probed = [g for g in groups() if g.probe_interval]
            due = [(g, r) for g in probed for r in g.replicas if r.next_probe <= now]
            try:
                await asyncio.gather(*(self.check(g, r, min(self.timeout, g.probe_interval)) for g, r in due))
            except Exception:  # a probe must never end the loop
                logger.exception("health probes failed")
            now = time.monotonic()
            wake = min((r.next_probe for g in probed for r in g.replicas), default=now + IDLE)
            await asyncio.sleep(min(max(wake - now, 0.05), IDLE))
