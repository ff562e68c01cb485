"""Running the app: uvicorn in one process or several workers, and /metrics on its own port."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import orjson
import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette
from uvicorn.supervisors import Multiprocess

from gateway.edge.protocol import ClientLimits, LimitedHttpToolsProtocol
from gateway.endpoints.health import Lifecycle
from gateway.settings import Settings
from gateway.tenancy import preflight

logger = logging.getLogger("gateway")

WORKER_SETTINGS = "GATEWAY_WORKER_SETTINGS_FILE"
"""Names the file that hands the settings down to worker processes."""


def run(settings: Settings) -> int:
    from gateway.app import create_app
    from gateway.embedded.supervisor import EmbeddedBackendError

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if settings.workers > 1:
        try:
            preflight.check(settings)
        except ValueError as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return 2
        return _run_workers(settings)
    try:
        app = create_app(settings)
    except (EmbeddedBackendError, ValueError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if settings.metrics_port is not None:
        _serve_metrics_port(settings, app.state.metrics_page)
    server = Server(uvicorn_config(app, settings), app.state.lifecycle, settings.shutdown_delay)
    tune_garbage_collector()
    server.run()
    if app.state.lifecycle.failed is not None:
        print(f"gateway: {app.state.lifecycle.failed}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


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


def _run_workers(settings: Settings) -> int:
    if settings.backend_url is None and settings.backends is None:
        print("gateway: --workers above 1 needs --backend-url or --backends (each worker would start its "
              "own backend)", file=sys.stderr)  # fmt: skip
        return 2
    # Each worker process rebuilds the same settings, and the metrics live in shared files.
    # The settings hold secrets: they go in a file only this user can read, which the
    # environment (shown by ps e, copied into every child) names.
    private = tempfile.mkdtemp(prefix="gateway-settings-")
    path = os.path.join(private, "settings.json")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(_settings_json(settings))
    os.environ[WORKER_SETTINGS] = path
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
    if settings.metrics_port is not None:
        _serve_metrics_port(settings, None)
    config = uvicorn_config("gateway.server:worker_app", settings, factory=True, workers=settings.workers)
    try:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return 0


def worker_app() -> Starlette:
    """The app in a worker process, from the settings its parent handed down."""
    from gateway.app import create_app

    with open(os.environ[WORKER_SETTINGS], encoding="utf-8") as file:
        settings = Settings.model_validate_json(file.read())
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    tune_garbage_collector()
    return app


def _settings_json(settings: Settings) -> str:
    data = settings.model_dump(mode="python")
    for name, value in data.items():
        if isinstance(value, SecretStr):
            data[name] = value.get_secret_value()
        elif isinstance(value, list):
            data[name] = [v.get_secret_value() if isinstance(v, SecretStr) else v for v in value]
    data["config"] = None  # already merged in
    if settings.backends_file is not None:
        data["backends"] = str(settings.backends_file)  # each worker reads the file (again, after SIGHUP)
        data["backends_file"] = None
    elif settings.backends is not None:
        data["backends"] = [
            {**config.model_dump(), "api_key": config.key() if config.api_key else None}
            for config in settings.backends
        ]
    return orjson.dumps(data, default=str).decode()


def _serve_metrics_port(settings: Settings, page: Any) -> None:
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    from gateway.observability.metrics_port import MetricsPort
    from gateway.observability.page import Page

    if page is None:  # the workers' parent: their shared files
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        page = Page(lambda: generate_latest(registry), settings.metrics_token)
    assert settings.metrics_port is not None
    MetricsPort(page, settings.host, settings.metrics_port).start()
    logger.info("serving /metrics on port %d", settings.metrics_port)


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

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        return await super().on_tick(counter)
