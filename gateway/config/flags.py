"""How each setting is spelled: its flag on the command line and its environment variable."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices

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


def env_name(name: str, alias: Any) -> str:
    if isinstance(alias, AliasChoices):
        plain = [str(choice) for choice in alias.choices if not str(choice).startswith("gateway_")]
        if plain and plain[0] == name:
            return plain[0].upper() + (", comma-separated" if name in REPEATABLE else "")
    return f"GATEWAY_{name.upper()}" + (", comma-separated" if name in REPEATABLE else "")
