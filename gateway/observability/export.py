"""Spans queued and sent in batches by a thread of their own.

A full queue drops (and counts) a request's spans; a collector that is down costs the
retries of one batch at a time, on the thread, never a request's time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable

from gateway.core.exchange import Exchange
from gateway.observability.otlp import Encoder

logger = logging.getLogger("gateway.tracing")

Send = Callable[[bytes], bool]
"""Sends one serialized ``ExportTraceServiceRequest``; False when it was not taken."""


class Exporter:
    """Finished requests' spans, encoded on the event loop's thread once per turn of the loop
    (as the access log writes its lines), queued, and sent by a thread of their own as the
    SDK's batch span processor does with its settings (``OTEL_BSP_*``): a batch as soon as
    there is a full one, what is left once ``delay`` passes without one, everything at
    ``stop``.

    A thread that encoded would compete for the interpreter's lock with the event loop,
    which gives it up at every system call and waits up to the switch interval (5 ms) to get
    it back: tried, it halved the gateway's requests a second. The thread here only joins
    bytes and waits on the collector."""

    def __init__(
        self,
        encoder: Encoder,
        send: Send,
        *,
        max_queue: int = 2048,
        batch: int = 512,
        delay: float = 5.0,
        timeout: float = 30.0,
        counted: Callable[[str, int], None] | None = None,
    ) -> None:
        self.encoder = encoder
        self.send = send
        self.max_queue = max(1, max_queue)
        self.batch = max(1, min(batch, max_queue))
        self.delay = delay
        self.timeout = timeout
        self.counted = counted or (lambda outcome, spans: None)
        """Told of spans exported, dropped (a full queue) or failed (not taken)."""
        self._finished: list[Exchange] = []
        """Requests finished in this turn of the loop, their spans not made yet."""
        self._queue: deque[bytes] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gateway-otlp", daemon=True)
            self._thread.start()

    def add(self, exchange: Exchange) -> None:
        """A finished, sampled request (the event loop's thread): its spans are made when the
        loop's turn ends."""
        if not self._finished:
            try:
                asyncio.get_running_loop().call_soon(self.encode_finished)
            except RuntimeError:  # no loop (a caller of its own): now
                self._finished.append(exchange)
                self.encode_finished()
                return
        self._finished.append(exchange)

    def encode_finished(self) -> None:
        finished, self._finished = self._finished, []
        queue, spans, dropped = self._queue, self.encoder.spans, 0
        for exchange in finished:
            trace = exchange.trace
            if trace is None:
                continue
            if len(queue) >= self.max_queue:
                dropped += 1 if trace.client_start is None else 2
                continue
            try:
                queue.extend(spans(exchange, trace))
            except Exception:  # a span this code cannot make is a bug, not the request's
                logger.exception("could not make the spans of request %s", exchange.request_id)
                dropped += 2
        if dropped:
            self.counted("dropped", dropped)
        if len(queue) >= self.batch and not self._wake.is_set():
            self._wake.set()

    def stop(self) -> None:
        """Export what is queued (within ``timeout``) and end the thread."""
        self.encode_finished()
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        thread.join(self.timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            full = self._wake.wait(self.delay)
            self._wake.clear()
            stopping = self._stopping
            self.export_queued(everything=stopping or not full)
            if stopping:
                return

    def export_queued(self, everything: bool = True) -> None:
        """Full batches; and the rest when ``everything``."""
        queue, batch = self._queue, self.batch
        while len(queue) >= batch or (everything and queue):
            taken = [queue.popleft() for _ in range(min(batch, len(queue)))]
            try:
                sent = self.send(self.encoder.request(taken))
            except Exception:  # the SDK's transport answers failures; this is a bug of ours
                logger.exception("could not export %d spans", len(taken))
                sent = False
            self.counted("exported" if sent else "failed", len(taken))
