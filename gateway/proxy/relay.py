"""The body of a backend's answer, sent on to the client chunk by chunk as it arrives."""

from __future__ import annotations

import logging
import time

from adapters.base import ANTHROPIC_ROUTES, Route
from gateway.client import Response, UpstreamError
from gateway.config.settings import Settings
from gateway.core.asgi import Send
from gateway.core.errors import BackendError, anthropic_envelope, sse_error_event
from gateway.core.exchange import Exchange, Outcome
from gateway.core.tracecontext import HEAD_BYTES
from gateway.fleet.upstream import mid_stream_error
from gateway.proxy.usage import TAIL_BYTES, prompt_tokens_at_start, tokens_in
from gateway.tenancy.ownership import StreamSealer

logger = logging.getLogger("gateway.proxy")


async def relay(
    response: Response,
    send: Send,
    streaming: bool,
    exchange: Exchange,
    settings: Settings,
    sealer: StreamSealer | None = None,
) -> bool:
    """Send the body on as it arrives (through ``sealer`` where IDs are sealed); True
    when the backend finished it."""
    response.set_read_timeout(settings.stream_idle_timeout)
    clock = time.perf_counter
    previous = last = b""
    # Anthropic's streams give the prompt's tokens at their start (message_start).
    first: bytes | None = b"" if streaming and exchange.route == Route.MESSAGES else None
    waiting = 0.0
    done = False
    try:
        while not done:
            waited = clock()
            chunk = await response.read()
            waiting += clock() - waited
            if not chunk:
                break
            if exchange.ttfb is None:
                exchange.ttfb = clock() - exchange.start
                if exchange.trace is not None and exchange.trace.sampled:
                    exchange.trace.head = chunk[:HEAD_BYTES]
            previous, last = last, chunk
            if streaming:
                exchange.events += chunk.count(b"data:")
            if first is not None and len(first) < TAIL_BYTES:
                first += chunk[: TAIL_BYTES - len(first)]
            done = response.at_eof()
            if sealer is not None:
                chunk = sealer.feed(chunk) + (sealer.flush() if done else b"")
                if not chunk and not done:
                    continue
            await send({"type": "http.response.body", "body": chunk, "more_body": not done})
    except UpstreamError as exc:
        exchange.upstream_wait += waiting
        error = mid_stream_error(exc, settings)
        exchange.error = Outcome.MID_STREAM
        logger.warning("backend broke off a response (request %s): %s", exchange.request_id, error.message)
        # What usage came before the cut still counts (and is traced).
        _read_usage(exchange, previous, last, first)
        if not streaming:
            # Returning without the final body message makes the server drop the
            # connection, so the client sees a cut, not a short body that looks whole.
            return False
        final = final_event(error, last, exchange.route in ANTHROPIC_ROUTES)
        await send({"type": "http.response.body", "body": final, "more_body": False})
        return False
    exchange.upstream_wait += waiting
    if not done:
        rest = sealer.flush() if sealer is not None else b""
        await send({"type": "http.response.body", "body": rest, "more_body": False})
    _read_usage(exchange, previous, last, first)
    return True


def _read_usage(exchange: Exchange, previous: bytes, last: bytes, first: bytes | None) -> None:
    """The tokens of a successful answer's usage, read from its last bytes (and first)."""
    if not 200 <= exchange.status < 300:
        return
    tail = last if len(last) >= TAIL_BYTES else previous[-TAIL_BYTES:] + last
    exchange.prompt_tokens, exchange.completion_tokens = tokens_in(tail)
    if first is not None and exchange.prompt_tokens is None:
        exchange.prompt_tokens = prompt_tokens_at_start(first)
    if exchange.trace is not None and exchange.trace.sampled:
        exchange.trace.tail = tail


def final_event(error: BackendError, last: bytes, anthropic: bool) -> bytes:
    """The SSE event that ends a stream the backend broke off: the error, in the route's own shape."""
    if anthropic:
        event = b"event: error\ndata: " + anthropic_envelope(error.status, error.message) + b"\n\n"
    else:
        event = sse_error_event(error)
    # Close an event the backend left half-sent, so that ours is read on its own.
    return event if last.endswith(b"\n\n") else b"\n\n" + event
