"""Settings the gateway refuses to start with: ones under which one tenant's objects or budget
would reach another, or a limit would not hold.

- Several client keys and no ``--object-secret``: IDs would be sealed with a secret drawn by
  each process, so every file, batch and stored response handed out would be lost at the next
  restart, and with ``--workers`` a worker would not open another's. The operator sets one.
- A placeholder or short object secret, or a placeholder metrics token (the shipped
  manifests' own placeholders included): a secret known to the world guards nothing.
- ``--workers`` above 1 with limits or object records counted in memory: each worker would
  count alone (limits multiplied by the workers, lists showing a worker's share). Redis, or
  one worker.
"""

from __future__ import annotations

from gateway.config.settings import Settings
from gateway.tenancy.auth import load_keys_file

MIN_SECRET = 16
PLACEHOLDERS = ("replace-with", "change-me", "changeme", "your-secret", "placeholder", "example")


def check(settings: Settings) -> None:
    """ValueError saying what to change, for settings the gateway must not run with."""
    file_keys = load_keys_file(settings.keys_file) if settings.keys_file else []
    client_keys = len(settings.api_keys) + len(file_keys)
    secret = settings.object_secret.get_secret_value() if settings.object_secret is not None else None
    if secret is not None:
        lowered = secret.lower()
        if len(secret) < MIN_SECRET or any(word in lowered for word in PLACEHOLDERS):
            raise ValueError(
                f"--object-secret is a placeholder or shorter than {MIN_SECRET} characters: set it to a "
                "long random secret (for example the output of `openssl rand -hex 32`)"
            )
    elif client_keys > 1:
        raise ValueError(
            "several client keys share this gateway, so the IDs of their files, batches and stored "
            "responses are sealed to the key that made them: set --object-secret "
            "(GATEWAY_OBJECT_SECRET) to a long random secret, the same on every replica and kept "
            "across restarts, or the IDs handed out stop working when the gateway restarts"
        )
    token = settings.metrics_token.get_secret_value() if settings.metrics_token is not None else None
    if token is not None and any(word in token.lower() for word in PLACEHOLDERS):
        raise ValueError("--metrics-token is a placeholder: set it to a long random token")
    if settings.workers > 1 and not settings.rate_limit_storage.startswith(("redis://", "rediss://")):
        limited = (
            settings.rate_limit
            or settings.token_limit
            or settings.global_rate_limit
            or any(key.rate_limit or key.token_limit for key in file_keys)
        )
        if limited:
            raise ValueError(
                f"--workers {settings.workers} with limits counted in memory: each worker would count "
                f"alone, admitting up to {settings.workers} times each limit. Count them in Redis "
                "(--rate-limit-storage redis://...), or run one worker"
            )
        if client_keys > 1:
            raise ValueError(
                f"--workers {settings.workers} with several client keys and no Redis: each worker "
                "would keep its own record of which key made which file and batch, so a list would "
                "show a worker's share. Keep them in Redis (--rate-limit-storage redis://...), or "
                "run one worker"
            )
