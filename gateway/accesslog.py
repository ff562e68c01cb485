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

from gateway.exchange import Exchange

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
        line = orjson.dumps(
            {
                "time": self._now(),
                "request_id": exchange.request_id,
                "key": exchange.key,
                "method": exchange.method,
                "route": exchange.route,
                "status": exchange.status,
                "backend": exchange.backend,
                "model": exchange.model,
                "stream": exchange.stream,
                "ttfb_ms": None if exchange.ttfb is None else _ms(exchange.ttfb),
                "duration_ms": _ms(exchange.duration),
                "overhead_ms": _ms(max(exchange.duration - exchange.upstream_wait, 0.0)),
                "prompt_tokens": exchange.prompt_tokens,
                "completion_tokens": exchange.completion_tokens,
                "error": exchange.error,
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
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
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"


def _ms(seconds: float) -> float:
    """Milliseconds to the microsecond (what round(ms, 3) gives, without its decimal conversion)."""
    return int(seconds * 1_000_000 + 0.5) / 1000
