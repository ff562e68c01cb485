"""Outlier detection: which answers count against a replica, and when it is ejected.

Passive health, as Envoy's outlier detection has it: a refused connection (or one not made
within the connect timeout) ejects a replica at once; ``eject_after`` timeouts or 5xx
answers in a row eject it (the backend's own ``eject_after``, else ``--eject-after``; 0
turns it off, as for the one backend of ``--backend-url``, which has nowhere else to go).
4xx answers and clients that leave never count, nor do the gateway's own failures (out of
file descriptors, of local ports, of buffers), which say nothing of the replica. An
ejection lasts ``eject_seconds``, doubling with each one in a row up to
``MAX_EJECTION_DOUBLINGS``; active probes (``gateway.fleet.probes``) bring a replica back once
it has passed.
"""

from __future__ import annotations

import errno
import logging
import time

from gateway.client import ConnectFailed, ConnectTimeout, UpstreamError
from gateway.fleet.replicas import Group, Replica

logger = logging.getLogger("gateway.routing")

LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL, errno.ENOBUFS, errno.ENOMEM})
MAX_EJECTION_DOUBLINGS = 6  # 2 s doubles to 128 s at most


class OutlierDetection:
    def succeeded(self, group: Group, replica: Replica) -> None:
        replica.failures = 0
        if replica.ejections:
            # Back and serving for as long as its last ejection: the next one starts short.
            last = group.eject_seconds * 2 ** min(replica.ejections - 1, MAX_EJECTION_DOUBLINGS)
            if time.monotonic() - replica.ramp_from > last:
                replica.ejections = 0

    def failed(self, group: Group, replica: Replica, exc: UpstreamError | None = None) -> None:
        """A timeout, a 5xx (``exc`` None) or a connection failure."""
        if not group.eject_after:
            return
        if isinstance(exc, ConnectFailed) and exc.os_error.errno in LOCAL_ERRNOS:
            return
        replica.failures += 1
        refused = isinstance(exc, ConnectFailed | ConnectTimeout)
        if refused or replica.failures >= group.eject_after:
            self.eject(group, replica)

    def eject(self, group: Group, replica: Replica) -> None:
        """Take ``replica`` out until a probe, no sooner than the backoff, finds it ready."""
        if replica.ejected:
            return
        now = time.monotonic()
        seconds = group.eject_seconds * 2 ** min(replica.ejections, MAX_EJECTION_DOUBLINGS)
        replica.ejected = True
        replica.ejections += 1
        replica.ejected_total += 1
        replica.failures = 0
        replica.ejected_until = replica.next_probe = now + seconds
        logger.warning("replica %s of backend %s ejected for %g s", replica.url, group.name, seconds)
