"""Ollama: OpenAI routes under /v1; ``GET /`` answers "Ollama is running". Models load lazily on
their first request, so the server is ready as soon as it answers."""

from __future__ import annotations

from adapters.base import ALL_ROUTES, Adapter

ADAPTER = Adapter(name="ollama", routes=ALL_ROUTES, health_path="/", loading_statuses=frozenset())
