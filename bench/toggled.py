"""A traced gateway whose tracing is switched off and back on every ``BLOCK`` requests, each
block's CPU measured: what tracing costs a request, free of the differences between two
processes and of the machine's drift, which on a shared machine are as large as that cost.

    python -m bench.toggled <the gateway's own flags>

Run with an OTLP endpoint configured (else there is nothing to switch). Requests are counted
as they arrive at the forwarded routes; at every ``BLOCK``-th, the event loop thread's CPU time
since the last switch is added to the mode that block ran in (tracing on, or off: the
endpoint without its tracer, as in a gateway without an endpoint), and the mode flips. The
export thread's CPU is kept apart: it is the traced blocks' too. The totals are written to
``BENCH_TOGGLED_OUT`` (JSON) after every block, for the caller to difference around a load.
The first ``WARMUP`` blocks are not counted. Up to the concurrency of the load, requests near
a switch run partly in the other mode, which blurs a difference by about that many in
``BLOCK``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

BLOCK = int(os.environ.get("BENCH_TOGGLED_BLOCK", "2000"))
WARMUP = 3


class Toggle:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.arrived = 0
        self.tracing = True
        self.tracer: Any = None
        self.last = 0.0
        self.totals: dict[str, Any] = {
            "block": BLOCK,
            "on": {"cpu_s": 0.0, "requests": 0},
            "off": {"cpu_s": 0.0, "requests": 0},
            "export_cpu_s": 0.0,
        }

    def arrive(self, endpoint: Any) -> None:
        if self.tracer is None:
            self.tracer = endpoint.tracer
        self.arrived += 1
        if self.arrived % BLOCK == 0:
            now = time.thread_time()
            if self.arrived > WARMUP * BLOCK:
                mode = self.totals["on" if self.tracing else "off"]
                mode["cpu_s"] += now - self.last
                mode["requests"] += BLOCK
                self.totals["export_cpu_s"] = export_cpu()
                self.write()
            self.last = now
            self.tracing = not self.tracing
        endpoint.tracer = self.tracer if self.tracing else None

    def write(self) -> None:
        temporary = self.out.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.totals))
        temporary.replace(self.out)


def export_cpu() -> float:
    for thread in threading.enumerate():
        if thread.name == "gateway-otlp" and thread.ident is not None:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return 0.0


def install(out: Path) -> None:
    from gateway.proxy.endpoint import ProxyEndpoint

    toggle = Toggle(out)
    handle = ProxyEndpoint.__call__

    async def call(self: ProxyEndpoint, scope: Any, receive: Any, send: Any) -> None:
        toggle.arrive(self)
        await handle(self, scope, receive, send)

    ProxyEndpoint.__call__ = call  # type: ignore[method-assign]


def main() -> None:
    install(Path(os.environ["BENCH_TOGGLED_OUT"]))
    from gateway.main import main as serve

    sys.exit(serve())


if __name__ == "__main__":
    main()
