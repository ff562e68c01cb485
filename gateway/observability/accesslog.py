"""One JSON line per request on stdout. Never a body, a prompt, a completion or a key.

The lines of the requests a turn of the event loop ends are written together when it ends,
in writes of at most ``PIPE_BUF`` bytes of whole lines: one system call for many requests
under load, and lines from several workers sharing a pipe never interleave (POSIX makes a
write that small to a pipe atomic). A line is held no longer than the rest of its turn.
"""

from __future__ import annotations

import asyncio
import os
import select
import time
from typing import BinaryIO

import orjson

from gateway.core.exchange import Exchange

# A timestamp's last part, ".000Z" to ".999Z", made once rather than formatted each time.
MILLISECONDS = tuple(f".{n:03d}Z" for n in range(1000))
# The largest write to a pipe that POSIX keeps whole.
PIPE_BUF = getattr(select, "PIPE_BUF", 512)


class AccessLog:
    def __init__(self, stream: BinaryIO | None = None) -> None:
        # Straight to the file descriptor, not through a buffered file object.
        self._stream = stream
        self._fd = 1 if stream is None else None
        self._second = -1
        self._stamp = ""
        self._lines: list[bytes] = []
        self._held = 0
        """Bytes in ``_lines``."""

    def write(self, exchange: Exchange) -> None:
        # Milliseconds to the microsecond: what round(ms, 3) gives, without its decimal
        # conversion, and inline (three calls of a helper cost as much as encoding the line).
        duration = exchange.duration
        ttfb = exchange.ttfb
        overhead = duration - exchange.upstream_wait - exchange.queued
        fields = {
            "time": self._now(),
            "request_id": exchange.request_id,
            "key": exchange.key,
            "method": exchange.method,
            "route": exchange.route,
            "status": exchange.status,
            "backend": exchange.backend,
            "model": exchange.model,
            "stream": exchange.stream,
            "ttfb_ms": None if ttfb is None else int(ttfb * 1_000_000 + 0.5) / 1000,
            "duration_ms": int(duration * 1_000_000 + 0.5) / 1000,
            "overhead_ms": int(overhead * 1_000_000 + 0.5) / 1000 if overhead > 0 else 0.0,
            "queued_ms": int(exchange.queued * 1_000_000 + 0.5) / 1000,
            "prompt_tokens": exchange.prompt_tokens,
            "completion_tokens": exchange.completion_tokens,
            "error": exchange.error,
        }
        trace = exchange.trace
        if trace is not None:  # tracing is on: the line joins the request's trace
            fields["trace_id"] = f"{trace.trace_id:032x}"
            fields["span_id"] = f"{trace.span_id:016x}"
        line = orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)
        if self._held + len(line) > PIPE_BUF:
            self.flush()
        if not self._lines:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a caller of its own): now
                self._emit(line)
                return
        self._lines.append(line)
        self._held += len(line)

    def flush(self) -> None:
        """Write the lines held."""
        if self._lines:
            lines, self._lines, self._held = self._lines, [], 0
            self._emit(lines[0] if len(lines) == 1 else b"".join(lines))

    def _emit(self, data: bytes) -> None:
        if self._fd is None:
            assert self._stream is not None
            self._stream.write(data)
            return
        view = memoryview(data)
        while view:  # a file or a terminal may take less than all at once
            view = view[os.write(self._fd, view) :]

    def _now(self) -> str:
        """UTC with milliseconds; the formatted second is reused within the second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._stamp + MILLISECONDS[int((now - second) * 1000)]
