"""Request and token limits per key, and a global request limit, through ``limits``.

Requests are counted with the configured strategy (moving window by default), in memory or
in Redis, where several gateway processes share one count: they admit together exactly what
one would. Tokens are reserved before the request is forwarded (what it may generate, read
by ``gateway.tenancy.reserve`` as the runtimes read it, plus an estimate of the prompt) and settled
when the answer ends, from its ``usage``: a request that used less gives the difference
back. Token budgets are counters in fixed windows, since a counter, unlike a moving window's
log, can be given back to. A reservation larger than a whole window is refused before the
storage is asked, so no request can make the storage fail.

When the storage fails (Redis down), requests are admitted (fail open, the default) or
refused with 503 (fail closed); either way it is logged and counted, never a 500.
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage
from limits.aio.storage import memory as limits_memory
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.errors import StorageError
from limits.storage import storage_from_string
from prometheus_client import Counter

from gateway.core.errors import RateLimited, RateLimitUnavailable
from gateway.core.exchange import Reservation
from gateway.tenancy import reserve

logger = logging.getLogger("gateway.ratelimit")

STRATEGIES: dict[str, type[RateLimiter]] = {
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
}
STORAGE_FAILURES = (StorageError, OSError, TimeoutError)


def parse_limits(value: str | None) -> tuple[RateLimitItem, ...]:
    """``"60/minute;1000/day"`` as limit items; ValueError for a malformed one."""
    if not value or not value.strip():
        return ()
    try:
        return tuple(parse_many(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a limit like '60/minute' or '100/second;5000/day'") from None


@dataclass(frozen=True, slots=True)
class KeyLimits:
    requests: tuple[RateLimitItem, ...]
    tokens: tuple[RateLimitItem, ...]


CARRY = "carry/"
"""Prefix of the storage key that holds what a token window was overdrawn by."""


@dataclass(frozen=True, slots=True)
class Allowance:
    """One request's account with the limiter: whom it counts (a key's name, or the client's
    address without a key), under which limits, and the key's label in the metrics."""

    limiter: Limiter
    identity: str
    limits: KeyLimits
    label: str


class Limiter:
    def __init__(
        self,
        storage_uri: str,
        strategy: str,
        global_limit: str | None,
        fail_closed: bool,
        failures: Counter,
        limited: Counter,
    ) -> None:
        if storage_uri.startswith("memory://"):
            self.storage: Storage = MemoryStorage()
        else:
            options: dict[str, Any] = {"wrap_exceptions": True}
            if storage_uri.startswith(("redis://", "rediss://", "redis+")):
                options.update(implementation="redispy", socket_timeout=1.0, socket_connect_timeout=1.0)
            storage = storage_from_string("async+" + storage_uri, **options)
            assert isinstance(storage, Storage)
            self.storage = storage
        self.requests = STRATEGIES[strategy](self.storage)
        # The default setup counts in one step, without the strategy's two storage calls.
        self._moving_in_memory = (
            self.storage if isinstance(self.storage, MemoryStorage) and strategy == "moving-window" else None
        )
        self.global_limits = parse_limits(global_limit)
        self.fail_closed = fail_closed
        self.failures = failures
        self.limited = limited
        self._last_failure_log = 0.0
        self._request_keys: dict[int, tuple[str, str, int, RateLimitItem]] = {}
        """By id() of each request limit (a limit item hashes in Python): its storage key's
        start and end around the identity, its window in seconds, and the item, held so
        that its id stays its own."""

    def admit_now(self, identity: str, limits: KeyLimits, label: str) -> list[tuple[bytes, bytes]] | None:
        """``admit`` where counting needs no round trip to a storage (the default setup, a
        moving window in memory): done without a coroutine. None where it does."""
        memory = self._moving_in_memory
        if memory is None:
            return None
        tightest: tuple[int, int, float] | None = None
        for who, items in ((identity, limits.requests), ("*", self.global_limits)):
            for item in items:
                admitted, remaining, reset = self._take(memory, item, who)
                if not admitted:
                    raise self._refusal(item, who, reset, label)
                if tightest is None or remaining < tightest[1]:
                    tightest = (item.amount, remaining, reset)
        return [] if tightest is None else _encoded_headers(REQUEST_HEADERS, *tightest)

    async def admit(self, identity: str, limits: KeyLimits, label: str) -> list[tuple[bytes, bytes]]:
        """Count one request; its rate-limit headers, or RateLimited with them."""
        headers = self.admit_now(identity, limits, label)
        if headers is not None:
            return headers
        tightest: tuple[int, int, float] | None = None
        try:
            for who, items in ((identity, limits.requests), ("*", self.global_limits)):
                for item in items:
                    admitted, remaining, reset = await self._count(item, who)
                    if not admitted:
                        raise self._refusal(item, who, reset, label)
                    if tightest is None or remaining < tightest[1]:
                        tightest = (item.amount, remaining, reset)
        except STORAGE_FAILURES as exc:
            self._storage_failed(exc)
            return []
        return [] if tightest is None else _encoded_headers(REQUEST_HEADERS, *tightest)

    def _refusal(self, item: RateLimitItem, who: str, reset: float, label: str) -> RateLimited:
        self.limited.labels(label if who != "*" else "*", str(item)).inc()
        headers = _headers("requests", item.amount, 0, reset)
        wait = max(reset - time.time(), 0.001)
        scope = "the gateway's" if who == "*" else "this key's"
        return RateLimited(
            f"{scope} request limit of {item} is reached; retry in {wait:.1f} s",
            code="requests",
            headers=_retry_after(wait) | dict(headers),
        )

    def _take(self, memory: MemoryStorage, item: RateLimitItem, who: str) -> tuple[bool, int, float]:
        """Hit one request limit in the default setup, in one step and without a coroutine:
        (admitted, remaining, when the window frees a place)."""
        parts = self._request_keys.get(id(item))
        if parts is None:
            # limits' own key_for(), built once around the identity.
            start, end = item.key_for("requests", "\0").split("\0")
            parts = self._request_keys[id(item)] = (start, end, item.get_expiry(), item)
        return memory.take(parts[0] + who + parts[1], item.amount, parts[2])

    async def _count(self, item: RateLimitItem, who: str) -> tuple[bool, int, float]:
        """Hit one request limit through the strategy: (admitted, remaining, when the window
        frees a place)."""
        admitted = await self.requests.hit(item, "requests", who)
        stats = await self.requests.get_window_stats(item, "requests", who)
        return admitted, stats.remaining, stats.reset_time

    async def reserve(
        self, identity: str, limits: KeyLimits, amount: int, label: str, prompt: int = 0
    ) -> tuple[Reservation, list[tuple[bytes, bytes]]]:
        """Hold ``amount`` tokens in every token budget of the key, or none of them. The first
        request of a window is charged first what the window before was overdrawn by."""
        reservation = Reservation(identity, amount, prompt)
        if not limits.tokens:
            return reservation, []
        for item in limits.tokens:
            if amount > item.amount:
                # Refused before the storage is asked: it can never fit, so it is no use retrying.
                self.limited.labels(label, str(item)).inc()
                raise RateLimited(
                    f"this request may use {amount} tokens, more than this key's whole token limit "
                    f"of {item}: ask for fewer (max_tokens, n)",
                    code="tokens",
                    headers={"x-should-retry": "false"},
                )
        tightest: tuple[int, int, float] | None = None
        try:
            for item in limits.tokens:
                key = item.key_for("tokens", identity)
                used = await self.storage.incr(key, item.get_expiry(), amount=amount)
                if used == amount:
                    used += await self._carry_over(key, item)
                reset = await self.storage.get_expiry(key)
                if used > item.amount:
                    await self.storage.incr(key, item.get_expiry(), amount=-amount)
                    await self._release(reservation)
                    self.limited.labels(label, str(item)).inc()
                    wait = max(reset - time.time(), 0.001)
                    remaining = max(item.amount - (used - amount), 0)
                    raise RateLimited(
                        f"this key's token limit of {item} cannot hold this request's {amount} tokens "
                        f"({remaining} left); retry in {wait:.1f} s",
                        code="tokens",
                        headers=_retry_after(wait) | dict(_headers("tokens", item.amount, remaining, reset)),
                    )
                reservation.holds.append((key, reset, item))
                remaining = item.amount - used
                if tightest is None or remaining < tightest[1]:
                    tightest = (item.amount, remaining, reset)
        except STORAGE_FAILURES as exc:
            self._storage_failed(exc)
            return Reservation(identity, 0), []
        assert tightest is not None
        return reservation, _encoded_headers(TOKEN_HEADERS, *tightest)

    async def settle(self, reservation: Reservation, used: int | None) -> None:
        """Charge what the answer used instead of what was held (unknown: keep the hold).

        An overdraft is never forgotten: what takes a window past its limit is carried into
        the next one, and one whose window ended while it ran is charged to the window now."""
        if used is None or used == reservation.amount or not reservation.holds:
            return
        used = min(max(used, 0), reserve.LARGEST)  # what a backend reports is not trusted either
        difference = used - reservation.amount
        now = time.time()
        try:
            for key, window_end, item in reservation.holds:
                if window_end > now:
                    left = max(int(window_end - now), 1)
                    total = await self.storage.incr(key, left, amount=difference)
                    over = min(total - item.amount, difference)
                    if over > 0:
                        await self.storage.incr(CARRY + key, left + item.get_expiry(), amount=over)
                elif difference > 0:
                    # Past its window the hold has expired with it (a refund would make credit).
                    await self.storage.incr(key, item.get_expiry(), amount=difference)
        except STORAGE_FAILURES as exc:
            self._storage_failed(exc, fail=False)

    async def _carry_over(self, key: str, item: RateLimitItem) -> int:
        """Charge a window just begun what the one before was overdrawn by; the amount."""
        carried = int(await self.storage.get(CARRY + key) or 0)
        if carried > 0:
            await self.storage.incr(CARRY + key, item.get_expiry(), amount=-carried)
            await self.storage.incr(key, item.get_expiry(), amount=carried)
        return max(carried, 0)

    async def _release(self, reservation: Reservation) -> None:
        for key, window_end, _ in reservation.holds:
            await self.storage.incr(key, max(int(window_end - time.time()), 1), amount=-reservation.amount)
        reservation.holds.clear()

    async def check(self) -> bool:
        try:
            return bool(await self.storage.check())
        except STORAGE_FAILURES:
            return False

    def _storage_failed(self, exc: BaseException, fail: bool = True) -> None:
        self.failures.inc()
        now = time.monotonic()
        if now - self._last_failure_log > 10:
            self._last_failure_log = now
            mode = "refusing requests (fail closed)" if self.fail_closed else "admitting requests (fail open)"
            logger.error("rate-limit storage failed (%s): %s; %s", type(exc).__name__, exc, mode)
        if fail and self.fail_closed:
            raise RateLimitUnavailable(
                "rate limits cannot be checked right now; retry shortly", code="storage_unavailable"
            ) from None


class Window:
    """A key's hit times, oldest first, in blocks of doubles: 8 bytes a hit.

    Under a generous limit a moving window holds every hit of its span (a minute at a few
    thousand requests a second is hundreds of thousands); as floats in a deque that was
    about 32 bytes each. Blocks are sized to the window (16 hits to start, 4,096 at most),
    added at the new end and dropped from the old one, so memory follows the request rate
    up and down without ever copying the window.
    """

    __slots__ = ("blocks", "end", "size", "start")
    SMALLEST = 16
    LARGEST = 4096

    def __init__(self) -> None:
        self.blocks: deque[array[float]] = deque()
        self.start = 0
        """Index of the oldest hit in the first block."""
        self.end = 0
        """Index after the newest hit in the last block."""
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def oldest(self) -> float:
        return self.blocks[0][self.start]

    def newest(self) -> float:
        return self.blocks[-1][self.end - 1]

    def add(self, when: float, amount: int = 1) -> None:
        blocks = self.blocks
        if amount == 1 and blocks and self.end < len(blocks[-1]):  # the common case, without a loop
            blocks[-1][self.end] = when
            self.end += 1
            self.size += 1
            return
        for _ in range(amount):
            if not blocks or self.end == len(blocks[-1]):
                length = min(max(self.size, self.SMALLEST), self.LARGEST)
                blocks.append(array("d", bytes(8 * length)))
                self.end = 0
            blocks[-1][self.end] = when
            self.end += 1
        self.size += amount

    def trim(self, cutoff: float) -> None:
        """Forget the hits at or before ``cutoff``."""
        blocks = self.blocks
        while self.size:
            first = blocks[0]
            if first[self.start] > cutoff:
                return
            self.start += 1
            self.size -= 1
            if self.start == len(first) or self.size == 0:
                blocks.popleft()
                self.start = 0
                if not blocks:
                    self.end = 0


class MemoryStorage(limits_memory.MemoryStorage):
    """``limits``' in-process storage, with a moving window that costs O(1) a request.

    The stock one inserts every hit at the front of a list (a copy of the whole window each
    time: at a few thousand requests a second against a generous limit, most of the
    gateway's time). Here each key's window is a ``Window`` ring, trimmed as it is read.
    """

    SWEEP_EVERY = 10_000

    def __init__(self) -> None:
        super().__init__()
        self.windows: dict[str, Window] = {}
        self.spans: dict[str, float] = {}
        self._hits = 0

    def _window(self, key: str, expiry: float, now: float) -> Window:
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = Window()
            self.spans[key] = expiry
        window.trim(now - expiry)
        return window

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self.take(key, limit, expiry, amount)[0]

    def take(self, key: str, limit: int, expiry: int, amount: int = 1) -> tuple[bool, int, float]:
        """Add ``amount`` entries if they fit: (admitted, remaining, when the oldest leaves)."""
        now = time.time()
        window = self._window(key, expiry, now)
        size = window.size
        admitted = size + amount <= limit
        if admitted:
            window.add(now, amount)
            size += amount
            self._hits += 1
            if self._hits % self.SWEEP_EVERY == 0:
                self._sweep(now)
        oldest = window.blocks[0][window.start] if size else now
        return admitted, limit - size, oldest + expiry

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = time.time()
        window = self._window(key, expiry, now)
        return (window.oldest(), len(window)) if window else (now, 0)

    def _sweep(self, now: float) -> None:
        """Forget keys (clients that went away) whose window has emptied."""
        stale = [
            key
            for key, window in self.windows.items()
            if not window or window.newest() <= now - self.spans[key]
        ]
        for key in stale:
            del self.windows[key]
            del self.spans[key]

    async def reset(self) -> int | None:
        self.windows.clear()
        self.spans.clear()
        return await super().reset()


def _headers(kind: str, limit: int, remaining: int, reset_time: float) -> list[tuple[str, str]]:
    return [
        (f"x-ratelimit-limit-{kind}", str(limit)),
        (f"x-ratelimit-remaining-{kind}", str(max(remaining, 0))),
        (f"x-ratelimit-reset-{kind}", _duration(max(reset_time - time.time(), 0.0))),
    ]


REQUEST_HEADERS = tuple(f"x-ratelimit-{part}-requests".encode() for part in ("limit", "remaining", "reset"))
TOKEN_HEADERS = tuple(f"x-ratelimit-{part}-tokens".encode() for part in ("limit", "remaining", "reset"))


def _encoded_headers(
    names: tuple[bytes, ...], limit: int, remaining: int, reset_time: float
) -> list[tuple[bytes, bytes]]:
    """``_headers`` as they go on an answer (comparisons, not max(): a call each, per request)."""
    left = reset_time - time.time()
    return [
        (names[0], b"%d" % limit),
        (names[1], b"%d" % remaining if remaining > 0 else b"0"),
        (names[2], _duration(left if left > 0 else 0.0).encode()),
    ]


def _retry_after(seconds: float) -> dict[str, str]:
    return {
        "retry-after": str(max(math.ceil(seconds), 1)),
        "retry-after-ms": str(max(math.ceil(seconds * 1000), 1)),
    }


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


def key_limits(default: KeyLimits, requests: str | None, tokens: str | None) -> KeyLimits:
    """A key's own limits where its entry names them, the defaults where not."""
    return KeyLimits(
        parse_limits(requests) if requests is not None else default.requests,
        parse_limits(tokens) if tokens is not None else default.tokens,
    )
