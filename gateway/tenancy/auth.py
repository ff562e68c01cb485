"""Client API keys: ``Authorization: Bearer <key>`` or ``x-api-key: <key>``.

Keys are held only as SHA-256 digests and compared in constant time against every
configured key, so neither timing nor a memory dump tells which key or how much of it.
Keys come from ``API_KEYS`` (each named ``key-`` and the first hex digits of its SHA-256, so
that its name, and with it its objects and its counters, belong to the key itself, whatever
its place in the list and whichever keys are added or revoked) and from a keys file,
which can hold a key's hash instead of the key and give each key its own limits::

    keys:
      - name: alice
        key: sk-alice-0123                # or the key's hash:
      - name: batch-jobs
        key: "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        rate_limit: "600/minute"
        token_limit: "200000/minute;2000000/day"
        models: ["llama-3*", "qwen2.5-7b"]   # names or glob patterns; default: every model
        priority: 0                          # flow control: higher waits less (default 0)
        weight: 1                            # its share against keys of its priority
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from gateway.core.errors import AuthenticationFailed
from gateway.core.exchange import ApiKey

SHA256 = re.compile(r"sha256:([0-9a-fA-F]{64})")


class Authenticator:
    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._keys = tuple(keys)
        names = [key.name for key in self._keys]
        if len(set(names)) != len(names):
            raise ValueError("API key names must be unique")

    @classmethod
    def from_plain_keys(
        cls, keys: Iterable[str], extra: Sequence[ApiKey] = (), prefix: str = ""
    ) -> Authenticator:
        """Keys named by their digests (``prefix`` before each: admin keys are
        ``admin:key-…``, never mistaken for a client key in logs and metrics)."""
        plain = [ApiKey(plain_key_name(key, prefix), _digest(key.encode())) for key in keys]
        return cls([*plain, *extra])

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def size(self) -> int:
        return len(self._keys)

    def authenticate(self, authorization: bytes | None, x_api_key: bytes | None) -> ApiKey | None:
        """The key presented, or None when auth is off.

        Raises AuthenticationFailed for a missing or unknown key.
        """
        if not self._keys:
            return None
        presented = _bearer(authorization) if authorization else None
        if presented is None:
            presented = x_api_key
        if not presented:
            raise AuthenticationFailed(
                "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                code="missing_api_key",
                headers={"www-authenticate": "Bearer"},
            )
        digest = _digest(presented)
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        if found is None:
            raise AuthenticationFailed(
                "invalid API key", code="invalid_api_key", headers={"www-authenticate": "Bearer"}
            )
        return found


def load_keys_file(path: Path) -> list[ApiKey]:
    """The keys a YAML keys file declares; ValueError names what is wrong with it."""
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read keys file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"keys file {path} is not valid YAML: {exc}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"keys file {path} must hold a 'keys' list")
    if not entries:
        # An empty list would turn authentication off: a typo must not open the gateway.
        raise ValueError(f"keys file {path} holds no keys: add one, or drop --keys-file")
    keys = []
    for index, entry in enumerate(entries, start=1):
        where = f"keys file {path}, entry {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ValueError(f"{where}: needs a name")
        secret = entry.get("key")
        if not isinstance(secret, str) or not secret:
            raise ValueError(f"{where} ({entry['name']}): needs a key, or 'sha256:<hex>' of it")
        hashed = SHA256.fullmatch(secret)
        digest = bytes.fromhex(hashed.group(1)) if hashed else _digest(secret.encode())
        limits = {name: entry.get(name) for name in ("rate_limit", "token_limit")}
        for name, value in limits.items():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where} ({entry['name']}): {name} must be a string like '60/minute'")
        models = entry.get("models")
        if models is not None and (
            not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)
        ):
            raise ValueError(f"{where} ({entry['name']}): models must be a list of names or patterns")
        priority, weight = entry.get("priority", 0), entry.get("weight", 1.0)
        if not isinstance(priority, int) or isinstance(priority, bool) or not -1000 <= priority <= 1000:
            raise ValueError(f"{where} ({entry['name']}): priority must be a whole number from -1000 to 1000")
        if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 < weight <= 1000:
            raise ValueError(f"{where} ({entry['name']}): weight must be a number above 0, at most 1000")
        unknown = set(entry) - {"name", "key", "rate_limit", "token_limit", "models", "priority", "weight"}
        if unknown:
            raise ValueError(f"{where} ({entry['name']}): unknown fields {', '.join(sorted(unknown))}")
        keys.append(
            ApiKey(
                entry["name"],
                digest,
                limits["rate_limit"],
                limits["token_limit"],
                tuple(models) if models is not None else None,
                priority,
                float(weight),
            )
        )
    return keys


def plain_key_name(key: str, prefix: str = "") -> str:
    """A key's name from the key itself: ``key-`` and the first 8 hex digits of its SHA-256."""
    return f"{prefix}key-{_digest(key.encode()).hex()[:8]}"


def _bearer(value: bytes) -> bytes | None:
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()
