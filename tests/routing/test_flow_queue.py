"""The flow control's queues on their own (gateway/routing/flow.py): the order waiters leave
in, what refuses them, and what it keeps, with a router of one replica and no network."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gateway.config.settings import Settings
from gateway.core.errors import Overloaded
from gateway.routing import flow as flow_module
from gateway.routing.flow import Ticket
from gateway.routing.router import Router


def router(capacity: int = 1, queue_size: int = 10, queue_timeout: float = 30) -> Router:
    settings = Settings(
        backend_url="http://127.0.0.1:9",
        max_concurrency=capacity,
        queue_size=queue_size,
        queue_timeout=queue_timeout,
    )
    return Router.from_settings(settings)


def take_the_slot(r: Router) -> None:
    r.groups[0].replicas[0].in_flight = r.groups[0].capacity or 0


def free_the_slot(r: Router) -> None:
    group = r.groups[0]
    group.replicas[0].in_flight -= 1
    r.flow.freed(group)


async def waiter(r: Router, ticket: Ticket, seq: int | None = None) -> asyncio.Task[object]:
    flow = r.flow
    task = asyncio.ensure_future(
        flow.wait(r.groups, [], None, ticket, flow.next_seq() if seq is None else seq)
    )
    await asyncio.sleep(0)  # queued
    return task


async def test_waiters_leave_by_priority_then_share_then_arrival() -> None:
    r = router()
    take_the_slot(r)
    r.flow.charge(Ticket("busy"), 100)  # served of late
    left: list[str] = []

    def record(name: str) -> Callable[[object], None]:
        return lambda _: left.append(name)

    tickets = [Ticket("busy", 0), Ticket("busy", 0), Ticket("idle", 0), Ticket("urgent", 5)]
    for ticket in tickets:
        (await waiter(r, ticket)).add_done_callback(record(ticket.flow))
    for _ in tickets:
        free_the_slot(r)  # hands the slot to one waiter at once
        for _ in range(3):  # its task resumes, ends, and its callback runs
            await asyncio.sleep(0)
    assert left == ["urgent", "idle", "busy", "busy"]


async def test_a_waiter_back_after_a_failed_try_keeps_its_place() -> None:
    r = router()
    take_the_slot(r)
    first = r.flow.next_seq()
    later = await waiter(r, Ticket("k"))
    back = await waiter(r, Ticket("k"), seq=first)  # it had waited before the other came
    free_the_slot(r)
    await asyncio.sleep(0)
    assert back.done()
    assert not later.done()
    later.cancel()


async def test_a_full_queue_displaces_the_newest_lower_priority_or_refuses() -> None:
    r = router(queue_size=2)
    take_the_slot(r)
    low_old = await waiter(r, Ticket("a", 0))
    low_new = await waiter(r, Ticket("b", 0))
    with pytest.raises(Overloaded) as refused:
        await r.flow.wait(r.groups, [], None, Ticket("c", 0), r.flow.next_seq())
    assert refused.value.code == "queue_full"
    high = await waiter(r, Ticket("d", 3))
    await asyncio.sleep(0)
    assert isinstance(low_new.exception(), Overloaded)
    assert not low_old.done()
    assert r.flow.describe(r.groups[0])["queue"] == {
        "waiting": 2, "by_priority": {"0": 1, "3": 1}, "size": 2, "timeout_s": 30,
    }  # fmt: skip
    for task in (low_old, high):
        task.cancel()


async def test_a_slot_handed_to_a_waiter_that_leaves_goes_to_the_next() -> None:
    r = router()
    take_the_slot(r)
    gone = await waiter(r, Ticket("a"))
    stays = await waiter(r, Ticket("b"))
    free_the_slot(r)  # handed to the first, which leaves before it runs
    gone.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert gone.cancelled()
    assert stays.done()
    assert r.groups[0].replicas[0].in_flight == 1


async def test_stopping_and_removing_a_backend_refuse_waiters() -> None:
    r = router()
    take_the_slot(r)
    task = await waiter(r, Ticket("a"))
    r.flow.forget(set())  # a reload removed the backend
    await asyncio.sleep(0)
    assert isinstance(task.exception(), Overloaded)
    assert task.exception().code == "backend_gone"  # type: ignore[union-attr]
    r.flow.configure(r.groups[0], 10, 30)
    task = await waiter(r, Ticket("a"))
    r.flow.close()
    await asyncio.sleep(0)
    assert task.exception().code == "shutdown"  # type: ignore[union-attr]
    with pytest.raises(Overloaded, match="shutting down"):
        await r.flow.wait(r.groups, [], None, Ticket("a"), 0)


async def test_retry_after_follows_the_rate_slots_free_at() -> None:
    r = router(queue_timeout=20)
    queue = r.flow.queues[r.groups[0].name]
    assert queue.retry_after() == 20  # nothing freed yet: the timeout
    now = asyncio.get_running_loop().time()
    for n in range(200):
        queue.freed(now + n * 0.01)  # a hundred a second
    assert 1 <= queue.retry_after() <= 2
    queue.count = 10_000
    assert queue.retry_after() == 21  # never past the timeout and a second


def test_the_shares_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flow_module, "MAX_FLOWS", 100)
    r = router()
    for n in range(1000):
        r.flow.charge(Ticket(f"ip:10.0.{n // 256}.{n % 256}"), 10)
    assert len(r.flow.flows) <= 100
