"""LocalAI: OpenAI routes under /v1; ``/readyz`` answers 503 while models preload."""

from __future__ import annotations

from adapters.base import ALL_ROUTES, Adapter

ADAPTER = Adapter(name="localai", routes=ALL_ROUTES, health_path="/readyz")
