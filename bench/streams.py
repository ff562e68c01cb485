"""Many concurrent paced streams: the delay each chunk arrives late, through a proxy or not.

python -m bench.streams URL --streams 1000 --interval-ms 200 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


async def one_stream(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], interval: float, lateness: list[float]
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
                    lateness.append(max(now - previous - interval, 0.0))
                previous = now
        return True


async def run(
    url: str, streams: int, interval_ms: float, seconds: float, key: str | None, ramp: float | None = None
) -> dict[str, object]:
    chunks = max(int(seconds * 1000 / interval_ms), 1)
    target = f"{url}/v1/chat/completions?chunks={chunks}&interval_ms={interval_ms:g}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    lateness: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=seconds * 3 + 60)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def guarded(index: int) -> bool:
            # The starts spread over ``ramp`` seconds (one interval unless told).
            await asyncio.sleep(index * (interval_ms / 1000 if ramp is None else ramp) / streams)
            try:
                return await one_stream(session, target, headers, interval_ms / 1000, lateness)
            except (TimeoutError, aiohttp.ClientError):
                return False

        results = await asyncio.gather(*(guarded(i) for i in range(streams)))
    lateness.sort()

    def percentile(p: float) -> float:
        return lateness[min(int(len(lateness) * p), len(lateness) - 1)] * 1000 if lateness else float("nan")

    return {
        "streams": streams,
        "errors": results.count(False),
        "chunks": len(lateness) + streams,
        "seconds": round(time.perf_counter() - started, 2),
        "late_p50_ms": round(percentile(0.50), 3),
        "late_p99_ms": round(percentile(0.99), 3),
        "late_max_ms": round(lateness[-1] * 1000, 3) if lateness else float("nan"),
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
