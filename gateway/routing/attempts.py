"""One request's tries at the backends that serve it.

An ``Attempt`` owns what a try changes: the replica it holds is counted in flight until
the answer ends (``end``); each outcome goes to outlier detection (``failed``,
``answered``); and before another try it asks whether one may be made (a replica left,
time left, a body that can be sent again, the retry budget) and chooses it. Where every
replica with a capacity is full, it ``waits`` in the gateway (flow control), keeping its
place when it waits again after a failed try. The proxy only sends, reads and relays.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.client import PoolTimeout, UpstreamError
from gateway.fleet.replicas import Group, Replica
from gateway.routing.flow import Ticket
from gateway.routing.router import Router

logger = logging.getLogger("gateway.proxy")

# Answers after which a request goes to another replica, if one is left and the budget allows.
FAILOVER_STATUSES = frozenset({429, 502, 503, 504})


class Attempt:
    def __init__(
        self,
        router: Router,
        groups: list[Group],
        key: int | None,
        repeatable: bool,
        deadline: float,
        request_id: str,
        ticket: Ticket | None = None,
    ) -> None:
        self.router = router
        self.groups = groups
        self.key = key
        """What of the request the balancer goes by (affinity), if anything."""
        self.repeatable = repeatable
        """Whether the body may be sent again (an upload streamed through is not kept)."""
        self.deadline = deadline
        self.request_id = request_id
        self.tried: list[Replica] = []
        self.taken: tuple[Group, Replica] | None = None
        """The backend and replica of the current try, counted in the replica's
        ``in_flight`` until ``end``."""
        self.ticket = ticket
        """Its flow, priority and cost, where its backend has a capacity."""
        self.waits = False
        """Every replica it may go to is at its capacity: it ``wait``s before its try."""
        self._seq = -1
        self._charged = False

    def begin(self) -> bool:
        """Choose the first replica (or find that it waits); False when none is known yet
        (DNS discovery)."""
        self.router.budget.admit()
        return self._take(self.router.choose(self.groups, self.tried, self.key))

    async def wait(self) -> float:
        """Wait in the gateway's queue for a replica with room; the seconds waited.
        Overloaded when the queue is full or the wait too long."""
        assert self.ticket is not None  # only a request with a ticket is told to wait
        flow = self.router.flow
        if self._seq < 0:
            self._seq = flow.next_seq()
        began = time.monotonic()
        chosen = await flow.wait(self.groups, self.tried, self.key, self.ticket, self._seq)
        self.waits = False
        self.taken = chosen  # counted in its in_flight by the dispatch
        self._charge()
        return time.monotonic() - began

    def current(self) -> tuple[Group, Replica]:
        """The backend and replica of the current try (between ``begin`` and ``end``)."""
        if self.taken is None:
            raise RuntimeError("no try is under way")
        return self.taken

    def failed(self, exc: UpstreamError, why: str) -> bool:
        """The try got no answer (``why``, as the client would be told); True when another
        replica takes the request."""
        group, replica = self._release()
        if not isinstance(exc, PoolTimeout):  # the gateway's own limit, not the replica
            self.router.outlier.failed(group, replica, exc)
        return self._fail_over(group, replica, why)

    def answered(self, status: int) -> bool:
        """The try got an answer with ``status``; True when it is not to be relayed because
        another replica takes the request (the caller closes the answer)."""
        group, replica = self.current()
        if status >= 500:
            self.router.outlier.failed(group, replica)
        else:
            self.router.outlier.succeeded(group, replica)
        if status not in FAILOVER_STATUSES:
            return False
        self.tried.append(replica)
        chosen = self._next()
        if chosen is None:
            return False
        self._release()
        self._announce(group, replica, f"it answered {status}")
        return self._take(chosen)

    def end(self, used: int | None = None) -> None:
        """The answer is over (or there is none): the replica is no longer held; what the
        request ``used`` (tokens), where known, corrects its key's share."""
        if self._charged and used is not None and self.ticket is not None:
            # Before the slot is handed on: the next is chosen by what keys really used.
            self.router.flow.charge(self.ticket, used - self.ticket.cost)
        if self.taken is not None:
            self._release()

    def _fail_over(self, group: Group, replica: Replica, why: str) -> bool:
        self.tried.append(replica)
        chosen = self._next()
        if chosen is None:
            if not self._may_wait():
                return False
            self._announce(group, replica, why)
            self.waits = True
            return True
        self._announce(group, replica, why)
        return self._take(chosen)

    def _may_wait(self) -> bool:
        """Whether a request whose other replicas are all full waits for one (flow control)."""
        router = self.router
        return (
            self.ticket is not None
            and self.repeatable
            and asyncio.get_running_loop().time() < self.deadline
            and router.full(self.groups, self.tried)
        )

    def _next(self) -> tuple[Group, Replica] | None:
        """Another replica for a request that failed before any answer, if it may have one."""
        router = self.router
        if not self.repeatable:
            return None
        if asyncio.get_running_loop().time() >= self.deadline or not router.has_candidate(
            self.groups, self.tried
        ):
            return None
        if not router.budget.may_retry():
            if router.on_budget_exhausted is not None:
                router.on_budget_exhausted()
            return None
        return router.choose(self.groups, self.tried, self.key)

    def _take(self, chosen: tuple[Group, Replica] | None) -> bool:
        if chosen is None:
            if self.ticket is not None and self.router.full(self.groups, self.tried):
                self.waits = True
                return True
            return False
        self.taken = chosen
        chosen[1].in_flight += 1
        self._charge()
        return True

    def _charge(self) -> None:
        """Its expected cost counted to its key's share once, when it first gets a replica."""
        if self.ticket is not None and not self._charged:
            self._charged = True
            self.router.flow.charge(self.ticket, self.ticket.cost)

    def _release(self) -> tuple[Group, Replica]:
        group, replica = self.current()
        replica.in_flight -= 1
        self.taken = None
        if group.limited:
            self.router.flow.freed(group)
        return group, replica

    def _announce(self, group: Group, replica: Replica, why: str) -> None:
        if self.router.on_failover is not None:
            self.router.on_failover(group.name)
        logger.info(
            "request %s: replica %s of backend %s failed (%s); trying another",
            self.request_id,
            replica.url,
            group.name,
            why,
        )
