"""``gateway serve``: flags and environment in, one Settings out, and the app served by uvicorn
in one process or several workers, with /metrics on its own port where asked."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import orjson
from pydantic import SecretStr, ValidationError
from starlette.applications import Starlette
from uvicorn.supervisors import Multiprocess

from gateway import __version__
from gateway.app import create_app
from gateway.config.flags import FLAG_NAMES, NOT_FLAGS, REPEATABLE, env_name
from gateway.config.settings import Settings
from gateway.edge.server import Server, tune_garbage_collector, uvicorn_config
from gateway.embedded.supervisor import EmbeddedBackendError
from gateway.tenancy import preflight

logger = logging.getLogger("gateway")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible inference gateway.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve the gateway",
        description="Serve the gateway. Every setting is a flag, an environment variable or a key "
        "in the --config file; flags win over the environment, which wins over the file.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in Settings.model_fields.items():
        if name in NOT_FLAGS:
            continue
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        env = env_name(name, field.validation_alias)
        default = (
            ""
            if field.default in (None, False, True) or field.default_factory
            else f" Default: {field.default}."
        )
        help_text = f"{field.description}{default} Env: {env}."
        if field.annotation is bool:
            action = "store_false" if field.default else "store_true"
            serve.add_argument(flag, dest=name, action=action, help=help_text)
        elif name in REPEATABLE:
            metavar = {"cors_origins": "ORIGIN", "trust_forwarded": "NETWORK", "backend_args": "ARG"}.get(
                name, "KEY"
            )
            serve.add_argument(flag, dest=name, action="append", metavar=metavar, help=help_text)
        else:
            serve.add_argument(flag, dest=name, metavar=name.split("_")[-1].upper(), help=help_text)
    return parser


def load_settings(flags: dict[str, Any]) -> Settings:
    return Settings(**flags)


def parse_flags(argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The command and its flags; everything after a lone ``--`` is the embedded backend's
    own (vLLM's flags, say), added to ``backend_args``."""
    argv = list(argv)
    passed: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, passed = argv[:at], argv[at + 1 :]
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if passed:
        args["backend_args"] = [*args.get("backend_args", []), *passed]
    return command, args


def main(argv: Sequence[str] | None = None) -> int:
    command, args = parse_flags(sys.argv[1:] if argv is None else argv)
    if command != "serve":  # pragma: no cover - argparse enforces the choice
        return 2
    try:
        settings = load_settings(args)
    except (ValidationError, ValueError) as exc:
        print(f"gateway: {_explain(exc)}", file=sys.stderr)
        return 2
    return run(settings)


def _explain(exc: ValidationError | ValueError) -> str:
    if isinstance(exc, ValidationError):
        lines = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {message}" if error["loc"] else message)
        return "invalid settings:\n  " + "\n  ".join(lines)
    return str(exc)


WORKER_SETTINGS = "GATEWAY_WORKER_SETTINGS_FILE"
"""Names the file that hands the settings down to worker processes."""


def run(settings: Settings) -> int:
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
    config = uvicorn_config("gateway.main:worker_app", settings, factory=True, workers=settings.workers)
    try:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return 0


def worker_app() -> Starlette:
    """The app in a worker process, from the settings its parent handed down."""
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
