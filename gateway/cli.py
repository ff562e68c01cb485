"""``gateway serve``: flags and environment in, one Settings out, uvicorn started."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import AliasChoices, ValidationError

from gateway import __version__
from gateway.settings import Settings

# Settings whose flag is not simply the field name with dashes.
FLAG_NAMES = {
    "api_keys": "--api-key",
    "admin_api_keys": "--admin-api-key",
    "access_log": "--no-access-log",
    "docs": "--no-docs",
    "cors_origins": "--cors-origin",
    "backend_args": "--backend-arg",
}
REPEATABLE = {"api_keys", "admin_api_keys", "cors_origins", "trust_forwarded", "backend_args"}
# Settings that are not flags: set by another one.
NOT_FLAGS = {"backends_file"}


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
        env = _env_name(name, field.validation_alias)
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


def _env_name(name: str, alias: Any) -> str:
    if isinstance(alias, AliasChoices):
        plain = [str(choice) for choice in alias.choices if not str(choice).startswith("gateway_")]
        if plain and plain[0] == name:
            return plain[0].upper() + (", comma-separated" if name in REPEATABLE else "")
    return f"GATEWAY_{name.upper()}" + (", comma-separated" if name in REPEATABLE else "")


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
    from gateway.server import run

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
