"""SGLang: OpenAI routes under /v1 (``/v1/models/{id}`` included); ``/health`` runs a one-token
generation, and answers 503 during warm-up after the socket opens."""

from __future__ import annotations

from adapters.base import ALL_ROUTES, Adapter

ADAPTER = Adapter(name="sglang", routes=ALL_ROUTES, health_path="/health")
