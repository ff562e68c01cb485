"""Flow control: requests held in the gateway while every replica of their backend is at its
capacity, and dispatched when one has room: by priority first, then to the key served least
of late (tokens, prompt and generated, decaying over a minute, divided by the key's weight),
then in arrival order.

A backend with ``max_concurrency`` has a ``Queue``. A request that finds every ready replica
of its backends full waits in the queue of the first; each time a replica of a backend with a
queue frees a slot, the best waiter that replica's backend may serve takes the slot at once
(it is handed the replica, already counted, so no other request can take it between). A
queue holds at most ``queue_size`` waiters: one more displaces the newest waiter of a
strictly lower priority, or is refused; a waiter is refused after ``queue_timeout`` seconds.
A refusal is 503 ``overloaded`` with ``Retry-After`` from the rate slots have been freeing.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.core.errors import Overloaded
from gateway.fleet.replicas import Group, Replica

SERVED_HALF_LIFE = 60.0
"""Seconds over which what a key was served counts half as much: the fair share's window."""
MAX_FLOWS = 10_000
"""Keys' shares remembered at most; past it, those with nothing waiting are forgotten (an open
gateway's flows are client addresses, which a client can multiply)."""
RATE_HALF_LIFE = 10.0
"""Seconds over which the rate slots free at counts half as much (for Retry-After)."""

Chooser = Callable[[list[Group], list[Replica], "int | None"], "tuple[Group, Replica] | None"]


@dataclass(frozen=True, slots=True)
class Ticket:
    """What flow control knows of one request: its key's flow, priority, weight and cost."""

    flow: str
    """The key's name (the client's address without a key)."""
    priority: int = 0
    weight: float = 1.0
    cost: float = 1.0
    """Tokens it is expected to use (its reservation, else an estimate from its body)."""


class Flow:
    """One key's waiters in one band, and what it was served of late."""

    __slots__ = ("name", "served", "stamp", "waiters", "weight")

    def __init__(self, name: str, weight: float) -> None:
        self.name = name
        self.weight = weight
        self.served = 0.0
        self.stamp = time.monotonic()
        self.waiters: deque[Waiter] = deque()

    def share(self, now: float) -> float:
        """Tokens served of late, decayed, per unit of weight."""
        return self.served * _decay(now - self.stamp, SERVED_HALF_LIFE) / self.weight

    def add(self, tokens: float, now: float) -> None:
        # A correction (less used than expected) takes back no more than was counted.
        self.served = max(self.served * _decay(now - self.stamp, SERVED_HALF_LIFE) + tokens, 0.0)
        self.stamp = now


@dataclass(eq=False)
class Waiter:
    groups: list[Group]
    tried: list[Replica]
    key: int | None
    ticket: Ticket
    seq: int
    """Its place in arrival order, kept when it waits again after a failed attempt."""
    since: float
    future: asyncio.Future[tuple[Group, Replica]] = field(repr=False)


class Queue:
    """The waiters of one backend with a capacity."""

    def __init__(self, group: Group, size: int, timeout: float) -> None:
        self.group = group
        self.size = size
        self.timeout = timeout
        self.bands: dict[int, dict[str, Flow]] = {}
        """Priority, then flow name, to the flows with waiters."""
        self.count = 0
        self.freed_rate = 0.0
        """Slots freed a second, decayed (``RATE_HALF_LIFE``)."""
        self._rate_stamp = time.monotonic()

    def retry_after(self) -> int:
        """Seconds after which a refused client may find room: the waiters ahead at the rate
        slots have been freeing, at least 1, at most ``timeout`` + 1."""
        rate = self.freed_rate * _decay(time.monotonic() - self._rate_stamp, RATE_HALF_LIFE)
        if rate <= 0:
            return max(1, math.ceil(self.timeout))
        return max(1, min(math.ceil((self.count + 1) / rate), math.ceil(self.timeout) + 1))

    def freed(self, now: float) -> None:
        decay = _decay(now - self._rate_stamp, RATE_HALF_LIFE)
        # An exponentially weighted rate: each event adds 1 / the window's length.
        self.freed_rate = self.freed_rate * decay + math.log(2) / RATE_HALF_LIFE
        self._rate_stamp = now

    def add(self, waiter: Waiter, flows: dict[str, Flow]) -> None:
        band = self.bands.setdefault(waiter.ticket.priority, {})
        flow = band.get(waiter.ticket.flow)
        if flow is None:
            flow = band[waiter.ticket.flow] = flows.setdefault(
                waiter.ticket.flow, Flow(waiter.ticket.flow, waiter.ticket.weight)
            )
        # A waiter back after a failed attempt keeps its place among its key's.
        if flow.waiters and flow.waiters[-1].seq > waiter.seq:
            flow.waiters.append(waiter)
            ordered = sorted(flow.waiters, key=lambda w: w.seq)
            flow.waiters.clear()
            flow.waiters.extend(ordered)
        else:
            flow.waiters.append(waiter)
        self.count += 1

    def remove(self, waiter: Waiter) -> bool:
        band = self.bands.get(waiter.ticket.priority)
        flow = band.get(waiter.ticket.flow) if band is not None else None
        if band is None or flow is None or waiter not in flow.waiters:
            return False
        flow.waiters.remove(waiter)
        self.count -= 1
        if not flow.waiters:
            del band[flow.name]
            if not band:
                del self.bands[waiter.ticket.priority]
        return True

    def best(self, now: float) -> Waiter | None:
        """The next to dispatch: highest priority, then least served, then first come."""
        if not self.bands:
            return None
        band = self.bands[max(self.bands)]
        flow = min(band.values(), key=lambda f: (f.share(now), f.waiters[0].seq))
        return flow.waiters[0]

    def newest_below(self, priority: int) -> Waiter | None:
        """The newest waiter of the lowest priority, if that is below ``priority``."""
        if not self.bands:
            return None
        lowest = min(self.bands)
        if lowest >= priority:
            return None
        return max((flow.waiters[-1] for flow in self.bands[lowest].values()), key=lambda w: w.seq)

    def by_priority(self) -> dict[int, int]:
        return {p: sum(len(f.waiters) for f in band.values()) for p, band in sorted(self.bands.items())}


class FlowControl:
    """The queues of every backend with a capacity, and the keys' flows."""

    def __init__(self) -> None:
        self.queues: dict[str, Queue] = {}
        """Backend name to its queue."""
        self.flows: dict[str, Flow] = {}
        self.chooser: Chooser | None = None
        """The router's choice of a replica with room (set by the router)."""
        self._seq = itertools.count()
        self.on_wait: Callable[[Group, Ticket, float, str], None] | None = None
        """Told each waiter's end: its backend, ticket, seconds waited and outcome
        (dispatched, full, timeout, abandoned, shutdown)."""
        self.closed = False

    def configure(self, group: Group, size: int, timeout: float) -> None:
        queue = self.queues.get(group.name)
        if queue is None:
            self.queues[group.name] = Queue(group, size, timeout)
        else:
            queue.group, queue.size, queue.timeout = group, size, timeout

    def forget(self, names: set[str]) -> None:
        """Backends gone (a reload): their waiters are refused."""
        for name in list(self.queues):
            if name not in names:
                queue = self.queues.pop(name)
                self._refuse_all(queue, "backend_gone", "its backend was removed while it waited")

    def waiting(self) -> int:
        return sum(queue.count for queue in self.queues.values())

    def describe(self, group: Group) -> dict[str, object]:
        """``group``'s queue for /admin/backends (nothing for a backend without a capacity)."""
        queue = self.queues.get(group.name)
        if queue is None:
            return {}
        return {
            "queue": {
                "waiting": queue.count,
                "by_priority": {str(p): n for p, n in queue.by_priority().items()},
                "size": queue.size,
                "timeout_s": queue.timeout,
            }
        }

    def next_seq(self) -> int:
        return next(self._seq)

    async def wait(
        self, groups: list[Group], tried: list[Replica], key: int | None, ticket: Ticket, seq: int
    ) -> tuple[Group, Replica]:
        """Wait for a replica of ``groups`` with room; it comes counted in its ``in_flight``.
        Overloaded when the queue is full or the wait too long."""
        queue = self.queues.get(groups[0].name)
        if queue is None or self.closed:
            raise Overloaded(
                "the gateway is shutting down" if self.closed else "every replica is at its capacity",
                code="shutting_down" if self.closed else "queue_full",
                headers={"retry-after": "1"},
            )
        now = time.monotonic()
        if queue.count >= queue.size:
            displaced = queue.newest_below(ticket.priority)
            if displaced is None:
                self._report(queue.group, ticket, 0.0, "full")
                raise _full(queue)
            queue.remove(displaced)
            self._report(queue.group, displaced.ticket, now - displaced.since, "full")
            displaced.future.set_exception(_full(queue))
        loop = asyncio.get_running_loop()
        waiter = Waiter(groups, tried, key, ticket, seq, now, loop.create_future())
        queue.add(waiter, self.flows)
        handle = loop.call_later(queue.timeout, self._expire, queue, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if queue.remove(waiter):
                self._report(queue.group, ticket, time.monotonic() - now, "abandoned")
            elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                # Handed a replica as it was cancelled: the slot goes to the next waiter.
                _, replica = waiter.future.result()
                replica.in_flight -= 1
                self.dispatch()
            raise
        finally:
            handle.cancel()

    def _expire(self, queue: Queue, waiter: Waiter) -> None:
        if queue.remove(waiter):
            self._report(queue.group, waiter.ticket, time.monotonic() - waiter.since, "timeout")
            waiter.future.set_exception(
                Overloaded(
                    f"no replica of {queue.group.name} had room within {queue.timeout:g} s",
                    code="queue_timeout",
                    headers={"retry-after": str(queue.retry_after())},
                )
            )

    def charge(self, ticket: Ticket, tokens: float) -> None:
        """What a key was served (the difference, once its answer's usage is known)."""
        if tokens:
            known = self.flows.get(ticket.flow)
            if known is None:
                if len(self.flows) >= MAX_FLOWS:
                    self.flows = {name: f for name, f in self.flows.items() if f.waiters}
                known = self.flows[ticket.flow] = Flow(ticket.flow, ticket.weight)
            known.add(tokens, time.monotonic())

    def freed(self, group: Group) -> None:
        """A slot freed on a replica of ``group``: waiters that may use it are dispatched.
        With none waiting, nothing is done (the rate slots free at matters to waiters only)."""
        if not any(queue.count for queue in self.queues.values()):
            return
        queue = self.queues.get(group.name)
        if queue is not None:
            queue.freed(time.monotonic())
        self.dispatch()

    def dispatch(self) -> None:
        """Hand every replica with room to the best waiter that may use it."""
        chooser = self.chooser
        waiting = [queue for queue in self.queues.values() if queue.count]
        if chooser is None or not waiting:
            return
        now = time.monotonic()
        for queue in sorted(waiting, key=_top_priority, reverse=True):
            while queue.count:
                waiter = queue.best(now)
                if waiter is None:
                    break
                chosen = chooser(waiter.groups, waiter.tried, waiter.key)
                if chosen is None:
                    break
                queue.remove(waiter)
                chosen[1].in_flight += 1
                self._report(queue.group, waiter.ticket, now - waiter.since, "dispatched")
                waiter.future.set_result(chosen)

    def close(self) -> None:
        """Shutting down: every waiter is refused."""
        self.closed = True
        for queue in self.queues.values():
            self._refuse_all(queue, "shutdown", "the gateway is shutting down")

    def _refuse_all(self, queue: Queue, outcome: str, message: str) -> None:
        now = time.monotonic()
        for band in list(queue.bands.values()):
            for flow in list(band.values()):
                for waiter in list(flow.waiters):
                    queue.remove(waiter)
                    self._report(queue.group, waiter.ticket, now - waiter.since, outcome)
                    waiter.future.set_exception(
                        Overloaded(message, code=outcome, headers={"retry-after": "1"})
                    )

    def _report(self, group: Group, ticket: Ticket, waited: float, outcome: str) -> None:
        if self.on_wait is not None:
            self.on_wait(group, ticket, waited, outcome)


def _decay(seconds: float, half_life: float) -> float:
    """What is left of 1 after ``seconds`` that halve it every ``half_life``."""
    return math.exp(-seconds * math.log(2) / half_life)


def _top_priority(queue: Queue) -> int:
    return max(queue.bands) if queue.bands else -(2**31)


def _full(queue: Queue) -> Overloaded:
    return Overloaded(
        f"every replica of {queue.group.name} is at its capacity and {queue.count} requests wait",
        code="queue_full",
        headers={"retry-after": str(queue.retry_after())},
    )
