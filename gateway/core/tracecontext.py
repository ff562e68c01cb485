"""A request's place in a distributed trace (W3C Trace Context) and what its two spans are to
say: the request at the gateway's edge (SERVER) and the call to the runtime (CLIENT).

Only plain values are recorded while the request runs; ``gateway.observability.tracing``
turns them into spans, off the request's path.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit

# W3C Trace Context level 1, 3.2: version-trace_id-parent_id-flags, lower-case hex.
DASH = ord("-")
HEX_AND_DASH = b"0123456789abcdef-"
HEAD_BYTES = 1024
"""What of an answer's start is kept to read its model and ID from."""


@lru_cache(maxsize=1024)
def address(url: str) -> tuple[str, int | None]:
    """``server.address`` and ``server.port`` of a replica's URL."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.hostname or url, port


def parse_traceparent(value: bytes) -> tuple[int, int, int] | None:
    """(trace ID, parent span ID, flags) of a valid ``traceparent``, else None."""
    head = value[:55]
    # version-trace_id-parent_id-flags: lower-case hex in its places, dashes in theirs only.
    if (
        len(head) != 55
        or head[2] != DASH
        or head[35] != DASH
        or head[52] != DASH
        or head.translate(None, HEX_AND_DASH)
        or head.count(b"-") != 3
    ):
        return None
    version = head[:2]
    size = len(value)
    # Version 00 is exactly 55 characters; a later version may add fields after a dash.
    if version == b"ff" or (size != 55 if version == b"00" else size > 55 and value[55:56] != b"-"):
        return None
    trace_id = int(head[3:35], 16)
    parent_id = int(head[36:52], 16)
    if not trace_id or not parent_id:
        return None
    return trace_id, parent_id, int(head[53:55], 16)


class RequestTrace:
    """One request's trace: its IDs and, when it is sampled, what its spans will carry."""

    __slots__ = (
        "client_end",
        "client_id",
        "client_start",
        "events",
        "head",
        "name",
        "operation",
        "parent_id",
        "provider",
        "replica",
        "request",
        "sampled",
        "span_id",
        "start_ns",
        "state",
        "tail",
        "trace_id",
    )

    def __init__(
        self,
        name: str,
        trace_id: int,
        parent_id: int,
        span_id: int,
        client_id: int,
        sampled: bool,
        state: str | None,
        start_ns: int,
    ) -> None:
        self.name = name
        """The SERVER span's name: the method and the route."""
        self.trace_id = trace_id
        self.parent_id = parent_id
        """The client's span (0: the trace starts here)."""
        self.span_id = span_id
        """The SERVER span's."""
        self.client_id = client_id
        """The CLIENT span's: the parent the runtime is told of."""
        self.sampled = sampled
        self.state = state
        """``tracestate``, passed on."""
        self.start_ns = start_ns
        """Wall-clock nanoseconds at the request's arrival (``Exchange.start``)."""
        self.operation: str | None = None
        """``gen_ai.operation.name`` of the route, where it is a GenAI operation."""
        self.provider: str | None = None
        self.replica: str | None = None
        """The URL of the replica that answered (or was tried last)."""
        self.client_start: float | None = None
        """``perf_counter`` at the first try (None: the runtime was never called)."""
        self.client_end: float | None = None
        self.request: tuple[tuple[str, object], ...] = ()
        """The request's GenAI parameters (max_tokens, temperature...), never its content."""
        self.events: list[tuple[float, str, tuple[tuple[str, object], ...]]] = []
        """(perf_counter, name, attributes): tries, failovers, the queue."""
        self.head: bytes | None = None
        """The answer's first bytes and last (a copy): its model, ID and finish reasons are
        read from them when the spans are made; nothing of them is exported."""
        self.tail: bytes | None = None

    def traceparent(self) -> bytes:
        """The header the runtime is sent: its parent is the CLIENT span."""
        return b"00-%032x-%016x-0%d" % (self.trace_id, self.client_id, self.sampled)

    def event(self, at: float, name: str, *attributes: tuple[str, object]) -> None:
        if self.sampled:
            self.events.append((at, name, attributes))
