"""One JSON line per request on stdout. Never a body, a prompt, a completion or a key."""

from __future__ import annotations

import os
import time
from typing import BinaryIO

import orjson

from gateway.exchange import Exchange


class AccessLog:
    def __init__(self, stream: BinaryIO | None = None) -> None:
        # Straight to the file descriptor: one write per line, nothing held in a buffer
        # that a crash would lose, and lines from several workers never interleave.
        self._stream = stream
        self._fd = 1 if stream is None else None
        self._second = -1
        self._stamp = ""

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
        if self._fd is not None:
            os.write(self._fd, line)
        else:
            assert self._stream is not None
            self._stream.write(line)

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
