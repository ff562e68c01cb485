"""An ASGI middleware the gateway hands the vLLM it runs itself (``--middleware``).

vLLM's ``--api-key`` guards only paths under /v1 (and a few prefixes): ``/tokenize``,
``/pooling``, ``/invocations``, ``/metrics`` and the rest stay open to anyone on the machine
who reaches its loopback port. This asks every request but ``/health`` for the key vLLM was
started with (``VLLM_API_KEY``). It runs in vLLM's own environment, so it imports nothing
but the standard library, and lives in a folder of its own put on the child's PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
App = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]

OPEN = frozenset({"/health"})
DENIED = b'{"error": {"message": "Unauthorized", "type": "authentication_error"}}'


class KeyEverywhere:
    def __init__(self, app: App) -> None:
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self.expected = hashlib.sha256(b"Bearer " + key.encode()).digest() if key else None

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        kind = scope["type"]
        if self.expected is not None and kind in ("http", "websocket") and scope["path"] not in OPEN:
            presented = b""
            for name, value in scope["headers"]:
                if name.lower() == b"authorization":
                    presented = value
            if not hmac.compare_digest(hashlib.sha256(presented).digest(), self.expected):
                if kind == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(DENIED))]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": DENIED})
                return
        await self.app(scope, receive, send)
