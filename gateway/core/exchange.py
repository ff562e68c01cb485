"""One request's record, filled in by the proxy and read by the metrics and the access log, and
the two things of the tenancy it carries: the caller's key and the tokens held for it."""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from enum import StrEnum

from limits import RateLimitItem

from adapters.base import Route
from gateway.core.tracecontext import RequestTrace


class Outcome(StrEnum):
    """How a request failed where no error of the gateway's names it: ``Exchange.error`` is
    one of these, a ``GatewayError``'s type, or None."""

    CLIENT_DISCONNECT = "client_disconnect"
    """The client went before its answer was over (status 499 where none was sent)."""
    MID_STREAM = "mid_stream"
    """The backend's answer broke off after its first byte had gone to the client."""
    BACKEND_ERROR = "backend_error"
    """A model management request failed on a replica of several."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: bytes
    rate_limit: str | None = None
    """Request limits in the ``limits`` notation; None: the default."""
    token_limit: str | None = None
    models: tuple[str, ...] | None = None
    """Model names or glob patterns the key may use; None: any."""
    priority: int = 0
    """Where its requests wait when the fleet is full: higher goes first."""
    weight: float = 1.0
    """Its share against other keys of its priority when the fleet is full."""

    def may_use(self, model: str) -> bool:
        return self.models is None or any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


@dataclass(slots=True)
class Reservation:
    """Tokens held for a request until its answer says how many it used."""

    identity: str
    amount: int
    prompt: int = 0
    """The part of ``amount`` held for the prompt."""
    holds: list[tuple[str, float, RateLimitItem]] = field(default_factory=list)
    """(storage key, end of its window, the limit) for each token limit charged."""


@dataclass(slots=True)
class Exchange:
    request_id: str
    route: Route
    method: str
    backend: str
    start: float = field(default_factory=time.perf_counter)
    key: str | None = None
    model: str | None = None
    stream: bool = False
    status: int = 0
    ttfb: float | None = None
    """Seconds from the request's arrival to the backend's first body byte."""
    queued: float = 0.0
    """Seconds spent waiting in the gateway for a replica with room (flow control)."""
    upstream_wait: float = 0.0
    """Seconds spent waiting on the backend; the rest of the duration is the gateway's own."""
    duration: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    events: int = 0
    """Events of a stream relayed (``data:`` lines): what it generated, when no usage says."""
    error: str | None = None
    """An ``Outcome``, the type of the ``GatewayError`` answered, or None."""
    reservation: Reservation | None = None
    """Tokens held against the key's token limits until the answer's usage is known."""
    restricted: ApiKey | None = None
    """The key, when it may use only some models."""
    previous_id: str | None = None
    """The runtime's ID of the stored response a Responses request continues, once unsealed."""
    headers_out: list[tuple[bytes, bytes]] = field(default_factory=list)
    """Headers the gateway adds to the answer, whoever answers: x-request-id, rate limits."""
    trace: RequestTrace | None = None
    """Its trace, where tracing is on."""

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
