"""``gateway serve``: flags and environment in, one Settings out, uvicorn started."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

import uvicorn
from pydantic import AliasChoices, ValidationError

from gateway import __version__
from gateway.settings import Settings

# Settings whose flag is not simply the field name with dashes.
FLAG_NAMES = {"api_keys": "--api-key", "admin_api_keys": "--admin-api-key"}
REPEATABLE = {"api_keys", "admin_api_keys"}


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
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        env = _env_name(name, field.validation_alias)
        default = (
            "" if field.default in (None, False) or field.default_factory else f" Default: {field.default}."
        )
        help_text = f"{field.description}{default} Env: {env}."
        if field.annotation is bool:
            serve.add_argument(flag, dest=name, action="store_true", help=help_text)
        elif name in REPEATABLE:
            serve.add_argument(flag, dest=name, action="append", metavar="KEY", help=help_text)
        else:
            serve.add_argument(flag, dest=name, metavar=name.split("_")[-1].upper(), help=help_text)
    return parser


def _env_name(name: str, alias: Any) -> str:
    if isinstance(alias, AliasChoices):
        plain = [str(choice) for choice in alias.choices if not str(choice).startswith("gateway_")]
        if plain and plain[0] == name:
            return plain[0].upper() + (", comma-separated" if name in REPEATABLE else "")
    return f"GATEWAY_{name.upper()}"


def load_settings(flags: dict[str, Any]) -> Settings:
    return Settings(**flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command != "serve":  # pragma: no cover - argparse enforces the choice
        return 2
    try:
        settings = load_settings(args)
    except (ValidationError, ValueError) as exc:
        print(f"gateway: {_explain(exc)}", file=sys.stderr)
        return 2
    return serve(settings)


def serve(settings: Settings) -> int:
    from gateway.app import create_app
    from gateway.supervisor import EmbeddedBackendError

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        app = create_app(settings)
    except EmbeddedBackendError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_level=settings.log_level,
        access_log=False,
        # The peer address is kept as it is and appended to X-Forwarded-For for the backend.
        proxy_headers=False,
        server_header=False,
        date_header=False,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        log_config=None,
    )
    server = Server(config)
    server.run()
    return 0 if server.started else 1


class Server(uvicorn.Server):
    """uvicorn's server, but a stop asked for by SIGTERM or SIGINT exits with status 0.

    uvicorn re-raises the signal after shutting down, so the process would die by it; a
    gateway that drained cleanly on request has not failed, and supervisors should see 0.
    """

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
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def _explain(exc: ValidationError | ValueError) -> str:
    if isinstance(exc, ValidationError):
        lines = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {message}" if error["loc"] else message)
        return "invalid settings:\n  " + "\n  ".join(lines)
    return str(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
