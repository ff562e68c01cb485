"""The server a client meets: uvicorn with the gateway's protocol and its limits, draining on
a signal as a gateway behind a load balancer should, and the process's lifecycle."""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn

from gateway.config.settings import Settings
from gateway.edge.protocol import ClientLimits, LimitedHttpToolsProtocol

logger = logging.getLogger("gateway")


class Lifecycle:
    """Whether the process is draining: told to stop, finishing what it has."""

    def __init__(self) -> None:
        self.draining = False
        self.failed: str | None = None
        """Why the gateway stops on its own (its embedded backend cannot start)."""
        self.on_close: list[Callable[[], object]] = []
        """Told when the listener closes and the drain begins (requests still waiting for a
        replica are refused then, so that their clients go to another pod)."""

    def not_ready_reason(self) -> str | None:
        if self.failed is not None:
            return f"the gateway is stopping: {self.failed}"
        return "the gateway is shutting down" if self.draining else None


def tune_garbage_collector() -> None:
    """Short, rare pauses: every open stream's next chunk waits behind a collection.

    The objects made at start-up are frozen out of the collector's sight. A young
    collection costs about a microsecond per object it finds alive, and an open stream
    keeps about ninety alive: with 1,000 new objects a young collection pauses about a
    millisecond, and the middle one (20 of those) about 20 ms. A full collection walks every
    live object, 400-500 ms with 5,000 open streams in a process: Python starts one each
    time the survivors grow by a quarter (every few seconds while streams pile up); after
    1,000 middle ones it is rare. A request makes no reference cycles, so almost nothing
    waits for a full collection to be freed.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(1_000, 20, 1_000)


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "lifespan": "on",
        "log_level": settings.log_level,
        "access_log": False,
        # The peer address is kept as it is and appended to X-Forwarded-For for the backend.
        "proxy_headers": False,
        "server_header": False,
        "date_header": False,
        "ssl_keyfile": str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        "ssl_certfile": str(settings.ssl_certfile) if settings.ssl_certfile else None,
        "log_config": None,
        "timeout_graceful_shutdown": settings.drain_timeout,
        "http": client_protocol(settings),
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def client_protocol(settings: Settings) -> Any:
    """uvicorn's httptools protocol with the client-side limits and deadlines."""
    return LimitedHttpToolsProtocol.with_limits(
        ClientLimits(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            header_timeout=settings.client_header_timeout,
            body_timeout=settings.client_body_timeout,
            body_deadline=settings.client_body_deadline,
            write_timeout=settings.client_write_timeout,
        )
    )


class Server(uvicorn.Server):
    """uvicorn's server, draining as a gateway behind a load balancer should.

    On SIGTERM or SIGINT, ``/ready`` turns 503 at once; the listener stays open for
    ``shutdown_delay`` seconds (so load balancers see the 503 and stop sending), then closes;
    requests and streams in flight get the drain timeout to finish; the process exits 0.
    uvicorn itself would re-raise the signal after shutting down, so the process would die
    by it; a gateway that drained cleanly on request has not failed.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, shutdown_delay: float = 0.0) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.shutdown_delay = shutdown_delay
        self._exit_at: float | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.draining:
            # Asked again: stop waiting for the delay; a second Ctrl+C also stops the drain.
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        self.lifecycle.draining = True
        self._exit_at = time.monotonic() + self.shutdown_delay
        self.should_exit = not self.shutdown_delay
        logger.info(
            "stopping: /ready answers 503; closing the listener in %g s; draining for up to %g s",
            self.shutdown_delay,
            self.config.timeout_graceful_shutdown,
        )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for hook in self.lifecycle.on_close:
            hook()
        await super().shutdown(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        return await super().on_tick(counter)
