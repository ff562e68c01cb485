"""Many concurrent paced streams: the delay each chunk arrives late, through a proxy or not.

python -m bench.streams URL --streams 1000 --interval-ms 200 --seconds 30

Lateness is reported over the whole run and over the window in which every stream was
open (from the last stream's first chunk to the first stream's end): while streams are
still being started, each new one's connections and request share the CPU with the
chunks of those already open.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time

import aiohttp


class Window:
    """When the last stream opened and the first one ended."""

    def __init__(self, streams: int) -> None:
        self.waiting = streams
        self.all_open = float("inf")
        self.first_end = float("inf")

    def opened(self, now: float) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.all_open = now

    def ended(self, now: float) -> None:
        self.first_end = min(self.first_end, now)


async def one_stream(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    interval: float,
    lateness: list[tuple[float, float]],
    window: Window,
) -> bool:
    async with session.post(url, json={"model": "bench", "stream": True}, headers=headers) as response:
        if response.status != 200:
            return False
        previous: float | None = None
        pending = b""
        async for data in response.content.iter_any():
            now = time.perf_counter()
            pending += data
            events = pending.count(b"\n\n")
            pending = pending[pending.rfind(b"\n\n") + 2 :] if events else pending
            for _ in range(events):
                if previous is not None:
                    lateness.append((now, max(now - previous - interval, 0.0)))
                else:
                    window.opened(now)
                previous = now
        window.ended(time.perf_counter())
        return True


def percentile(ordered: list[float], p: float) -> float:
    """The ``p`` quantile (0 to 1) of sorted seconds, in milliseconds; NaN when there are none."""
    return round(ordered[min(int(len(ordered) * p), len(ordered) - 1)] * 1000, 3) if ordered else float("nan")


async def run(
    url: str, streams: int, interval_ms: float, seconds: float, key: str | None, ramp: float | None = None
) -> dict[str, object]:
    chunks = max(int(seconds * 1000 / interval_ms), 1)
    target = f"{url}/v1/chat/completions?chunks={chunks}&interval_ms={interval_ms:g}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    lateness: list[tuple[float, float]] = []
    window = Window(streams)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=seconds * 3 + 60)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def guarded(index: int) -> bool:
            # The starts spread over ``ramp`` seconds (one interval unless told).
            await asyncio.sleep(index * (interval_ms / 1000 if ramp is None else ramp) / streams)
            try:
                return await one_stream(session, target, headers, interval_ms / 1000, lateness, window)
            except (TimeoutError, aiohttp.ClientError):
                return False

        results = await asyncio.gather(*(guarded(i) for i in range(streams)))
    every = sorted(late for _, late in lateness)
    all_open = sorted(late for now, late in lateness if window.all_open <= now <= window.first_end)

    return {
        "streams": streams,
        "errors": results.count(False),
        "chunks": len(lateness) + streams,
        "seconds": round(time.perf_counter() - started, 2),
        "late_p50_ms": percentile(every, 0.50),
        "late_p99_ms": percentile(every, 0.99),
        "late_max_ms": percentile(every, 1.0),
        "all_open_seconds": round(max(window.first_end - window.all_open, 0.0), 2),
        "all_open_chunks": len(all_open),
        "all_open_p50_ms": percentile(all_open, 0.50),
        "all_open_p99_ms": percentile(all_open, 0.99),
        "all_open_max_ms": percentile(all_open, 1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--interval-ms", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--key")
    parser.add_argument(
        "--ramp-seconds", type=float, help="start the streams over this long (default: an interval)"
    )
    args = parser.parse_args()
    # The client's own collector would pause every stream at once (a full collection over
    # thousands of live streams takes 100-250 ms) and show up as lateness that is not the
    # proxy's. The run is short; its cycles are collected when it ends.
    gc.disable()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        result = asyncio.run(
            run(args.url, args.streams, args.interval_ms, args.seconds, args.key, args.ramp_seconds)
        )
    else:
        result = uvloop.run(
            run(args.url, args.streams, args.interval_ms, args.seconds, args.key, args.ramp_seconds)
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
