"""Whole answers the gateway rewrites before they go out: an error put in the envelope, a
model list completed or cut to a key's share, object IDs sealed to their owner.

Each is read up to the read cap before anything is sent, so a body the backend breaks
off is the gateway's error; one too large to read goes on as it came where that is safe.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Awaitable, Callable

import orjson

from adapters import normalise
from adapters.base import ANTHROPIC_ROUTES, Route
from gateway.client import Response, UpstreamError
from gateway.config.settings import Settings
from gateway.core.asgi import Send
from gateway.core.errors import BackendBadResponse, Unsupported
from gateway.core.exchange import Exchange
from gateway.fleet.replicas import Group
from gateway.fleet.upstream import mid_stream_error
from gateway.proxy.relay import relay
from gateway.proxy.replies import REWRITTEN_HEADERS, send_error, send_whole
from gateway.proxy.routes import RouteSpec
from gateway.tenancy import ownership
from gateway.tenancy.ownership import Owners

Rewriter = Callable[[Response, Group, list[tuple[bytes, bytes]], Send, Exchange], Awaitable[bool]]
"""Sends a rewritten answer; True when the backend's body was read to its end."""


class Rewrites:
    """The rewrites of one route's answers."""

    def __init__(self, route: RouteSpec, settings: Settings, owners: Owners | None) -> None:
        self.route = route
        self.settings = settings
        self.owners = owners
        self.max_read_bytes = settings.backend_max_read_bytes

    def choose(self, response: Response, group: Group, exchange: Exchange, sealing: bool) -> Rewriter | None:
        """How a whole (not streamed) answer is rewritten before it goes out, if it is: a
        model list cut to the key's share, IDs sealed, an error put in the envelope, a model
        list completed."""
        status = response.status
        if self.route.name == Route.MODELS and exchange.restricted is not None and status == 200:
            return self.allowed_models
        if sealing and self.route.name != Route.FILE_CONTENT:
            return self.sealed
        if status >= 400:
            return self.reshaped
        if self.route.name == Route.MODELS and status == 200 and group.backend.adapter.normalise:
            return None if response.header(b"content-encoding") is not None else self.reshaped
        return None

    async def reshaped(
        self,
        response: Response,
        group: Group,
        headers: list[tuple[bytes, bytes]],
        send: Send,
        exchange: Exchange,
    ) -> bool:
        """Send an error in the gateway's envelope, or a model list in the OpenAI shape, if it
        is small enough to read."""
        status = response.status
        head, whole = await self._read_whole(response, exchange)
        encoding = response.header(b"content-encoding")
        if whole and encoding is not None:
            decoded = decompressed(head, encoding, self.max_read_bytes)
            if decoded is None:  # an encoding the gateway does not read: sent as it came
                whole = False
            else:
                head = decoded
                # Now sent as it is: the length and encoding are the gateway's.
                headers = [h for h in headers if h[0] not in REWRITTEN_HEADERS]
                headers.append((b"content-length", str(len(head)).encode()))
        if whole:
            if status >= 400 and "{" not in self.route.path and normalise.route_missing(status, head):
                await send_error(send, self._unregistered(group), exchange)
                return True
            reshaped: bytes | None
            if status >= 400 and self.route.name in ANTHROPIC_ROUTES:
                reshaped = normalise.anthropic_error_body(status, head)
            elif status >= 400:
                reshaped = normalise.error_body(status, head, model=exchange.model)
            else:
                reshaped = normalise.model_list(head, group.name)
            if reshaped is not None:
                await send_whole(send, status, headers, reshaped)
                return True
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": head, "more_body": not whole})
        if whole:
            return True
        return await relay(response, send, False, exchange, self.settings)

    def _unregistered(self, group: Group) -> Unsupported:
        """The 501 for a route the runtime has not registered (it answered its framework's 404)."""
        adapter = group.backend.adapter
        why = adapter.unregistered.get(self.route.name, "this runtime or model does not serve it")
        return Unsupported(
            f"the {group.name} backend ({adapter.name}) has no {self.route.path} for this model: {why}",
            code="unsupported_route",
        )

    async def allowed_models(
        self,
        response: Response,
        group: Group,
        headers: list[tuple[bytes, bytes]],
        send: Send,
        exchange: Exchange,
    ) -> bool:
        """A model list cut to what the key may use."""
        assert exchange.restricted is not None
        head, whole = await self._read_whole(response, exchange)
        listed = (normalise.model_list(head, group.name) or head) if whole else b""
        try:
            document = orjson.loads(listed)
            entries = document["data"]
            assert isinstance(entries, list)
        except (orjson.JSONDecodeError, KeyError, TypeError, AssertionError):
            error = BackendBadResponse("the backend's model list could not be read", code="bad_model_list")
            await send_error(send, error, exchange)
            return False
        allowed = exchange.restricted
        document["data"] = [
            e for e in entries if isinstance(e, dict) and allowed.may_use(str(e.get("id", "")))
        ]
        await send_whole(send, 200, headers, orjson.dumps(document))
        return True

    async def sealed(
        self,
        response: Response,
        group: Group,
        headers: list[tuple[bytes, bytes]],
        send: Send,
        exchange: Exchange,
    ) -> bool:
        """An object, or a list of them, with its IDs sealed to the key and a list cut to the
        key's own objects."""
        assert self.owners is not None
        assert exchange.key is not None
        head, whole = await self._read_whole(response, exchange)
        if not whole or response.header(b"content-encoding") is not None:
            # Unread, its IDs cannot be sealed (an ID the owner could never use again) nor a
            # list cut to the key's own objects: it must not go as it is.
            if self.route.name in ownership.LISTS:
                error = BackendBadResponse(
                    "the backend's list is too large to check whose objects it holds: ask for fewer (limit)",
                    code="list_too_large",
                )
            else:
                error = BackendBadResponse(
                    "the backend's answer is too large (or compressed) to seal the IDs it holds: raise "
                    f"--backend-max-read-bytes above {self.max_read_bytes}",
                    code="answer_too_large",
                )
            await send_error(send, error, exchange)
            return False
        sealed = await self.owners.answer(exchange.key, self.route.name, head)
        await send_whole(send, response.status, headers, sealed)
        return True

    async def _read_whole(self, response: Response, exchange: Exchange) -> tuple[bytes, bool]:
        """The answer's body up to the read cap, and whether that was all of it; read before
        anything was sent, so a body the backend breaks off is the gateway's error."""
        waited = time.perf_counter()
        try:
            head, whole = await response.read_up_to(self.max_read_bytes)
        except UpstreamError as exc:
            raise mid_stream_error(exc, self.settings) from exc
        finally:
            exchange.upstream_wait += time.perf_counter() - waited
        exchange.ttfb = time.perf_counter() - exchange.start
        return head, whole


def decompressed(body: bytes, encoding: bytes, limit: int) -> bytes | None:
    """A small compressed answer (an error the gateway rewrites), decompressed within ``limit``."""
    name = encoding.strip().lower()
    if name == b"identity":
        return body
    if name not in {b"gzip", b"x-gzip", b"deflate"}:
        return None
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 32 if name != b"deflate" else zlib.MAX_WBITS)
    try:
        decoded = decompressor.decompress(body, limit)
    except zlib.error:
        return None
    if decompressor.unconsumed_tail or not decompressor.eof:
        return None
    return decoded
