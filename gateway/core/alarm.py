"""``Alarm``: a deadline that moves with every request and rarely expires, for the price of
one event-loop timer now and then.

A keep-alive connection's deadlines move with each request on it (the backend's head
deadline, the client's idle timeout): a new timer handle and a cancel each time cost more
than the rest of the bookkeeping. An alarm keeps its timer: moved later, it only notes the
time; its timer, when it goes off early, sets itself again for the time now wanted; moved
earlier than its timer, it takes a new one. Cleared, it stays armed and finds nothing to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Alarm:
    """Calls ``callback`` once the loop's time reaches ``when`` (``set``), unless cleared first."""

    __slots__ = ("_armed", "_handle", "callback", "loop", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
        self.loop = loop
        self.callback = callback
        self.when: float | None = None
        """The loop time it goes off at; None when cleared."""
        self._handle: asyncio.TimerHandle | None = None
        self._armed = 0.0
        """When the handle fires."""

    def set(self, when: float) -> None:
        self.when = when
        if self._handle is None or self._armed > when:
            if self._handle is not None:
                self._handle.cancel()
            self._arm(when)

    def clear(self) -> None:
        self.when = None

    def close(self) -> None:
        """Cleared for good: its timer goes too."""
        self.when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        self._armed = when
        self._handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        when = self.when
        if when is None:
            return
        if self.loop.time() < when:  # moved later since the timer was set
            self._arm(when)
            return
        self.when = None
        self.callback()
