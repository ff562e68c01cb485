"""Client API keys: ``Authorization: Bearer <key>`` or ``x-api-key: <key>``.

Keys are held only as SHA-256 digests and compared in constant time against every
configured key, so neither timing nor a memory dump tells which key or how much of it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.errors import AuthenticationFailed


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: bytes


class Authenticator:
    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._keys = tuple(keys)

    @classmethod
    def from_plain_keys(cls, keys: Iterable[str]) -> Authenticator:
        return cls([ApiKey(f"key-{i}", _digest(key.encode())) for i, key in enumerate(keys, start=1)])

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: bytes | None, x_api_key: bytes | None) -> str | None:
        """The name of the key presented, or None when auth is off.

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
        found: str | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key.name
        if found is None:
            raise AuthenticationFailed(
                "invalid API key", code="invalid_api_key", headers={"www-authenticate": "Bearer"}
            )
        return found


def _bearer(value: bytes) -> bytes | None:
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()
