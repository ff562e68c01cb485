"""One request's record: filled in by the proxy, read by the metrics and the access log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.tenancy.auth import ApiKey
    from gateway.tenancy.ratelimit import Reservation


@dataclass(slots=True)
class Exchange:
    request_id: str
    route: str
    method: str
    backend: str
    start: float = field(default_factory=time.perf_counter)
    key: str | None = None
    model: str | None = None
    stream: bool = False
    status: int = 0
    ttfb: float | None = None
    """Seconds from the request's arrival to the backend's first body byte."""
    upstream_wait: float = 0.0
    """Seconds spent waiting on the backend; the rest of the duration is the gateway's own."""
    duration: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    events: int = 0
    """Events of a stream relayed (``data:`` lines): what it generated, when no usage says."""
    error: str | None = None
    """The gateway's error type, a backend error class, or client_disconnect."""
    reservation: Reservation | None = None
    """Tokens held against the key's token limits until the answer's usage is known."""
    restricted: ApiKey | None = None
    """The key, when it may use only some models."""
    previous_id: str | None = None
    """The runtime's ID of the stored response a Responses request continues, once unsealed."""
    headers_out: list[tuple[bytes, bytes]] = field(default_factory=list)
    """Headers the gateway adds to the answer, whoever answers: x-request-id, rate limits."""

    def tokens_used(self) -> int | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    def tokens_charged(self) -> int | None:
        """What the request is charged against its token limits: its usage where the answer
        gave one; for a stream that gave none (a runtime sends none unless asked, and a client
        may leave first), its prompt's estimate and an event a token, never less than was held;
        else None (the hold stands)."""
        used = self.tokens_used()
        reservation = self.reservation
        if used is not None or reservation is None or not self.events:
            return used
        return max(reservation.amount, reservation.prompt + self.events)
