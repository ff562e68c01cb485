"""Any OpenAI-compatible server: every route is forwarded and the backend answers for itself."""

from __future__ import annotations

from adapters.base import ALL_ROUTES, Adapter

# /v1/models is the one route every OpenAI-compatible server has, hosted APIs included.
ADAPTER = Adapter(name="openai", routes=ALL_ROUTES, health_path="/v1/models", loading_statuses=frozenset())
