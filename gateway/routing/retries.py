"""The retry budget: how many failed attempts may go to another replica.

Retries over the last 10 to 20 seconds stay under ``retry_budget`` times the requests,
plus a burst of ``RETRY_BURST``, so that a sick fleet is not sent every request twice
(Envoy's and Linkerd's retry budgets, counted in two windows).
"""

from __future__ import annotations

import time

RETRY_WINDOW = 10.0
RETRY_BURST = 10.0


class RetryBudget:
    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self._requests = [0, 0]
        self._retries = [0, 0]
        self._window_start = time.monotonic()

    def admit(self) -> None:
        """A request arrived: it counts towards the share that may be retried."""
        if time.monotonic() - self._window_start >= RETRY_WINDOW:
            self._roll()
        self._requests[1] += 1

    def may_retry(self) -> bool:
        """Take a retry from the budget, if one is left."""
        self._roll()
        requests, retries = sum(self._requests), sum(self._retries)
        if retries >= RETRY_BURST + self.ratio * requests:
            return False
        self._retries[1] += 1
        return True

    def _roll(self) -> None:
        # Two windows of RETRY_WINDOW seconds: the one filling and the one before it.
        now = time.monotonic()
        if now - self._window_start >= RETRY_WINDOW:
            stale = now - self._window_start >= 2 * RETRY_WINDOW
            self._requests = [0 if stale else self._requests[1], 0]
            self._retries = [0 if stale else self._retries[1], 0]
            self._window_start = now
