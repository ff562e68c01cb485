"""``Alarm``: a deadline moved often that keeps one timer."""

from __future__ import annotations

import asyncio

from gateway.core.alarm import Alarm


async def test_it_goes_off_once_at_its_time_and_not_when_cleared() -> None:
    loop = asyncio.get_running_loop()
    rung: list[float] = []
    alarm = Alarm(loop, lambda: rung.append(loop.time()))
    start = loop.time()
    alarm.set(start + 0.05)
    await asyncio.sleep(0.15)
    assert len(rung) == 1
    assert rung[0] >= start + 0.05
    assert alarm.when is None
    alarm.set(loop.time() + 0.05)
    alarm.clear()
    await asyncio.sleep(0.15)
    assert len(rung) == 1


async def test_moved_later_it_keeps_its_timer_and_goes_off_at_the_new_time() -> None:
    loop = asyncio.get_running_loop()
    rung: list[float] = []
    alarm = Alarm(loop, lambda: rung.append(loop.time()))
    start = loop.time()
    alarm.set(start + 0.05)
    handle = alarm._handle
    alarm.set(start + 0.2)
    assert alarm._handle is handle  # no new timer for a later time
    await asyncio.sleep(0.1)
    assert rung == []  # its timer went off early and set itself again
    await asyncio.sleep(0.2)
    assert len(rung) == 1
    assert rung[0] >= start + 0.2


async def test_moved_earlier_it_takes_a_new_timer() -> None:
    loop = asyncio.get_running_loop()
    rung: list[float] = []
    alarm = Alarm(loop, lambda: rung.append(loop.time()))
    start = loop.time()
    alarm.set(start + 5)
    alarm.set(start + 0.05)
    await asyncio.sleep(0.15)
    assert len(rung) == 1
    assert rung[0] < start + 1


async def test_a_cleared_alarm_set_many_times_costs_one_timer() -> None:
    loop = asyncio.get_running_loop()
    alarm = Alarm(loop, lambda: None)
    handles = set()
    for n in range(100):
        alarm.set(loop.time() + 10 + n)
        handles.add(id(alarm._handle))
        alarm.clear()
    assert len(handles) == 1
    alarm.close()
    assert alarm._handle is None
