"""One request on its way through the proxy's phases."""

from __future__ import annotations

from gateway.core.asgi import Receive, Scope, Send
from gateway.core.exchange import ApiKey, Exchange
from gateway.core.headers import RequestHeaders
from gateway.core.jsonbody import JsonBody
from gateway.fleet.replicas import Group
from gateway.proxy.body import StreamedBody
from gateway.routing.flow import Ticket
from gateway.tenancy.ratelimit import Allowance


class Call:
    """One request on its way through the phases: what each phase finds, for the next."""

    __slots__ = (
        "allowance",
        "body",
        "exchange",
        "forward",
        "groups",
        "headers",
        "key",
        "parsed",
        "query",
        "raw_path",
        "receive",
        "scope",
        "send",
        "ticket",
    )

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, headers: RequestHeaders, exchange: Exchange
    ) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.headers = headers
        self.exchange = exchange
        self.key: ApiKey | None = None
        self.allowance: Allowance | None = None
        """Whom the limits count and under which limits, where a limiter counts them."""
        self.body: bytes | StreamedBody | None = None
        self.parsed: JsonBody | None = None
        self.query: bytes = scope.get("query_string", b"")
        self.raw_path: str | None = None
        """The path as the runtime must see it, where an ID in it was unsealed."""
        self.groups: list[Group] = []
        """The backends that may answer, the first preferred."""
        self.forward: list[tuple[bytes, bytes]] = headers.forward
        """The headers the backend is sent."""
        self.ticket: Ticket | None = None
        """Its flow, priority and cost, where its backend has a capacity (flow control)."""
